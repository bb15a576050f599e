"""The fuzz suite's cases: bad and unusual inputs, generated, each with what must happen.

A case is a name, a family and a function of the fixtures (`Env`) that runs the input and returns
an `Outcome`: "error" (a one-line user error: the right exception type, or exit status 2 with one
line on stderr), "ok" (it worked and the result was checked), or "wrong" (it finished but the
result was not what it must be, or it should have refused). The runner adds "traceback" (any
other exception or exit status), "crash" (the process died), "timeout" and "lost file" (a file the
case must not touch changed or went missing).

Families: ops (shapes, dtypes, values, backends), model (configs, tokens, the fused step when its
weights are replaced), cli (every subcommand's flags, from the parsers themselves), checkpoint
(damaged run folders through sample/eval/export/train --resume), files (commands that must not
write over what is not theirs), hf (damaged transformers folders), native (damaged cached libraries).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Outcome:
    kind: str  # "error", "ok", "wrong"
    detail: str = ""


@dataclass
class Case:
    name: str
    family: str
    run: Callable[[Env], Outcome]


@dataclass
class Env:
    """The fixtures every case may read (built once per worker): a tiny text run, its copy for cases
    that damage it, a text file. `fresh(name)` copies the run into a scratch folder for one case."""

    root: Path
    run: Path = field(init=False)
    text: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run, self.text = self.root / "run", self.root / "text.txt"

    def fresh(self, name: str) -> Path:
        dest = self.root / "scratch" / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(self.run, dest)
        return dest


TINY = [
    "--d-model",
    "16",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--d-ff",
    "32",
    "--batch-size",
    "4",
    "--seq-len",
    "16",
    "--threads",
    "1",
    "--no-progress",
    "--eval-batches",
    "1",
    "--warmup",
    "1",
]


def build_env(root: Path) -> Env:
    from linear_transformers.cli import main

    env = Env(root)
    env.text.write_text("the cat sat on the mat. " * 200)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(
            [
                "train",
                "--data",
                "text",
                "--data-path",
                str(env.text),
                "--out",
                str(env.run),
                "--steps",
                "2",
                "--checkpoint-every",
                "1",
                "--keep",
                "2",
                *TINY,
            ]
        )
    if code != 0:
        raise RuntimeError("fuzz: could not train the fixture run")
    return env


# ---- running a command line -----------------------------------------------------------------------


def cli(argv: list[str], expect: str = "error", match: str = "") -> Outcome:
    """The command line in this process: "error" wants exit status 2 and one line on stderr."""
    from linear_transformers.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    lines = [line for line in err.getvalue().strip().splitlines() if line.strip()]
    if expect == "ok":
        return Outcome("ok") if code == 0 else Outcome("wrong", f"exit {code}: {lines[-1:] or ''}")
    if code == 2 and len(lines) == 1 and ": error: " in lines[0] and match in lines[0]:
        return Outcome("error", lines[0])
    if code == 0:
        return Outcome("wrong", "accepted: " + " ".join(argv))
    raise AssertionError(f"exit {code}, stderr {len(lines)} lines: {' | '.join(lines[-3:])[:400]}")


def expect_error(fn: Callable[[], object], types=(ValueError, TypeError)) -> Outcome:
    """fn must raise one of `types` with a one-line message; anything else propagates (a traceback)."""
    try:
        fn()
    except types as e:
        msg = str(e)
        if "\n" in msg.strip() or not msg:
            return Outcome("wrong", f"a {type(e).__name__} of {len(msg.splitlines())} lines")
        return Outcome("error", msg[:200])
    return Outcome("wrong", "accepted")


# ---- ops ------------------------------------------------------------------------------------------


def _ops_cases(rng: random.Random, n: int) -> list[Case]:
    from linear_transformers import ops

    backends = ["naive", "chunked", "cpu", "auto"]
    cases = []

    def valid(seed: int, backend: str) -> Callable[[Env], Outcome]:
        def run(env: Env) -> Outcome:
            r = random.Random(seed)
            B, T, H, Dk, Dv = (
                r.randint(1, 3),
                r.choice([1, 2, 7, 63, 65, 130]),
                r.randint(1, 3),
                r.randint(1, 9),
                r.randint(1, 9),
            )
            chunk = r.choice([1, 3, 16, 64, 1000])
            g = torch.Generator().manual_seed(seed)
            q, k = torch.rand(B, T, H, Dk, generator=g), torch.rand(B, T, H, Dk, generator=g)
            v = torch.randn(B, T, H, Dv, generator=g)
            if r.random() < 0.3:  # a view that is not contiguous
                q = torch.rand(B, H, T, Dk, generator=g).transpose(1, 2)
            out, st = ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=chunk, return_state=True)
            ref, rst = ops.causal_linear_attention(
                q.double(), k.double(), v.double(), backend="naive", return_state=True
            )
            err = max((out.double() - ref).abs().max().item(), (st.S.double() - rst.S).abs().max().item())
            return Outcome("ok") if err < 1e-4 else Outcome("wrong", f"differs from the reference by {err:.2e}")

        return run

    def invalid(seed: int, backend: str) -> Callable[[Env], Outcome]:
        def run(env: Env) -> Outcome:
            r = random.Random(seed)
            q, k, v = torch.rand(2, 5, 2, 4), torch.rand(2, 5, 2, 4), torch.rand(2, 5, 2, 3)
            kw: dict = {"backend": backend}
            defect = r.choice(
                [
                    "rank",
                    "batch",
                    "length",
                    "heads",
                    "dk",
                    "dtype",
                    "int",
                    "eps",
                    "eps_nan",
                    "chunk",
                    "chunk_float",
                    "state_shape",
                    "state_type",
                    "mask_shape",
                    "mask_dtype",
                    "backend",
                    "f16_mix",
                ]
            )
            if defect == "rank":
                q = q[0]
            elif defect == "batch":
                k = torch.rand(3, 5, 2, 4)
            elif defect == "length":
                v = torch.rand(2, 6, 2, 3)
            elif defect == "heads":
                k = torch.rand(2, 5, 3, 4)
            elif defect == "dk":
                k = torch.rand(2, 5, 2, 5)
            elif defect == "dtype":
                k = k.double()
            elif defect == "int":
                q = torch.ones(2, 5, 2, 4, dtype=torch.int64)
            elif defect == "eps":
                kw["eps"] = -1.0
            elif defect == "eps_nan":
                kw["eps"] = float("nan")
            elif defect == "chunk":
                kw["chunk_size"] = r.choice([0, -3])
            elif defect == "chunk_float":
                kw["chunk_size"] = 2.5
            elif defect == "state_shape":
                kw["initial_state"] = ops.LinearState(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4))
            elif defect == "state_type":
                kw["initial_state"] = (torch.zeros(2, 2, 4, 3), torch.zeros(2, 2, 4))
            elif defect == "mask_shape":
                kw["key_padding_mask"] = torch.zeros(2, 4, dtype=torch.bool)
            elif defect == "mask_dtype":
                kw["key_padding_mask"] = torch.zeros(2, 5)
            elif defect == "backend":
                kw["backend"] = "fastest"
            elif defect == "f16_mix":
                v = v.half()
            return expect_error(lambda: ops.causal_linear_attention(q, k, v, **kw))

        return run

    for i in range(n):
        backend = backends[i % len(backends)]
        seed = rng.randrange(1 << 30)
        if i % 2:
            cases.append(Case(f"ops-valid-{backend}-{seed}", "ops", valid(seed, backend)))
        else:
            cases.append(Case(f"ops-invalid-{backend}-{seed}", "ops", invalid(seed, backend)))

    def double_backward(backend: str) -> Callable[[Env], Outcome]:
        def grads(backend: str) -> torch.Tensor:
            g = torch.Generator().manual_seed(5)
            dtype = torch.float32 if backend == "cpu" else torch.float64  # (the kernel computes float32)
            q, k, v = (torch.rand(1, 9, 2, 4, generator=g, dtype=dtype).requires_grad_() for _ in range(3))
            out = ops.causal_linear_attention(q, k, v, backend=backend, chunk_size=4)
            (dq,) = torch.autograd.grad((out * out).sum(), q, create_graph=True)
            return torch.autograd.grad(dq.sum(), k)[0]

        def run(env: Env) -> Outcome:
            try:
                got = grads(backend)
            except NotImplementedError as e:
                if "double backward" not in str(e) or backend == "naive":
                    raise
                return Outcome("error", str(e).splitlines()[0][:200])
            err = (got.double() - grads("naive")).abs().max().item()
            return Outcome("ok") if err < 1e-8 else Outcome("wrong", f"second-order gradient off by {err:.2e}")

        return run

    cases += [Case(f"ops-double-backward-{b}", "ops", double_backward(b)) for b in ("naive", "chunked", "cpu")]
    return cases


# ---- model ----------------------------------------------------------------------------------------


def _tiny_model(feature_map: str = "elu", d: int = 32):
    from linear_transformers.model import CausalTransformer, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=11, max_len=40, d_model=d, n_layers=2, n_heads=2, d_ff=2 * d, feature_map=feature_map)
    return CausalTransformer(cfg).eval()


def _model_cases(rng: random.Random) -> list[Case]:
    from linear_transformers.model import ModelConfig

    cases = []
    bad_configs = [
        ("d_model", 30, "n_heads", 4),
        ("n_layers", 0),
        ("vocab_size", -1),
        ("dropout", 1.0),
        ("eps", -1e-3),
        ("eps", float("inf")),
        ("attention", "causal-fast"),
        ("feature_map", "tanh"),
        ("positional", "rope9"),
        ("norm", "mid"),
        ("head", "gauss"),
        ("lsh_buckets", 3),
        ("n_classes", -2),
        ("chunk_size", 0),
        ("max_len", 0),
        ("mol_components", 0),
        ("lsh_chunk", -1),
    ]
    for spec in bad_configs:
        kw = dict(zip(spec[::2], spec[1::2], strict=True))
        cases.append(
            Case(
                f"model-config-{'-'.join(map(str, spec))}",
                "model",
                lambda env, kw=kw: expect_error(lambda: ModelConfig(**kw)),
            )
        )

    def step_case(kind: str) -> Callable[[Env], Outcome]:
        def run(env: Env) -> Outcome:
            model = _tiny_model()
            with torch.no_grad():
                _, state = model.prefill(torch.tensor([[1, 2, 3]]))
                token = {
                    "oov": torch.tensor([11]),
                    "negative": torch.tensor([-1]),
                    "float": torch.tensor([1.7]),
                    "matrix": torch.tensor([[1]]),
                    "batch": torch.tensor([1, 2]),
                    "list": [1],
                    "bool": torch.tensor([True]),
                }[kind]
                return expect_error(lambda: model.step(token, state))

        return run

    for kind in ("oov", "negative", "float", "matrix", "batch", "list", "bool"):
        cases.append(Case(f"model-step-{kind}", "model", step_case(kind)))

    def generate_case(kw: dict) -> Callable[[Env], Outcome]:
        def run(env: Env) -> Outcome:
            model = _tiny_model()
            return expect_error(lambda: model.generate(**kw))

        return run

    for kw in (
        {"n": 0},
        {"n": -1},
        {"n": 2.5},
        {"n": 2, "temperature": -1.0},
        {"n": 2, "top_p": 0.0},
        {"n": 2, "top_k": -3},
        {"n": 2, "mode": "beam"},
        {"prompt": torch.tensor([[1, 99]])},
        {"prompt": torch.tensor([[1.5, 2.0]])},
        {"n": 1, "max_new_tokens": -2},
        {"n": 2, "prompt": torch.tensor([[1, 2]])},
        {"n": 1, "config": "fast"},
    ):
        cases.append(
            Case(f"model-generate-{'-'.join(f'{k}={str(v)[:12]}' for k, v in kw.items())}", "model", generate_case(kw))
        )

    def replaced_weights(how: str, d: int) -> Callable[[Env], Outcome]:
        """The fused C step after the model's weights were replaced: the same tokens as PyTorch's step
        with the new weights (a stale or freed pointer gives others, or crashes)."""

        def run(env: Env) -> Outcome:
            from linear_transformers.decode import DecodeConfig

            model = _tiny_model(d=d)
            prompt = torch.tensor([[1, 2, 3, 4]])
            before = model.generate(prompt=prompt, max_new_tokens=8, temperature=0)  # builds the fused step
            torch.manual_seed(1)
            fresh = {k: torch.randn_like(v) * 0.5 for k, v in model.state_dict().items()}
            if how == "assign":
                model.load_state_dict(fresh, assign=True)
            elif how == "parameter":
                for name in [n for n, _ in model.named_parameters()]:
                    *path, leaf = name.split(".")
                    owner = model.get_submodule(".".join(path))
                    setattr(owner, leaf, torch.nn.Parameter(fresh[name].clone()))
            elif how == "data":
                for name, p in model.named_parameters():
                    p.data = fresh[name].clone()
            elif how == "copy":
                with torch.no_grad():
                    for name, p in model.named_parameters():
                        p.copy_(fresh[name])
            import gc

            gc.collect()
            junk = [torch.full((d * d * 8,), 7.0) for _ in range(20)]  # reuse freed memory, if any was kept
            fused = model.generate(prompt=prompt, max_new_tokens=8, temperature=0)
            plain = model.generate(prompt=prompt, max_new_tokens=8, temperature=0, config=DecodeConfig(fused=False))
            del junk
            if not torch.equal(fused, plain):
                return Outcome(
                    "wrong", f"fused {fused.tolist()} vs PyTorch {plain.tolist()} (before {before.tolist()})"
                )
            return Outcome("ok")

        return run

    for how in ("assign", "parameter", "data", "copy"):
        for d in (32, 256):
            cases.append(Case(f"model-fused-after-{how}-d{d}", "model", replaced_weights(how, d)))
    return cases


# ---- command lines, from the parsers --------------------------------------------------------------


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser (commands.COMMANDS, groups included), those needing an extra that is not
    installed left out."""
    from linear_transformers import commands

    found = {}
    for name, command in commands.leaves().items():
        try:
            found[name] = commands.parser_for(command, f"x {name}")
        except ImportError:
            continue
    return found


