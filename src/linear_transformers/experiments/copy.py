"""The copy task (the paper's Figure 2): softmax, linear and LSH attention learn to duplicate a string.

Strings of --min-symbols .. --max-symbols symbols from --n-symbols, a separator, then the same string
again (`data.copy`). Every method trains for the same number of steps on the same stream of batches,
once per seed (--seeds), with RAdam at --lr dropping to --lr-after at --lr-drop-step, as the paper.
The loss is the cross-entropy of the copied half (the only part a model can predict); accuracy is
the fraction of copied-half tokens whose most likely prediction is right, on a fixed held-out set.

The default is sized to converge on 2 CPU cores in about 20 minutes for four methods and two seeds
(strings of 8-16 symbols, 2 layers of 2 heads 32 wide, 5000 steps; --jobs runs seeds and methods
in parallel processes). --paper sets the paper's task and budget: sequences of 128 tokens (strings
of 32-63 symbols, as the authors' public code), 4 layers, 4 heads of 32, 10k steps with the drop at
3k, which is hours on a CPU; the command prints its estimate first. A run whose results exist in
--out with the same settings is not trained again (--fresh retrains), so a stopped experiment
resumes run by run. Writes copy.csv (curves), copy.png (mean and min-max band over seeds),
table.md and settings.json under --out (default results/copy; --quick: results/copy-quick).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..commands import apply_preset
from ..data import copy as copy_data
from ..model import CausalTransformer, ModelConfig
from ..options import add_options, count, from_args, option
from ..results import fmt, machine_info, markdown_table, provenance, write_csv, write_run_record
from ..train import resolve_device
from . import RunSwitches, load_finished, save_finished

METHODS = {  # name -> ModelConfig fields
    "softmax": dict(attention="causal-softmax"),
    "linear": dict(attention="causal-linear"),
    "lsh-1": dict(attention="causal-lsh", lsh_hashes=1),
    "lsh-4": dict(attention="causal-lsh", lsh_hashes=4),
    "lsh-8": dict(attention="causal-lsh", lsh_hashes=8),
}
PAPER = dict(
    max_symbols=63,
    min_symbols=32,
    n_layers=4,
    n_heads=4,
    d_model=128,
    d_ff=512,
    lsh_buckets=8,
    steps=10000,
    lr_drop_step=3000,
)


@dataclass
class CopySettings:
    methods: tuple[str, ...] = option(
        ("softmax", "linear", "lsh-1", "lsh-4"), "the attention of each model", choices=list(METHODS)
    )
    seeds: tuple[int, ...] = option((0, 1), "one run per method and seed")
    max_symbols: int = count(16, "longest string copied (the paper: 63, --paper; 128-token sequences)")
    min_symbols: int = count(8, "shortest string copied (a quarter of the sequence, as the authors' code)")
    n_symbols: int = count(10, "distinct symbols of the strings")
    n_layers: int = count(2, "transformer blocks")
    n_heads: int = count(2, "attention heads per block")
    d_model: int = count(64, "width of the residual stream (heads of 32 as the paper's: 8-wide heads learn slower)")
    d_ff: int = count(256, "width of each block's feed-forward layer")
    lsh_buckets: int = count(8, "LSH buckets per sequence (chunks of ceil(34 / 8) = 5 positions; --paper: of 16)")
    batch: int = count(64, "sequences per training step")
    steps: int = count(5000, "training steps of every run")
    lr: float = option(1e-3, "learning rate (RAdam)")
    lr_drop_step: int = option(
        4000, "the learning rate drops to --lr-after from this step (earlier froze linear short of softmax)"
    )
    lr_after: float = option(1e-4, "the learning rate after --lr-drop-step")
    eval_every: int = option(100, "steps between held-out evaluations")
    eval_batches: int = count(4, "held-out batches per evaluation")
    device: str = option("cpu", "where training runs: cpu, cuda, cuda:N or auto")
    jobs: int = count(1, "runs trained at once, each in its own process with threads / jobs threads")
    threads: int = option(0, "CPU threads in all (0: torch's default)")


@dataclass
class CopyRun(RunSwitches):
    paper: bool = option(
        False,
        "the paper's task and budget: 128-token sequences, 4 layers x 4 heads of 32, 10000 updates, lr drop at 3000",
    )
    out: Path | None = option(None, "default results/copy (--quick: results/copy-quick)")


# what a result depends on: not where or how parallel it ran
NOT_SETTINGS = ("methods", "seeds", "device", "jobs", "threads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, CopySettings, title="settings (what a result depends on, and where it runs)")
    add_options(p, CopyRun, title="this run")


def settings_from(args: argparse.Namespace) -> CopySettings:
    s = from_args(CopySettings, args)
    given = getattr(args, "given", set())  # options given on the command line win over the presets
    if args.paper:
        s = apply_preset(s, PAPER, given)
    if args.quick:
        s = apply_preset(
            s,
            dict(
                max_symbols=8,
                min_symbols=1,
                n_layers=2,
                n_heads=2,
                d_model=16,
                d_ff=32,
                batch=8,
                steps=12,
                lr_drop_step=8,
                eval_every=6,
                eval_batches=1,
                lsh_buckets=4,
                seeds=(0,),
            ),
            given,
        )
    if not 1 <= s.min_symbols <= s.max_symbols:
        raise ValueError(f"copy: --min-symbols must be in 1 .. --max-symbols={s.max_symbols}, got {s.min_symbols}")
    if s.jobs < 1:
        raise ValueError(f"copy: --jobs must be >= 1, got {s.jobs}")
    resolve_device(s.device)
    return s


def model_config(s: CopySettings, method: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=copy_data.vocab_size(s.n_symbols),
        max_len=copy_data.seq_len(s.max_symbols),
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        d_ff=s.d_ff,
        lsh_buckets=s.lsh_buckets,
        **METHODS[method],
    )


def masked_loss_and_accuracy(model: CausalTransformer, tokens: torch.Tensor, mask: torch.Tensor):
    logits = model(tokens)  # [B, T, V]: row t predicts tokens[:, t]
    loss = F.cross_entropy(logits[mask], tokens[mask])
    correct = (logits[mask].argmax(-1) == tokens[mask]).float().mean()
    return loss, correct


def batch_of(s: CopySettings, generator: torch.Generator, device: torch.device):
    tokens, mask = copy_data.copy_batch(s.batch, s.max_symbols, s.n_symbols, generator, min_symbols=s.min_symbols)
    return tokens.to(device), mask.to(device)


def train_method(s: CopySettings, method: str, seed: int = 0, log=print, stop_after: int = 0) -> list[dict]:
    """Train one method on seed's stream of batches; returns its curve (one row per evaluation).
    stop_after > 0 stops after that many steps (the time estimate)."""
    device = resolve_device(s.device)
    torch.manual_seed(seed)  # the same initial draws for every method where shapes agree
    model = CausalTransformer(model_config(s, method)).to(device)
    opt = torch.optim.RAdam(model.parameters(), lr=s.lr)
    stream = torch.Generator().manual_seed(seed)  # the same batches for every method
    held_out = torch.Generator().manual_seed(seed + 10_000)
    evaluation = [batch_of(s, held_out, device) for _ in range(s.eval_batches)]
    rows, train_losses, elapsed = [], [], 0.0
    for step in range(1, (stop_after or s.steps) + 1):
        if step == s.lr_drop_step:
            for group in opt.param_groups:
                group["lr"] = s.lr_after
        tokens, mask = batch_of(s, stream, device)
        t0 = time.perf_counter()
        model.train()
        loss, _ = masked_loss_and_accuracy(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()  # waits for the device: the step is done
        elapsed += time.perf_counter() - t0
        if not math.isfinite(value):
            raise RuntimeError(f"copy task, {method}, seed {seed}: the loss became {value} at step {step}")
        train_losses.append(value)
        if step % s.eval_every == 0 or step == s.steps:
            model.eval()
            with torch.no_grad():
                results = [masked_loss_and_accuracy(model, t, m) for t, m in evaluation]
            eval_loss = sum(r[0].item() for r in results) / len(results)
            accuracy = sum(r[1].item() for r in results) / len(results)
            train_loss = sum(train_losses) / len(train_losses)
            train_losses = []
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "step": step,
                    "train_loss": train_loss,
                    "eval_loss": eval_loss,
                    "eval_accuracy": accuracy,
                    "train_seconds": elapsed,
                }
            )
            log(
                f"  {method:8s} seed {seed}  step {step:6d}  train loss {train_loss:.4f}  held-out loss "
                f"{eval_loss:.4f}  accuracy {accuracy:.4f}  {elapsed / step:.3f} s/step",
                flush=True,
            )
    return rows if not stop_after else [{"train_seconds": elapsed, "step": stop_after}]


def estimate_seconds(s: CopySettings, runs: list[tuple[str, int]]) -> float:
    """Seconds all runs will take here: a few timed steps of each method, scaled to the steps."""
    total = 0.0
    for method in dict.fromkeys(m for m, _ in runs):
        n = sum(1 for m, _ in runs if m == method)
        probe = train_method(s, method, 0, log=lambda *a, **k: None, stop_after=6)[0]
        total += n * probe["train_seconds"] / probe["step"] * s.steps
    return total / s.jobs


def _run(s: CopySettings, method: str, seed: int, path: Path, settings: dict) -> list[dict]:
    """One run in a worker process: threads / jobs threads; saves its rows when it finishes."""
    torch.set_num_threads(max(1, (s.threads or torch.get_num_threads()) // s.jobs))
    rows = train_method(s, method, seed)
    save_finished(path, settings, rows)
    return rows


def by_method(rows: list[dict]) -> dict[str, dict[int, list[dict]]]:
    """rows -> {method: {seed: curve}}, in the order they came."""
    out: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    return out


def plot(rows: list[dict], path: Path, s: CopySettings) -> None:
    """Training loss and held-out accuracy against steps: the mean over seeds, and a band from the
    lowest to the highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method, seeds in by_method(rows).items():
        curves = list(seeds.values())
        n = min(len(c) for c in curves)
        steps = [r["step"] for r in curves[0][:n]]
        for ax, key in ((ax1, "eval_loss"), (ax2, "eval_accuracy")):
            values = torch.tensor([[r[key] for r in c[:n]] for c in curves])
            (line,) = ax.plot(steps, values.mean(0), label=f"{method} ({len(curves)} seeds)")
            if len(curves) > 1:
                ax.fill_between(steps, values.min(0).values, values.max(0).values, color=line.get_color(), alpha=0.2)
    ax1.set_yscale("log")
    ax1.set_ylabel("held-out cross-entropy of the copied half")
    ax2.set_ylabel("held-out accuracy of the copied half")
    for ax in (ax1, ax2):
        ax.set_xlabel("gradient steps")
        ax.axvline(s.lr_drop_step, color="grey", lw=0.8, ls=":")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"Copy task: strings of {s.min_symbols}-{s.max_symbols} symbols, {s.n_layers} layers, "
        f"{s.n_heads} heads of {s.d_model // s.n_heads}, batch {s.batch}; band: min-max over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def steps_to(curve: list[dict], accuracy: float) -> int | None:
    return next((r["step"] for r in curve if r["eval_accuracy"] >= accuracy), None)


