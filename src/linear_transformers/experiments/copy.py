"""The copy task (the paper's Figure 2): softmax, linear and LSH attention learn to duplicate a string.

Sequences of up to --max-symbols symbols from --n-symbols, a separator, then the same string again
(`data.copy`). Every method trains on the same stream of batches (one seed), with the paper's set-up:
4 layers, 8 heads, batch 64, RAdam, learning rate 1e-3 dropping to 1e-4. The loss is the
cross-entropy of the copied half (the only part a model can predict); accuracy is the fraction of
copied-half tokens whose most likely prediction is right, on a fixed held-out set.

The default (strings of up to 32 symbols, 1200 updates) finishes in under 30 minutes for the three
methods on 2 CPU cores; --paper sets the paper's task and budget (up to 128 symbols, 10k updates,
the learning-rate drop at 3k), hours on a GPU. A method whose results exist in
--out with the same settings is not trained again (rerun with --fresh), so a stopped run resumes
method by method. Writes copy.csv (curves), copy.png, table.md and settings.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..bench.measure import machine_info
from ..bench.report import fmt, markdown_table, write_csv
from ..cli import apply_preset
from ..data import copy as copy_data
from ..model import CausalTransformer, ModelConfig
from . import load_finished, save_finished

METHODS = {  # name -> ModelConfig fields
    "softmax": dict(attention="causal-softmax"),
    "linear": dict(attention="causal-linear"),
    "lsh-1": dict(attention="causal-lsh", lsh_hashes=1),
    "lsh-4": dict(attention="causal-lsh", lsh_hashes=4),
    "lsh-8": dict(attention="causal-lsh", lsh_hashes=8),
}


@dataclass
class CopySettings:
    methods: tuple[str, ...] = ("softmax", "linear", "lsh-4")
    max_symbols: int = 32  # the paper: 128 (--paper); 32 keeps the default run under 30 minutes here
    n_symbols: int = 10
    n_layers: int = 4
    n_heads: int = 8
    d_model: int = 64
    d_ff: int = 256
    lsh_buckets: int = 8  # LSH chunks of ceil(66 / 8) = 9 positions (33 with --paper's 258)
    batch: int = 64
    steps: int = 1200
    lr: float = 1e-3
    lr_drop_step: int = 800  # the learning rate drops to lr_after from here
    lr_after: float = 1e-4
    eval_every: int = 50
    eval_batches: int = 4
    seed: int = 0
    threads: int = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = CopySettings()
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(d.methods))
    for name in ("max_symbols", "n_symbols", "n_layers", "n_heads", "d_model", "d_ff", "lsh_buckets", "batch",
                 "steps", "lr_drop_step", "eval_every", "eval_batches", "seed", "threads"):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lr-after", type=float, default=d.lr_after)
    p.add_argument("--paper", action="store_true",
                   help="the paper's task and budget: up to 128 symbols, 10000 updates, lr drop at 3000")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a tiny run in seconds (the tests run it)")
    p.add_argument("--fresh", action="store_true", help="train every method again even if its results exist")
    p.add_argument("--out", type=Path, default=Path("results/copy"))


def settings_from(args: argparse.Namespace) -> CopySettings:
    s = CopySettings(**{k: getattr(args, k) for k in CopySettings.__dataclass_fields__ if k != "methods"},
                     methods=tuple(args.methods))  # fmt: skip
    given = getattr(args, "given", set())  # options given on the command line win over the presets
    if args.paper:
        s = apply_preset(s, dict(max_symbols=128, steps=10000, lr_drop_step=3000), given)
    if args.quick:
        s = apply_preset(s, dict(max_symbols=8, n_layers=2, n_heads=2, d_model=16, d_ff=32, batch=8, steps=12,
                                 lr_drop_step=8, eval_every=6, eval_batches=1, lsh_buckets=4), given)  # fmt: skip
    return s


def model_config(s: CopySettings, method: str) -> ModelConfig:
    return ModelConfig(
        vocab_size=copy_data.vocab_size(s.n_symbols), max_len=copy_data.seq_len(s.max_symbols), d_model=s.d_model,
        n_layers=s.n_layers, n_heads=s.n_heads, d_ff=s.d_ff, lsh_buckets=s.lsh_buckets, **METHODS[method],
    )  # fmt: skip


def masked_loss_and_accuracy(model: CausalTransformer, tokens: torch.Tensor, mask: torch.Tensor):
    logits = model(tokens)  # [B, T, V]: row t predicts tokens[:, t]
    loss = F.cross_entropy(logits[mask], tokens[mask])
    correct = (logits[mask].argmax(-1) == tokens[mask]).float().mean()
    return loss, correct


def train_method(s: CopySettings, method: str, log=print) -> list[dict]:
    """Train one method on the shared stream; returns its curve (one row per evaluation)."""
    torch.manual_seed(s.seed)  # the same initial draws for every method where shapes agree
    model = CausalTransformer(model_config(s, method))
    opt = torch.optim.RAdam(model.parameters(), lr=s.lr)
    stream = torch.Generator().manual_seed(s.seed)  # the same batches for every method
    held_out = torch.Generator().manual_seed(s.seed + 10_000)
    evaluation = [copy_data.copy_batch(s.batch, s.max_symbols, s.n_symbols, held_out) for _ in range(s.eval_batches)]
    rows, train_losses, elapsed = [], [], 0.0
    for step in range(1, s.steps + 1):
        if step == s.lr_drop_step:
            for group in opt.param_groups:
                group["lr"] = s.lr_after
        tokens, mask = copy_data.copy_batch(s.batch, s.max_symbols, s.n_symbols, stream)
        t0 = time.perf_counter()
        model.train()
        loss, _ = masked_loss_and_accuracy(model, tokens, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        elapsed += time.perf_counter() - t0
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"copy task, {method}: the loss became {loss.item()} at step {step}")
        train_losses.append(loss.item())
        if step % s.eval_every == 0 or step == s.steps:
            model.eval()
            with torch.no_grad():
                results = [masked_loss_and_accuracy(model, t, m) for t, m in evaluation]
            eval_loss = sum(r[0].item() for r in results) / len(results)
            accuracy = sum(r[1].item() for r in results) / len(results)
            train_loss = sum(train_losses) / len(train_losses)
            train_losses = []
            rows.append({"method": method, "step": step, "train_loss": train_loss, "eval_loss": eval_loss,
                         "eval_accuracy": accuracy, "train_seconds": elapsed})  # fmt: skip
            log(f"  {method:8s} step {step:6d}  train loss {train_loss:.4f}  held-out loss {eval_loss:.4f}  "
                f"accuracy {accuracy:.4f}  {elapsed / step:.3f} s/step")  # fmt: skip
    return rows


def plot(rows: list[dict], path: Path, s: CopySettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        r = [x for x in rows if x["method"] == method]
        steps = [x["step"] for x in r]
        ax1.plot(steps, [x["train_loss"] for x in r], label=method)
        ax2.plot(steps, [x["eval_accuracy"] for x in r], label=method)
    ax1.set_yscale("log")
    ax1.set_ylabel("cross-entropy of the copied half (training)")
    ax2.set_ylabel("held-out accuracy of the copied half")
    for ax in (ax1, ax2):
        ax.set_xlabel("gradient steps")
        ax.axvline(s.lr_drop_step, color="grey", lw=0.8, ls=":")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Copy task: up to {s.max_symbols} symbols, {s.n_layers} layers, {s.n_heads} heads, batch {s.batch}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> str:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        r = [x for x in rows if x["method"] == method]
        last = r[-1]
        out.append([method, str(last["step"]), fmt(last["eval_loss"], 4), fmt(100 * last["eval_accuracy"], 2) + "%",
                    fmt(last["train_seconds"] / last["step"], 3)])  # fmt: skip
    return markdown_table(
        ["method", "steps", "held-out loss (copied half)", "held-out accuracy (copied half)", "s/step"], out
    )


def main(args: argparse.Namespace) -> int:
    s = settings_from(args)
    if s.threads:
        torch.set_num_threads(s.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"copy task on {info['cpu']}, {torch.get_num_threads()} threads, torch {info['torch']}")
    settings = {k: v for k, v in asdict(s).items() if k not in ("methods", "threads")}
    rows = []
    for method in s.methods:
        done = args.out / f"{method}.json"
        saved = None if args.fresh else load_finished(done, settings)
        if saved is not None:
            print(f"  {method}: results exist in {done} (same settings), not trained again; --fresh retrains")
            rows += saved
            continue
        print(f"  {method}: training {s.steps} steps")
        curve = train_method(s, method)
        save_finished(done, settings, curve)
        rows += curve
    write_csv(args.out / "copy.csv", rows)
    (args.out / "settings.json").write_text(json.dumps({**settings, "machine": info}, indent=2))
    table = summary(rows)
    (args.out / "table.md").write_text(
        f"Copy task, {info['cpu']}, {torch.get_num_threads()} threads, torch {info['torch']}\n\n" + table
    )
    plot(rows, args.out / "copy.png", s)
    print()
    print(table)
    print(f"wrote {args.out / 'copy.csv'}, {args.out / 'copy.png'}, {args.out / 'table.md'}")
    return 0