def _flag_cases(rng: random.Random, per_command: int) -> list[Case]:
    """Values that every parser must refuse before any work: not a number, a count below 1, a thread
    count past the machine's bound, a choice not offered, an unknown flag, a missing value."""
    cases = []
    for command, parser in _parsers().items():
        words = command.split()
        candidates = []
        for action in parser._actions:
            if not action.option_strings or action.option_strings[0] in ("-h", "--help", "--debug"):
                continue
            flag = action.option_strings[0]
            if isinstance(action, argparse.BooleanOptionalAction):
                candidates.append([flag + "=yes"])
                continue
            kind = getattr(action.type, "__name__", "")
            if action.choices:
                candidates.append([flag, "no-such-choice"])
            if kind in ("int", "float", "_thread_count"):
                candidates.append([flag, "abc"])
                candidates.append([flag, "1e400x"])
            if kind == "int" and action.type is not int:  # a count: at least 1
                candidates.append([flag, "0"])
                candidates.append([flag, "-7"])
            if kind == "_thread_count":
                candidates.append([flag, "100000000"])
                candidates.append([flag, "-1"])
            if action.nargs is None and action.type is not None:
                candidates.append([flag])  # the value is missing
        candidates.append(["--no-such-flag", "1"])
        rng.shuffle(candidates)
        for extra in candidates[:per_command]:
            argv = [*words, *extra]
            cases.append(Case(f"cli-{'-'.join(argv)}", "cli", lambda env, argv=argv: cli(argv)))
    return cases


