"""Training end to end on tiny files: checkpoints are whole and atomic, a run killed mid-way resumes
to exactly the parameters of an uninterrupted run, data parallelism over 2 CPU processes (gloo)
matches one process with the same global batch, and the CLI's train/sample/eval work."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linear_transformers.checkpoint import resolve_checkpoint
from linear_transformers.cli import main as cli_main
from linear_transformers.integrity import write_sums
from linear_transformers.model import CausalTransformer, ModelConfig
from test_data import write_mnist_folder

from helpers import cli_error

TINY = [
    "--d-model",
    "32",
    "--n-layers",
    "1",
    "--n-heads",
    "2",
    "--d-ff",
    "64",
    "--batch-size",
    "8",
    "--levels",
    "16",
    "--optimizer",
    "adamw",
    "--lr",
    "1e-2",
    "--warmup",
    "3",
    "--eval-batches",
    "1",
    "--threads",
    "1",
    "--no-progress",
]


def _cli(*args: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "linear_transformers.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **env},
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(resolve_checkpoint(run) / "model.safetensors")


@pytest.fixture
def mnist_dir(tmp_path) -> Path:
    write_mnist_folder(tmp_path / "mnist", n_train=64, n_test=16, side=8)
    return tmp_path / "mnist"


def test_train_writes_whole_checkpoints_and_learns(tmp_path, mnist_dir):
    run = tmp_path / "run"
    assert (
        cli_main(
            [
                "train",
                "--data-path",
                str(mnist_dir),
                "--out",
                str(run),
                "--steps",
                "60",
                "--checkpoint-every",
                "20",
                "--eval-every",
                "20",
                *TINY,
            ]
        )
        == 0
    )
    assert (run / "latest").read_text().strip() == "step-000060"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000040", "step-000060"]  # keep=2
    assert not list(run.glob(".*tmp*"))  # no temporary leftovers
    for f in ("model.safetensors", "config.json", "state.pt"):
        assert (run / "step-000060" / f).stat().st_size > 0
    log = (run / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,bits_per_dim") and len(log) == 61
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5 < 0.6 * math.log(16)  # it learns the structure
    assert log[-1].split(",")[-1]  # a test bits/dim at the end


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, mnist_dir):
    args = [
        "train",
        "--data-path",
        str(mnist_dir),
        "--steps",
        "160",
        "--checkpoint-every",
        "10",
        "--eval-every",
        "0",
        *TINY,
    ]
    full = _cli(*args, "--out", str(tmp_path / "full"))
    killed = _cli(*args, "--out", str(tmp_path / "killed"))
    latest = tmp_path / "killed" / "latest"
    deadline = time.time() + 120
    while not (latest.exists() and latest.read_text().strip() >= "step-000020"):
        assert killed.poll() is None, killed.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.002)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    stopped_at = latest.read_text().strip()
    assert stopped_at < "step-000160", "the run finished before it could be killed; the test proves nothing"
    resumed = _cli(*args, "--out", str(tmp_path / "killed"), "--resume")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert f"resuming {tmp_path / 'killed'} from {stopped_at}" in out
    full_out, _ = full.communicate(timeout=300)
    assert full.returncode == 0, full_out
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_data_parallel_matches_one_process(tmp_path, mnist_dir):
    args = [
        "train",
        "--data-path",
        str(mnist_dir),
        "--steps",
        "6",
        "--checkpoint-every",
        "6",
        "--eval-every",
        "0",
        *TINY,
    ]
    single = _cli(*args, "--out", str(tmp_path / "single"))
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "linear_transformers.cli",
            *args,
            "--out",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    assert "all 2 ranks hold identical parameters" in ddp.stdout
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "ddp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


@pytest.mark.parametrize("ranks,context_parallel", [(2, 2), (4, 2)], ids=["cp2", "dp2-cp2"])
def test_context_parallel_matches_one_process(tmp_path, mnist_dir, ranks, context_parallel):
    """Each sequence split over `context_parallel` ranks (beside data parallelism with 4 ranks): the
    weights after 4 steps are those of one process."""
    args = [
        "train",
        "--data-path",
        str(mnist_dir),
        "--steps",
        "4",
        "--checkpoint-every",
        "4",
        "--eval-every",
        "0",
        *TINY,
    ]
    single = _cli(*args, "--out", str(tmp_path / "single"))
    cp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            "-m",
            "linear_transformers.cli",
            *args,
            "--context-parallel",
            str(context_parallel),
            "--out",
            str(tmp_path / "cp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert f"all {ranks} ranks hold identical parameters" in cp.stdout
    out, _ = single.communicate(timeout=300)
    assert single.returncode == 0, out
    a, b = _weights(tmp_path / "single"), _weights(tmp_path / "cp")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-5, msg=k)


def test_sample_and_eval_commands(tmp_path, mnist_dir, capsys):
    run = tmp_path / "run"
    cli_main(
        ["train", "--data-path", str(mnist_dir), "--out", str(run), "--steps", "4", "--checkpoint-every", "4", *TINY]
    )
    assert cli_main(["sample", "--checkpoint", str(run), "--n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 500
    assert cli_main(["eval", "--checkpoint", str(run), "--batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "s.png" in out and "bits/dim" in out


def test_sample_cpu_precision(tmp_path, mnist_dir, capsys, monkeypatch):
    """--cpu-precision sets the fused CPU step's precision for sampling, and is refused where it
    would be ignored."""
    from linear_transformers import decode
    from linear_transformers.decode import fused

    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    run = tmp_path / "run"
    cli_main(
        [
            "train",
            "--data-path",
            str(mnist_dir),
            "--out",
            str(run),
            "--steps",
            "2",
            "--checkpoint-every",
            "2",
            "--head",
            "mol",
            *TINY,
        ]
    )
    seen, generate = [], CausalTransformer.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["config"])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(CausalTransformer, "generate", spy)
    names = ["bf16-weights", "int8-dot"] + (["bf16"] if fused.has_bf16_dot() else [])
    for name in names:
        assert (
            cli_main(
                [
                    "sample",
                    "--checkpoint",
                    str(run),
                    "--n",
                    "1",
                    "--cpu-precision",
                    name,
                    "--out",
                    str(tmp_path / f"{name}.png"),
                ]
            )
            == 0
        )
        assert f"CPU precision {name}" in capsys.readouterr().out
    assert seen == [decode.DecodeConfig.precision(name) for name in names]  # one batch each
    seen.clear()
    assert (
        cli_main(
            ["sample", "--checkpoint", str(run), "--n", "1", "--no-fused-step", "--out", str(tmp_path / "pytorch.png")]
        )
        == 0
    )
    assert seen == [decode.DecodeConfig(fused=False)]
    cli_error(
        capsys,
        ["sample", "--checkpoint", str(run), "--cpu-precision", "bf16-weights", "--no-fused-step"],
        "--cpu-precision bf16-weights is the fused CPU step's precision; drop --no-fused-step",
    )
    cli_error(
        capsys,
        ["sample", "--checkpoint", str(run), "--cpu-precision", "fp16"],
        "--cpu-precision must be one of float32, bf16-weights, bf16, int8, int8-dot, got 'fp16'",
    )
    softmax = tmp_path / "softmax"
    cli_main(
        [
            "train",
            "--data-path",
            str(mnist_dir),
            "--out",
            str(softmax),
            "--steps",
            "1",
            "--checkpoint-every",
            "1",
            "--attention",
            "causal-softmax",
            *TINY,
        ]
    )
    cli_error(
        capsys,
        ["sample", "--checkpoint", str(softmax), "--cpu-precision", "bf16-weights"],
        "needs the fused CPU step, but it computes causal-linear attention",
    )


def test_text_model_samples_text(tmp_path, capsys, monkeypatch):
    (tmp_path / "t.txt").write_text("abcabcabd " * 300)
    run = tmp_path / "run"
    cli_main(
        [
            "train",
            "--data",
            "text",
            "--data-path",
            str(tmp_path / "t.txt"),
            "--seq-len",
            "32",
            "--out",
            str(run),
            "--steps",
            "20",
            "--checkpoint-every",
            "20",
            *TINY,
        ]
    )
    monkeypatch.chdir(tmp_path)
    sample = ["sample", "--checkpoint", str(run), "--n", "2", "--prompt", "abc", "--max-new-tokens", "20"]
    assert cli_main(sample) == 0
    text = (tmp_path / "samples.txt").read_text()
    assert text.startswith("abc") and len(text.split("\n\n")[0]) == 23
    # a second run takes the next free name; nothing is written into the run folder or over a file
    assert cli_main(sample) == 0 and (tmp_path / "samples-1.txt").read_text() == text
    assert not list(run.rglob("samples*"))
    cli_error(capsys, [*sample, "--out", str(tmp_path / "samples.txt")], "exists and was not written by this command")
    cli_error(capsys, [*sample, "--out", str(run / "s.txt")], "a training run's folder")
    cli_error(capsys, ["sample", "--checkpoint", str(run), "--prompt", "xyz"], "characters the model never saw")
    # eval on text: every test character once, in non-overlapping windows of the model's length, in bits/char
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(run)]) == 0
    out = capsys.readouterr().out
    from linear_transformers import data as datasets

    n = datasets.load("text", str(tmp_path / "t.txt"), seq_len=32).n_items("test")
    assert f"bits/char over {-(-n // 32)} non-overlapping windows of 32 characters" in out


def test_presets_fill_in_what_is_not_given(tmp_path, capsys):
    """train --preset: a size and a training length for the options left out; those typed win; the
    demo trains the small preset."""
    import json

    from linear_transformers import demo
    from linear_transformers.train import preset

    (tmp_path / "t.txt").write_text("abcabcabd " * 300)
    run = tmp_path / "run"
    argv = [
        "train",
        "--data",
        "text",
        "--data-path",
        str(tmp_path / "t.txt"),
        "--preset",
        "tiny",
        "--steps",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(run),
    ]
    assert cli_main(argv) == 0
    config = json.loads(next(run.glob("*/config.json")).read_text())
    tiny_model, tiny_training = preset("tiny", "text")
    assert {k: config["model"][k] for k in tiny_model} == tiny_model
    assert config["train"]["steps"] == 2 and config["train"]["seq_len"] == 32  # typed: kept
    assert config["train"]["lr"] == tiny_training["lr"] and "image_size" not in tiny_training
    assert preset("tiny", "mnist")[1]["image_size"] == 14 and preset("paper", "cifar10")[0]["n_layers"] == 16
    assert (demo.MODEL.d_model, demo.TRAIN.steps) == (preset("small", "mnist")[0]["d_model"], 900)
    cli_error(capsys, [*argv, "--resume"], "--preset starts a run")
    assert cli_main(["train", "--preset", "huge"]) == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_cli_options_and_errors(tmp_path, capsys):
    assert cli_main(["train", "--d-modle", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --d-modle" in err[0]  # one line, not the whole usage
    assert cli_main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--d-model", "--feature-map", "--norm", "--head", "--steps", "--resume", "--bf16", "--time-limit"):
        assert option in help_text
    assert "width of the residual stream (default: 256)" in " ".join(help_text.split())
    cli_error(capsys, ["sample", "--checkpoint", str(tmp_path / "none")], "no checkpoint at")
    cli_error(capsys, ["train", "--optimizer", "sgd"], "TrainConfig: optimizer must be 'radam' or 'adamw'")


def test_bfloat16_autocast_training_runs_and_learns(tmp_path, mnist_dir):
    run = tmp_path / "run"
    cli_main(
        [
            "train",
            "--data-path",
            str(mnist_dir),
            "--out",
            str(run),
            "--steps",
            "40",
            "--checkpoint-every",
            "40",
            "--eval-every",
            "40",
            "--bf16",
            *TINY,
        ]
    )
    log = (run / "log.csv").read_text().splitlines()
    losses = [float(line.split(",")[1]) for line in log[1:]]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    weights = _weights(run)
    assert all(t.dtype == torch.float32 for t in weights.values())  # autocast leaves the weights in float32


def test_a_fresh_run_never_touches_an_earlier_one(tmp_path, mnist_dir, capsys):
    run = tmp_path / "run"
    args = ["train", "--data-path", str(mnist_dir), "--out", str(run), "--checkpoint-every", "5", *TINY]
    cli_main([*args, "--steps", "10"])
    before = {p.name: p.stat().st_mtime_ns for p in run.glob("step-*")}
    cli_error(capsys, [*args, "--steps", "20"], "already holds a run .*pass --resume")
    assert {p.name: p.stat().st_mtime_ns for p in run.glob("step-*")} == before
    cli_main([*args, "--steps", "20", "--resume"])  # continuing it is fine
    assert (run / "latest").read_text().strip() == "step-000020"


def test_time_limit_counts_the_time_before_a_resume(tmp_path, mnist_dir, capsys):
    """The training time is saved with each checkpoint: a resumed run gets what is left of its limit."""
    args = [
        "train",
        "--data-path",
        str(mnist_dir),
        "--checkpoint-every",
        "10",
        "--eval-every",
        "0",
        *TINY,
        "--out",
        str(tmp_path / "run"),
    ]
    assert cli_main([*args, "--steps", "20"]) == 0
    state_path = resolve_checkpoint(tmp_path / "run") / "state.pt"
    state = torch.load(state_path, weights_only=True)
    assert 0 < state["train_seconds"] < 300
    state["train_seconds"] = 1000.0  # as if the earlier processes had trained for 1000 s
    torch.save(state, state_path)
    # (an edited checkpoint must be re-summed: its SHA256SUMS would refuse it)
    write_sums(state_path.parent, ["model.safetensors", "config.json", "state.pt"], "edited by a test")
    capsys.readouterr()
    assert cli_main([*args, "--steps", "40", "--resume", "--time-limit", "900"]) == 0
    assert "stopped at step 21: time limit of 900 s" in capsys.readouterr().out
    assert torch.load(resolve_checkpoint(tmp_path / "run") / "state.pt", weights_only=True)["train_seconds"] > 1000


def test_user_errors_are_one_line_and_exit_2_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    from linear_transformers.commands import eval as eval_command

    bad = [
        (["sample", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
        (["sample", "--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["sample", "--temperature", "-1"], "temperature must be a finite number >= 0"),
        (["sample", "--top-k", "-2"], "--top-k must be >= 0"),
        (["sample", "--n", "0"], "--n must be >= 1"),
        (["sample", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["sample", "--mode", "fast"], "--mode must be rnn or recompute"),
        (["eval", "--batches", "-1"], "--batches must be >= 0"),
        (["eval", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["export", "--onnx", str(tmp_path / "x.json")], "--onnx must name a .onnx file"),
        (["export", "--verify-steps", "-1"], "--verify-steps must be >= 0"),
    ]
    for argv, match in bad:
        cli_error(capsys, argv, match)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):  # --debug: the traceback
        cli_main(["sample", "--top-p", "0", "--debug"])
    monkeypatch.setattr(eval_command, "run_eval", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli_main(["eval"]) == 130 and "eval: interrupted" in capsys.readouterr().err
    monkeypatch.setattr(eval_command, "run_eval", lambda cfg: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not a user error: shown as it is
        cli_main(["eval"])


def test_generate_refuses_sampling_settings_it_cannot_honour():
    model = CausalTransformer(ModelConfig(vocab_size=8, max_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=8)).eval()
    for kwargs, match in [
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(n=0), "n must be"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
    ]:
        with pytest.raises(ValueError, match=f"generate: {match}"):
            model.generate(**{"n": 2, **kwargs})


def test_a_diverging_run_stops_and_keeps_its_finite_checkpoints(tmp_path, mnist_dir, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--data-path",
        str(mnist_dir),
        "--out",
        str(run),
        "--checkpoint-every",
        "2",
        "--eval-every",
        "0",
        *TINY,
    ]
    assert cli_main([*args, "--steps", "4"]) == 0
    good = _weights(run)
    changed = "lr=1000000.0 \\(the run has 0.01\\); warmup=1 \\(the run has 3\\); clip=0.0 \\(the run has 1.0\\)"
    cli_error(
        capsys,
        [*args, "--steps", "40", "--resume", "--lr", "1e6", "--clip", "0", "--warmup", "1"],
        f"resume: .* other settings: {changed}",
    )
    diverging = tmp_path / "diverging"
    line = cli_error(
        capsys,
        [
            "train",
            "--data-path",
            str(mnist_dir),
            "--out",
            str(diverging),
            "--steps",
            "200",
            "--checkpoint-every",
            "2",
            "--eval-every",
            "0",
            *TINY,
            "--lr",
            "1e6",
            "--clip",
            "0",
        ],
        r"the (loss|gradient norm) .* at step \d+ is not finite; stopped before applying it",
    )
    assert "Try a lower --lr" in line
    for ckpt in diverging.glob("step-*"):  # whatever was saved before is finite
        assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values()), ckpt
    assert all(torch.equal(a, b) for a, b in zip(good.values(), _weights(run).values(), strict=True))


def test_checkpoints_are_checked_against_their_checksum(tmp_path, mnist_dir, capsys):
    run = tmp_path / "run"
    cli_main(
        ["train", "--data-path", str(mnist_dir), "--out", str(run), "--steps", "2", "--checkpoint-every", "2", *TINY]
    )
    weights = resolve_checkpoint(run) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # one bit flipped in the middle of the tensors
    weights.write_bytes(bytes(data))
    cli_error(capsys, ["eval", "--checkpoint", str(run)], "model.safetensors does not match the SHA-256")
    weights.write_bytes(bytes(data[: len(data) // 3]))  # truncated
    cli_error(capsys, ["sample", "--checkpoint", str(run)], "model.safetensors does not match the SHA-256")
    cli_error(
        capsys,
        ["train", "--data-path", str(mnist_dir), "--out", str(run), "--steps", "4", "--resume", *TINY],
        "does not match the SHA-256",
    )
    (resolve_checkpoint(run) / "config.json").write_text("{not json")
    cli_error(capsys, ["eval", "--checkpoint", str(run)], r"config.json is not valid JSON .* the checkpoint is damaged")


def test_resume_refuses_what_it_cannot_continue_and_fills_in_the_rest(tmp_path, mnist_dir, capsys):
    run = tmp_path / "run"
    cli_error(
        capsys,
        ["train", "--data-path", str(mnist_dir), "--out", str(run), "--resume", *TINY],
        "holds no run to resume \\(no 'latest' file\\); leave out --resume",
    )
    assert not (run / "log.csv").exists()
    args = ["train", "--data-path", str(mnist_dir), "--out", str(run), "--checkpoint-every", "2", "--eval-every", "0"]
    cli_main([*args, "--steps", "4", *TINY])
    log_before = (run / "log.csv").read_text()
    line = cli_error(
        capsys,
        [*args, "--steps", "6", "--resume", *TINY[:-3], "--optimizer", "radam", "--seq-len", "99", "--d-model", "16"],
        "other settings:",
    )
    for named in ("optimizer='radam' (the run has 'adamw')", "seq_len=99 (the run has 256)", "d_model=16"):
        assert named in line
    assert (run / "log.csv").read_text() == log_before  # nothing touched
    # the model flags and the rest left out: the run's own are used, and it continues
    assert cli_main([*args, "--steps", "6", "--resume", "--no-progress", "--threads", "1"]) == 0
    assert (run / "latest").read_text().strip() == "step-000006"
    assert (run / "log.csv").read_text().startswith(log_before) and len((run / "log.csv").read_text().splitlines()) == 7
    (run / "latest").write_text("../elsewhere/step-000010\n")
    cli_error(capsys, ["eval", "--checkpoint", str(run)], "must name a checkpoint folder of the run")


def test_sigint_writes_a_checkpoint_and_exits_130(tmp_path, mnist_dir):
    run = tmp_path / "run"
    (run / ".step-000002.tmp12345").mkdir(parents=True)  # what a killed checkpoint write leaves
    args = [
        "train",
        "--data-path",
        str(mnist_dir),
        "--out",
        str(run),
        "--steps",
        "100000",
        "--checkpoint-every",
        "10000",
        "--eval-every",
        "0",
        *TINY,
    ]
    proc = _cli(*args)
    deadline = time.time() + 120
    while not (run / "log.csv").exists() or len((run / "log.csv").read_text().splitlines()) < 4:
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "SIGINT at step" in out and "--resume continues" in out and "Traceback" not in out
    step = int(out.split("SIGINT at step ")[1].split(":")[0])
    assert (run / "latest").read_text().strip() == f"step-{step:06d}"  # between the periodic checkpoints
    assert not list(run.glob(".step-*"))  # the stale temporary folder is gone
    again = [
        sys.executable,
        "-m",
        "linear_transformers.cli",
        *args[: -len(TINY)],
        "--steps",
        str(step + 2),
        "--resume",
        "--no-progress",
    ]
    resumed = subprocess.run(again, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (run / "latest").read_text().strip() == f"step-{step + 2:06d}"


def test_eval_runs_from_another_directory_and_takes_a_moved_data_path(tmp_path, mnist_dir, capsys, monkeypatch):
    """The run stores the data path absolute, so eval works from anywhere; --data-path points it at
    data that has moved since."""
    monkeypatch.chdir(tmp_path)
    cli_main(["train", "--data-path", "mnist", "--out", "run", "--steps", "2", "--checkpoint-every", "2", *TINY])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "run"), "--batches", "1"]) == 0
    mnist_dir.rename(tmp_path / "moved")
    cli_error(capsys, ["eval", "--checkpoint", str(tmp_path / "run")], "mnist")
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "run"), "--data-path", str(tmp_path / "moved")]) == 0
    assert "bits/dim" in capsys.readouterr().out


def test_bad_settings_are_one_line_errors(tmp_path, mnist_dir, capsys):
    """What a user can type wrong is named in one line: devices this machine lacks, settings out of
    range, options that do not apply to the model."""
    import torch

    base = ["train", "--data-path", str(mnist_dir), "--out", str(tmp_path / "r"), "--steps", "2", *TINY]
    if not torch.cuda.is_available():
        cli_error(capsys, [*base, "--device", "cuda"], "device 'cuda': .*use --device cpu")
    cli_error(capsys, [*base, "--device", "gpu"], "device must be auto, cpu, cuda or cuda:N, got 'gpu'")
    out_of_range = [
        ("--levels", "1", r"levels must be in \[2, 256\]"),
        ("--warmup", "-5", "warmup must"),
        ("--threads", "-1", r"--threads: must be in \[0, "),
        ("--threads", "100000", r"--threads: must be in \[0, "),
        ("--time-limit", "-1", "time_limit must"),
        ("--lr", "0", "lr must be a finite number > 0"),
        ("--lr", "inf", "lr must"),
    ]
    for option, value, match in out_of_range:
        cli_error(capsys, [*base, option, value], match)
    run = tmp_path / "run"
    cli_main(
        ["train", "--data-path", str(mnist_dir), "--out", str(run), "--steps", "2", "--checkpoint-every", "2", *TINY]
    )
    cli_error(capsys, ["sample", "--checkpoint", str(run), "--prompt", "abc"], "--prompt is for text models")
    cli_error(capsys, ["sample", "--checkpoint", str(run), "--max-new-tokens", "9"], "--max-new-tokens is for text")
    cli_error(
        capsys,
        ["export", "--checkpoint", str(run), "--opset", "3", "--onnx", str(tmp_path / "m.onnx")],
        r"--opset must be in \[13, ",
    )
