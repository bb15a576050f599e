"""Run the fuzz suite and classify every case (python tests/fuzz/run.py [--mode quick|long]).

The cases run in a worker process that journals each case before and after it runs: a worker
that dies (a segfault in a kernel, an abort) marks the case it was in as a crash, and a fresh worker
goes on with the rest. Every case is classified as

    error      a clear user error (one line, the right type / exit status 2)
    ok         it worked, and the result was checked against a reference
    wrong      a silent wrong answer: it finished with a wrong result, or accepted what it must refuse
    traceback  any other exception or exit status (a bug's traceback where a one-line error belongs)
    crash      the process died
    timeout    no answer within the case's time
    lost file  a file the case must not touch changed or went missing

The report (JSON) lists every case and its class; the exit status is 1 if any case is in the last
five classes. `tests/test_fuzz.py` runs the quick mode in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
BAD = ("wrong", "traceback", "crash", "timeout", "lost file")
CASE_SECONDS = 240


def worker(mode: str, seed: int, root: Path, journal: Path, skip: set[str]) -> None:
    """Run every case not in `skip`, appending {"start": name} then its result to the journal."""
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(HERE))
    from cases import all_cases, build_env

    env = build_env(root) if not (root / "run" / "latest").exists() else _env(root)

    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer within {CASE_SECONDS} s")

    signal.signal(signal.SIGALRM, on_alarm)
    with open(journal, "a") as log:
        for case in all_cases(mode, seed):
            if case.name in skip:
                continue
            log.write(json.dumps({"start": case.name}) + "\n")
            log.flush()
            t0 = time.perf_counter()
            signal.alarm(CASE_SECONDS)
            try:
                outcome = case.run(env)
                kind, detail = outcome.kind, outcome.detail
            except TimeoutError as e:
                kind, detail = "timeout", str(e)
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    raise
                kind = "traceback"
                detail = "".join(traceback.format_exception_only(type(e), e)).strip()[-600:]
            finally:
                signal.alarm(0)
            row = {
                "name": case.name,
                "family": case.family,
                "kind": kind,
                "detail": detail[:600],
                "seconds": round(time.perf_counter() - t0, 3),
            }
            log.write(json.dumps(row) + "\n")
            log.flush()


def _env(root: Path):
    from cases import Env

    return Env(root)


def run(mode: str = "quick", seed: int = 0, report: Path | None = None, verbose: bool = True) -> dict:
    """Run every case in workers (restarting after a crash); returns the report."""
    with tempfile.TemporaryDirectory(prefix="lt-fuzz-") as tmp:
        root, journal = Path(tmp) / "env", Path(tmp) / "journal.jsonl"
        root.mkdir()
        results: dict[str, dict] = {}
        env = {
            **os.environ,
            "LINEAR_TRANSFORMERS_AUTO_KERNELS": "always",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        }
        for _attempt in range(50):
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--worker",
                "--mode",
                mode,
                "--seed",
                str(seed),
                "--root",
                str(root),
                "--journal",
                str(journal),
                "--skip",
                json.dumps(sorted(results)),
            ]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root)
            started = None
            for line in journal.read_text().splitlines() if journal.exists() else []:
                row = json.loads(line)
                if "start" in row:
                    started = row["start"]
                else:
                    results[row["name"]] = row
                    started = None
            if proc.returncode == 0:
                break
            if started is None:  # died outside any case: the fixtures themselves
                raise RuntimeError(f"fuzz worker failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
            results[started] = {
                "name": started,
                "family": started.split("-")[0],
                "kind": "crash",
                "detail": f"the worker died (exit {proc.returncode}): {proc.stderr.strip()[-400:]}",
                "seconds": None,
            }
            journal.write_text(journal.read_text() + json.dumps(results[started]) + "\n")
    counts: dict[str, int] = {}
    for row in results.values():
        counts[row["kind"]] = counts.get(row["kind"], 0) + 1
    out = {
        "mode": mode,
        "seed": seed,
        "cases": len(results),
        "counts": counts,
        "bad": [r for r in results.values() if r["kind"] in BAD],
        "results": sorted(results.values(), key=lambda r: r["name"]),
    }
    if report:
        report.write_text(json.dumps(out, indent=1))
    if verbose:
        families = sorted({r["family"] for r in results.values()})
        print(f"fuzz ({mode}, seed {seed}): {len(results)} cases")
        for fam in families:
            rows = [r for r in results.values() if r["family"] == fam]
            kinds = {k: sum(r["kind"] == k for r in rows) for k in sorted({r["kind"] for r in rows})}
            print(f"  {fam:11s} {len(rows):4d}  " + ", ".join(f"{k} {n}" for k, n in kinds.items()))
        for r in out["bad"]:
            print(f"  {r['kind'].upper()}: {r['name']}: {r['detail'][:300]}")
        print(f"{len(results) - len(out['bad'])} passed, {len(out['bad'])} failed")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("quick", "long"), default="quick")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--journal", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--skip", default="[]", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.mode, args.seed, args.root, args.journal, set(json.loads(args.skip)))
        return 0
    return 1 if run(args.mode, args.seed, args.report)["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