# ---- checkpoints, files, HF folders ---------------------------------------------------------------


def _damage(env: Env, name: str, how: str) -> Path:
    run = env.fresh(name)
    ckpt = run / (run / "latest").read_text().strip()
    weights, config = ckpt / "model.safetensors", ckpt / "config.json"
    if how == "truncate-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "zero-weights":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 256] = bytes(256)
        weights.write_bytes(bytes(data))
    elif how == "empty-weights":
        weights.write_bytes(b"")
    elif how == "no-hash":
        c = json.loads(config.read_text())
        del c["weights_sha256"]
        config.write_text(json.dumps(c))
    elif how == "garbage-config":
        config.write_text("{not json")
    elif how == "config-list":
        config.write_text("[1, 2]")
    elif how in ("unknown-field", "vocab-mismatch", "wrong-type"):
        c = json.loads(config.read_text())
        c["model"].update(
            {"unknown-field": {"gate": 3}, "vocab-mismatch": {"vocab_size": 7}, "wrong-type": {"n_layers": "two"}}[how]
        )
        config.write_text(json.dumps(c))
        from linear_transformers.integrity import write_sums

        write_sums(ckpt, ["model.safetensors", "config.json", "state.pt"], "re-summed after the edit")
    elif how == "garbage-state":
        (ckpt / "state.pt").write_bytes(b"\x00garbage" * 50)
    elif how == "resummed-garbage-state":
        from linear_transformers.integrity import write_sums

        (ckpt / "state.pt").write_bytes(b"PK\x03\x04garbage" * 50)
        write_sums(ckpt, ["model.safetensors", "config.json", "state.pt"], "re-summed after the edit")
    elif how == "no-state":
        (ckpt / "state.pt").unlink()
    elif how == "latest-missing":
        (run / "latest").write_text("step-999999\n")
    elif how == "latest-garbage":
        (run / "latest").write_text("../../etc\n")
    elif how == "no-weights":
        weights.unlink()
    elif how == "sums-garbage":
        (ckpt / "SHA256SUMS").write_text("zzz  model.safetensors\n")
    return run


