"""The fuzz suite (tests/fuzz/): over 300 generated bad or unusual inputs across the ops, the model,
every command's flags, damaged checkpoints and transformers folders, and the native build cache;
none may crash, leave a traceback where a one-line error belongs, answer wrongly, or change a file
it must not. `python tests/fuzz/run.py --mode long` runs four times as many draws."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RUN = Path(__file__).parent / "fuzz" / "run.py"


def test_fuzz_quick(tmp_path):
    report = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, str(RUN), "--report", str(report)], capture_output=True, text=True)
    print(proc.stdout)
    out = json.loads(report.read_text())
    assert out["cases"] >= 300, out["counts"]
    families = {r["family"] for r in out["results"]}
    assert families >= {"ops", "model", "cli", "checkpoint", "files", "hf", "native"}, families
    # every class the runner knows is reachable: the good ones are seen, the bad ones must not be
    assert out["counts"].get("error", 0) > 100 and out["counts"].get("ok", 0) > 30, out["counts"]
    assert not out["bad"], "\n".join(f"{r['kind']}: {r['name']}: {r['detail'][:300]}" for r in out["bad"])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_classifier_sees_each_failure_kind(tmp_path, monkeypatch):
    """The runner's classes are not decoration: a case that crashes the process, raises the wrong
    exception or answers wrongly is reported as such (a worker killed by a signal resumes after it)."""
    sys.path.insert(0, str(RUN.parent))
    import run as runner

    # the worker runs in another process: sitecustomize swaps its case list before it starts
    src = (
        "import cases\n"
        "def _c(env):\n    import ctypes; ctypes.string_at(0)\n"
        "def _t(env):\n    raise KeyError('bug')\n"
        "def _w(env):\n    return cases.Outcome('wrong', 'five')\n"
        "def _o(env):\n    return cases.Outcome('ok')\n"
        "cases.all_cases = lambda mode, seed: [cases.Case('x-ok', 'x', _o), cases.Case('x-crash', 'x', _c),"
        " cases.Case('x-tb', 'x', _t), cases.Case('x-wrong', 'x', _w), cases.Case('x-after', 'x', _o)]\n"
        "cases.build_env = lambda root: cases.Env(root)\n"
    )
    (tmp_path / "sitecustomize.py").write_text(src)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{RUN.parent}")
    out = runner.run("quick", 0, verbose=False)
    kinds = {r["name"]: r["kind"] for r in out["results"]}
    assert kinds == {"x-ok": "ok", "x-crash": "crash", "x-tb": "traceback", "x-wrong": "wrong", "x-after": "ok"}