def summary(rows: list[dict]) -> str:
    """Per method: the final held-out loss and accuracy (mean, and min-max over seeds), the steps to
    reach 99% held-out accuracy, and the training time per step."""
    out = []
    for method, seeds in by_method(rows).items():
        last = [c[-1] for c in seeds.values()]
        loss = [r["eval_loss"] for r in last]
        acc = [100 * r["eval_accuracy"] for r in last]
        reach = [steps_to(c, 0.99) for c in seeds.values()]
        reached = "/".join(str(x) if x is not None else "-" for x in reach)
        spread = lambda v, d: f"{fmt(sum(v) / len(v), d)} ({fmt(min(v), d)}-{fmt(max(v), d)})"  # noqa: E731
        out.append(
            [
                method,
                str(len(last)),
                str(last[0]["step"]),
                spread(loss, 4),
                spread(acc, 2),
                reached,
                fmt(sum(r["train_seconds"] / r["step"] for r in last) / len(last), 3),
            ]
        )
    return markdown_table(
        [
            "method",
            "seeds",
            "steps",
            "held-out loss, mean (min-max)",
            "held-out accuracy %, mean (min-max)",
            "steps to 99% (per seed)",
            "s/step",
        ],
        out,
    )


def main(args: argparse.Namespace) -> int:
    started = provenance(getattr(args, "command_line", None))  # (the checkout may move on while it runs)
    s = settings_from(args)
    out = args.out or Path("results/copy-quick" if args.quick else "results/copy")
    if s.threads:
        torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(
        f"copy task on {info['cpu']} ({s.device}), {torch.get_num_threads()} threads, {s.jobs} job(s), "
        f"torch {info['torch']}"
    )
    settings = {k: v for k, v in asdict(s).items() if k not in NOT_SETTINGS}
    runs = [(method, seed) for method in s.methods for seed in s.seeds]
    results: dict[tuple[str, int], list[dict]] = {}
    todo = []
    for method, seed in runs:
        done = out / f"{method}-seed{seed}.json"
        saved = None if args.fresh else load_finished(done, {**settings, "seed": seed})
        if saved is not None:
            print(
                f"  {method}, seed {seed}: results exist in {done} (same settings), not trained again; --fresh retrains"
            )
            results[method, seed] = saved
        else:
            todo.append((method, seed, done))
    if todo:
        estimate = estimate_seconds(s, [(m, seed) for m, seed, _ in todo])
        print(
            f"  training {len(todo)} run(s) of {s.steps} steps, estimated {estimate / 60:.1f} minutes here", flush=True
        )
    if s.jobs > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(s.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {
                (m, seed): pool.submit(_run, s, m, seed, path, {**settings, "seed": seed}) for m, seed, path in todo
            }
            for key, future in futures.items():
                results[key] = future.result()
    else:
        for method, seed, path in todo:
            print(f"  {method}, seed {seed}: training {s.steps} steps", flush=True)
            results[method, seed] = train_method(s, method, seed)
            save_finished(path, {**settings, "seed": seed}, results[method, seed])
    rows = [r for key in runs for r in results[key]]
    write_csv(out / "copy.csv", rows)
    (out / "settings.json").write_text(json.dumps({**asdict(s), "machine": info}, indent=2))
    table = summary(rows)
    (out / "table.md").write_text(
        f"Copy task, {info['cpu']}, {s.device}, torch {info['torch']}; settings {json.dumps(settings)}\n\n" + table
    )
    plot(rows, out / "copy.png", s)
    write_run_record(out, started, models={m: model_config(s, m).to_dict() for m in s.methods})
    print()
    print(table)
    print(f"wrote {out / 'copy.csv'}, {out / 'copy.png'}, {out / 'table.md'}, {out / 'run.json'}")
    return 0