DAMAGE = (
    "truncate-weights",
    "zero-weights",
    "empty-weights",
    "no-hash",
    "garbage-config",
    "config-list",
    "unknown-field",
    "vocab-mismatch",
    "wrong-type",
    "latest-missing",
    "latest-garbage",
    "no-weights",
    "sums-garbage",
)


def _checkpoint_cases(env_root_hint: str = "") -> list[Case]:
    cases = []

    def through(command: str, how: str) -> Callable[[Env], Outcome]:
        def run(env: Env) -> Outcome:
            folder = _damage(env, f"{command}-{how}", how)
            argv = {
                "sample": ["sample", "--checkpoint", str(folder), "--n", "1", "--out", str(env.root / f"s-{how}.txt")],
                "eval": ["eval", "--checkpoint", str(folder), "--batches", "1"],
                "export": ["export", "--checkpoint", str(folder), "--onnx", str(env.root / f"e-{how}.onnx")],
                "resume": ["train", "--out", str(folder), "--resume", "--steps", "3", "--data-path", str(env.text)],
            }[command]
            before = _digest(folder)
            outcome = cli(argv)
            if _digest(folder) != before:
                return Outcome("lost file", f"{command} changed the damaged run folder {folder.name}")
            return outcome

        return run

    for command in ("sample", "eval", "export", "resume"):
        for how in DAMAGE:
            cases.append(Case(f"checkpoint-{command}-{how}", "checkpoint", through(command, how)))
    for how in ("garbage-state", "resummed-garbage-state", "no-state"):
        cases.append(Case(f"checkpoint-resume-{how}", "checkpoint", through("resume", how)))
    return cases


def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _file_cases() -> list[Case]:
    """Commands pointed at files and folders that are not theirs: each must refuse and change nothing."""
    cases = []

    def refused(name: str, argv_of: Callable[[Env, Path], list[str]], prepare=None) -> Case:
        def run(env: Env) -> Outcome:
            folder = env.fresh(f"files-{name}")
            if prepare:
                prepare(env, folder)
            before = _digest(folder)
            outcome = cli(argv_of(env, folder))
            if _digest(folder) != before:
                return Outcome("lost file", f"{name}: the folder changed")
            return outcome

        return Case(f"files-{name}", "files", run)

    ck = lambda f: f / (f / "latest").read_text().strip()  # noqa: E731
    cases += [
        refused(
            "onnx-over-config", lambda e, f: ["export", "--checkpoint", str(f), "--onnx", str(ck(f) / "config.onnx")]
        ),
        refused("onnx-into-run", lambda e, f: ["export", "--checkpoint", str(f), "--onnx", str(f / "m.onnx")]),
        refused(
            "onnx-over-file",
            lambda e, f: ["export", "--checkpoint", str(f), "--onnx", str(f / "notes.onnx")],
            lambda e, f: (f / "notes.onnx").write_text("mine"),
        ),
        refused(
            "onnx-sidecar-over-file",
            lambda e, f: ["export", "--checkpoint", str(f), "--onnx", str(e.root / "side" / "notes.onnx")],
            lambda e, f: ((e.root / "side").mkdir(exist_ok=True), (e.root / "side" / "notes.json").write_text("{}")),
        ),
        refused("hf-into-checkpoint", lambda e, f: ["export", "--checkpoint", str(f), "--hf", str(ck(f))]),
        refused("hf-into-run", lambda e, f: ["export", "--checkpoint", str(f), "--hf", str(f)]),
        refused("hf-onto-file", lambda e, f: ["export", "--checkpoint", str(f), "--hf", str(f / "log.csv")]),
        refused("hf-into-run-subfolder", lambda e, f: ["export", "--checkpoint", str(f), "--hf", str(f / "hf")]),
        refused(
            "sample-into-run", lambda e, f: ["sample", "--checkpoint", str(f), "--n", "1", "--out", str(f / "s.txt")]
        ),
        refused(
            "sample-over-log", lambda e, f: ["sample", "--checkpoint", str(f), "--n", "1", "--out", str(f / "log.csv")]
        ),
        refused(
            "sample-over-config",
            lambda e, f: ["sample", "--checkpoint", str(f), "--n", "1", "--out", str(ck(f) / "config.json")],
        ),
        refused(
            "train-fresh-over-run",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(e.text),
                "--out",
                str(f),
                "--steps",
                "1",
                *TINY,
            ],
        ),
        refused(
            "train-fresh-steps-no-latest",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(e.text),
                "--out",
                str(f),
                "--steps",
                "1",
                *TINY,
            ],
            lambda e, f: (f / "latest").unlink(),
        ),
        refused(
            "train-into-file",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(e.text),
                "--out",
                str(f / "log.csv"),
                "--steps",
                "1",
                *TINY,
            ],
        ),
        refused(
            "train-into-checkpoint",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(e.text),
                "--out",
                str(ck(f)),
                "--steps",
                "1",
                *TINY,
            ],
        ),
        refused(
            "train-data-missing",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(f / "nope.txt"),
                "--out",
                str(e.root / "never"),
                "--steps",
                "1",
                *TINY,
            ],
        ),
        refused(
            "train-data-folder",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(f),
                "--out",
                str(e.root / "never2"),
                "--steps",
                "1",
                *TINY,
            ],
        ),
        refused(
            "train-data-fake-targz",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(e.root / "fake.tar.gz"),
                "--out",
                str(e.root / "never3"),
                "--steps",
                "1",
                *TINY,
            ],
            lambda e, f: (e.root / "fake.tar.gz").write_bytes(b"not an archive at all"),
        ),
        refused(
            "train-data-binary",
            lambda e, f: [
                "train",
                "--data",
                "text",
                "--data-path",
                str(ck(f) / "model.safetensors"),
                "--out",
                str(e.root / "never4"),
                "--steps",
                "1",
                *TINY,
            ],
        ),
        refused(
            "resume-no-run",
            lambda e, f: [
                "train",
                "--out",
                str(e.root / "empty-run"),
                "--resume",
                "--steps",
                "3",
                "--data",
                "text",
                "--data-path",
                str(e.text),
            ],
        ),
        refused(
            "resume-changed-settings",
            lambda e, f: [
                "train",
                "--out",
                str(f),
                "--resume",
                "--steps",
                "3",
                "--data-path",
                str(e.text),
                "--d-model",
                "24",
            ],
        ),
        refused("web-port-too-big", lambda e, f: ["web", "--checkpoint", str(f), "--port", "70000"]),
        refused("web-port-negative", lambda e, f: ["web", "--checkpoint", str(f), "--port", "-5"]),
        refused(
            "web-host-unknown", lambda e, f: ["web", "--checkpoint", str(f), "--host", "no such host!", "--port", "0"]
        ),
        refused("eval-missing", lambda e, f: ["eval", "--checkpoint", str(f / "nothing")]),
        refused(
            "sample-prompt-unknown-chars",
            lambda e, f: ["sample", "--checkpoint", str(f), "--prompt", "QZ§", "--out", str(e.root / "s-q.txt")],
        ),
    ]

    def locked(env: Env) -> Outcome:
        from linear_transformers.checkpoint import RunLock

        folder = env.fresh("files-locked")
        with RunLock(folder):  # as if another training held it
            before = _digest(folder)
            outcome = cli(["train", "--out", str(folder), "--resume", "--steps", "3", "--data-path", str(env.text)])
            if _digest(folder) != before:
                return Outcome("lost file", "a second training wrote into a locked run folder")
        return outcome

    cases.append(Case("files-second-training-locked", "files", locked))

    def prune_keeps_latest(env: Env) -> Outcome:
        """A resumed run prunes by step number and keeps what `latest` names."""
        folder = env.fresh("files-prune")
        code = cli(
            [
                "train",
                "--out",
                str(folder),
                "--resume",
                "--steps",
                "4",
                "--checkpoint-every",
                "1",
                "--data-path",
                str(env.text),
                "--keep",
                "1",
            ],
            expect="ok",
        )
        if code.kind != "ok":
            return code
        latest = (folder / "latest").read_text().strip()
        left = sorted(p.name for p in folder.glob("step-*"))
        return Outcome("ok") if left == [latest] == ["step-000004"] else Outcome("lost file", f"{latest} vs {left}")

    cases.append(Case("files-prune-keeps-latest", "files", prune_keeps_latest))
    return cases


def _hf_cases() -> list[Case]:
    cases = []

    def damaged_hf(how: str) -> Callable[[Env], Outcome]:
        def run(env: Env) -> Outcome:
            folder = env.root / "scratch" / f"hf-{how}"
            if folder.exists():
                shutil.rmtree(folder)
            ok = cli(["export", "--checkpoint", str(env.run), "--hf", str(folder)], expect="ok")
            if ok.kind != "ok":
                return ok
            weights = folder / "model.safetensors"
            if how == "truncate":
                weights.write_bytes(weights.read_bytes()[:200])
            elif how == "zero":
                data = bytearray(weights.read_bytes())
                data[-64:] = bytes(64)
                weights.write_bytes(bytes(data))
            elif how == "config-garbage":
                (folder / "config.json").write_text("{")
            elif how == "no-weights":
                weights.unlink()
            elif how == "re-export":  # export writes over what it wrote before, and only that
                return cli(["export", "--checkpoint", str(env.run), "--hf", str(folder)], expect="ok")
            return cli(["sample", "--checkpoint", str(folder), "--n", "1", "--out", str(env.root / f"hf-{how}.txt")])

        return run

    for how in ("truncate", "zero", "config-garbage", "no-weights", "re-export"):
        cases.append(Case(f"hf-{how}", "hf", damaged_hf(how)))
    return cases


# ---- the native build cache -----------------------------------------------------------------------


def _native_cases() -> list[Case]:
    """A cached library damaged on disk is rebuilt, never loaded: run in a child process with its own
    cache (a load of a damaged library would kill the process: the child's exit says so)."""
    cases = []
    build = (
        "import linear_transformers.ops.cpu\nimport linear_transformers.decode\n"
        "from linear_transformers import native\n"
        "for n in ('causal_linear', 'model_step'):\n    assert native.build_info(n) is not None, native.load(n).error\n"
    )
    use = build + (
        "import torch\nfrom linear_transformers import ops\n"
        "q, k, v = torch.rand(1, 70, 2, 8), torch.rand(1, 70, 2, 8), torch.rand(1, 70, 2, 8)\n"
        "a = ops.causal_linear_attention(q, k, v, backend='cpu')\n"
        "r = ops.causal_linear_attention(q.double(), k.double(), v.double(), backend='naive')\n"
        "assert (a.double() - r).abs().max() < 1e-4\nprint('ok')\n"
    )

    def damage(path: Path, how: str) -> None:
        data = bytearray(path.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 3]
        elif how == "zero":
            data[len(data) // 4 : len(data) // 2] = bytes(len(data) // 2 - len(data) // 4)
        elif how == "garbage":
            data = bytearray(b"\x7fELF" + b"\x00" * 64)
        elif how == "flip":
            data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def run_damaged(how: str) -> Callable[[Env], Outcome]:
        def run(env: Env) -> Outcome:
            import os

            cache = env.root / "native-cache" / how
            cache.mkdir(parents=True, exist_ok=True)
            child_env = {**os.environ, "LINEAR_TRANSFORMERS_CACHE": str(cache)}
            for script in (build, None, use):  # build, damage every cached library, then load and compute
                if script is None:
                    for lib in cache.glob("*.so"):
                        damage(lib, how)
                    continue
                proc = subprocess.run(
                    [sys.executable, "-c", script], capture_output=True, text=True, env=child_env, timeout=240
                )
                if proc.returncode < 0:
                    return Outcome("crash", f"the child died of signal {-proc.returncode}")
                if proc.returncode != 0:
                    raise AssertionError(proc.stderr.strip()[-400:])
            return Outcome("ok") if "ok" in proc.stdout else Outcome("wrong", proc.stdout[-200:])

        return run

    for how in ("truncate", "zero", "garbage", "flip"):
        cases.append(Case(f"native-cache-{how}", "native", run_damaged(how)))
    return cases


def all_cases(mode: str = "quick", seed: int = 0) -> list[Case]:
    """Every case of a mode: "quick" (CI: a few minutes) or "long" (more draws of every generator)."""
    rng = random.Random(seed)
    scale = 1 if mode == "quick" else 4
    cases = [
        *_ops_cases(rng, 60 * scale),
        *_model_cases(rng),
        *_flag_cases(rng, 8 * scale),
        *_checkpoint_cases(),
        *_file_cases(),
        *_hf_cases(),
    ]
    if mode == "long" or mode == "quick":
        cases += _native_cases()
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise RuntimeError(f"fuzz: duplicate case names {dup[:5]}")
    return cases
