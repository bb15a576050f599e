"""Image generation (the paper's Table 1, MNIST; Table 4, CIFAR-10): softmax, LSH and linear attention
trained on the same budget, then test bits/dim, generation speed and unconditional samples.

Each method is an autoregressive pixel model with the discretised mixture of logistics (10
components) trained by `linear_transformers.train` (RAdam, checkpoints, exact resume) on the same
data order; the budget is a time limit per method (--minutes) and a step cap (--steps). Then:
test bits/dim on --eval-images test images, --samples unconditional samples (a PNG grid per
method), and generation speed in images/s at that batch (linear attention as an RNN, softmax with
its KV cache and by recomputing the prefix, LSH by recomputing, as in the paper).

The default fits about 30 minutes of training per method on 2 CPU cores (a 4-layer, 128-wide model,
batch 16); --paper sets the paper's model and optimiser (8 layers, 8 heads, d_model 256, d_ff 1024,
RAdam 1e-4, batch 10) and no time limit, for a GPU. `--dataset cifar10 --data-path DIR` reads the
CIFAR-10 binary batches. A method that finished with the same settings is not trained again
(--fresh retrains); one that was stopped resumes from its last checkpoint. Writes image.csv,
table.md, samples_<method>.png, samples.png (all methods side by side) and the runs under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .. import data as datasets
from ..bench.measure import machine_info
from ..bench.report import fmt, markdown_table, write_csv
from ..cli import apply_preset, image_grid, write_png
from ..model import ModelConfig
from ..train import TrainConfig, evaluate, load_model, train
from . import finished_or_run

METHODS = {  # name -> (ModelConfig fields, generation mode)
    "softmax": (dict(attention="causal-softmax"), "recompute"),
    "softmax-cache": (dict(attention="causal-softmax"), "rnn"),  # the softmax model, generating with its KV cache
    "lsh-1": (dict(attention="causal-lsh", lsh_hashes=1), "recompute"),
    "lsh-4": (dict(attention="causal-lsh", lsh_hashes=4), "recompute"),
    "linear": (dict(attention="causal-linear"), "rnn"),
}
PAPER_BPD = {  # the paper's Table 1 (MNIST) and Table 4 (CIFAR-10): test bits/dim
    "mnist": {"softmax": 0.621, "lsh-1": 0.745, "lsh-4": 0.676, "linear": 0.644},
    "cifar10": {"softmax": 3.47, "lsh-1": 3.39, "lsh-4": 3.51, "linear": 3.40},
}
PAPER_IMAGES_PER_S = {  # the same tables: images/s on the paper's GPU
    "mnist": {"softmax": 0.45, "lsh-1": 0.68, "lsh-4": 0.27, "linear": 142.8},
    "cifar10": {"softmax": 0.004, "lsh-1": 0.015, "lsh-4": 0.005, "linear": 17.85},
}


@dataclass
class ImageSettings:
    dataset: str = "mnist"
    data_path: str = ""
    methods: tuple[str, ...] = ("softmax", "lsh-1", "lsh-4", "linear")
    n_layers: int = 4
    n_heads: int = 8
    d_model: int = 128
    d_ff: int = 512
    lsh_chunk: int = 32
    batch: int = 16
    lr: float = 1e-3
    steps: int = 100_000
    minutes: float = 30.0  # training time limit per method (0: none)
    eval_images: int = 1000
    samples: int = 16
    seed: int = 0
    image_size: int = 0  # --quick shrinks the images
    levels: int = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ImageSettings()
    p.add_argument("--dataset", choices=["mnist", "fashion-mnist", "cifar10"], default=d.dataset)
    p.add_argument("--data-path", default="", help="IDX folder (fashion-mnist) or CIFAR-10 binary batches (cifar10)")
    p.add_argument(
        "--methods", nargs="+", choices=[m for m in METHODS if m != "softmax-cache"], default=list(d.methods)
    )
    for name in ("n_layers", "n_heads", "d_model", "d_ff", "lsh_chunk", "batch", "steps", "eval_images", "samples",
                 "seed"):  # fmt: skip
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--minutes", type=float, default=d.minutes, help="training time limit per method (0: none)")
    p.add_argument("--paper", action="store_true",
                   help="the paper's model and optimiser: 8 layers, d_model 256, RAdam 1e-4, batch 10")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="a tiny run in seconds (the tests run it)")
    p.add_argument("--fresh", action="store_true", help="train every method again")
    p.add_argument("--out", type=Path, default=None, help="default results/image-<dataset>")


def settings_from(args: argparse.Namespace) -> ImageSettings:
    fields = {k: getattr(args, k) for k in ImageSettings.__dataclass_fields__ if hasattr(args, k) and k != "methods"}
    s = ImageSettings(**fields, methods=tuple(args.methods))
    given = getattr(args, "given", set())  # options given on the command line win over the presets
    if args.paper:
        s = apply_preset(s, dict(n_layers=8, n_heads=8, d_model=256, d_ff=1024, lr=1e-4, batch=10, minutes=0.0), given)
    if args.quick:
        s = apply_preset(s, dict(n_layers=1, n_heads=2, d_model=16, d_ff=32, lsh_chunk=4, batch=4, steps=3, minutes=0.0,
                                 eval_images=8, samples=2, image_size=4, levels=8), given)  # fmt: skip
    return s


def model_config(s: ImageSettings, method: str, d: datasets.SequenceData) -> ModelConfig:
    return ModelConfig(
        vocab_size=d.vocab_size, max_len=d.seq_len, d_model=s.d_model, n_layers=s.n_layers, n_heads=s.n_heads,
        d_ff=s.d_ff, head="mol", lsh_chunk=s.lsh_chunk, **METHODS[method][0],
    )  # fmt: skip


def train_config(s: ImageSettings, run: Path, resume: bool) -> TrainConfig:
    return TrainConfig(
        data=s.dataset, data_path=s.data_path, image_size=s.image_size, levels=s.levels, conditional=False,
        out=str(run), steps=s.steps, batch_size=s.batch, lr=s.lr, warmup=min(100, s.steps // 10),
        schedule="constant", eval_every=0, eval_batches=1, checkpoint_every=200, time_limit=60 * s.minutes,
        resume=resume, seed=s.seed, progress=False,
    )  # fmt: skip


def images_per_s(model, mode: str, n: int) -> tuple[float, torch.Tensor]:
    torch.manual_seed(0)
    start = time.perf_counter()
    tokens = model.generate(n=n, mode=mode, generator=torch.Generator().manual_seed(0))
    return n / (time.perf_counter() - start), tokens


def run_method(s: ImageSettings, method: str, d: datasets.SequenceData, out: Path) -> list[dict]:
    folder = out / method
    run = folder / "run"
    resume = (run / "latest").exists()
    print(f"  {method}: {'resuming' if resume else 'training'} (at most {s.steps} steps"
          + (f", {s.minutes:g} minutes)" if s.minutes else ")"), flush=True)  # fmt: skip
    start = time.perf_counter()
    checkpoint = train(model_config(s, method, d), train_config(s, run, resume), data=d)
    # the training time of every process of this run (resumes included), as the checkpoint records it
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    train_seconds = float(state.get("train_seconds", time.perf_counter() - start))
    model, config = load_model(run)
    batches = max(1, s.eval_images // s.batch)
    eval_cfg = replace(train_config(s, run, True), batch_size=min(s.batch, s.eval_images))
    bpd = evaluate(model, d, eval_cfg, torch.device("cpu"), batches=batches)
    rows = []
    modes = [(method, METHODS[method][1])] + ([("softmax-cache", "rnn")] if method == "softmax" else [])
    for name, mode in modes:
        speed, tokens = images_per_s(model, mode, s.samples)
        if name == method:
            grid = image_grid(d.to_images(tokens), rows=max(1, int(s.samples**0.5)))
            write_png(out / f"samples_{method}.png", grid, scale=4)
        rows.append({
            "method": name, "dataset": s.dataset, "steps": config["step"], "train_seconds": train_seconds,
            "test_bpd": bpd, "eval_images": batches * min(s.batch, s.eval_images), "images_per_s": speed,
            "generation_batch": s.samples, "paper_bpd": PAPER_BPD.get(s.dataset, {}).get(name, ""),
            "paper_images_per_s": PAPER_IMAGES_PER_S.get(s.dataset, {}).get(name, ""),
        })  # fmt: skip
        print(f"  {name:14s} step {config['step']:6d}  test {bpd:.4f} bits/dim  {speed:8.3f} images/s", flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    base = next((r["images_per_s"] for r in rows if r["method"] == "softmax"), None)
    body = []
    for r in rows:
        speedup = fmt(r["images_per_s"] / base, 1) + "x" if base else "-"
        body.append([r["method"], str(r["steps"]), fmt(r["train_seconds"] / 60, 1), fmt(r["test_bpd"], 3),
                     str(r["paper_bpd"] or "-"), fmt(r["images_per_s"], 3), speedup,
                     str(r["paper_images_per_s"] or "-")])  # fmt: skip
    return markdown_table(
        ["method", "steps", "train min", "test bits/dim", "paper bits/dim", "images/s", "speedup", "paper images/s"],
        body,
    )


def plot_samples(out: Path, methods: list[str]) -> Path:
    """The methods' sample grids (samples_<method>.png) side by side in one figure, samples.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(methods), figsize=(2.7 * len(methods), 3.1), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        ax.imshow(plt.imread(out / f"samples_{method}.png"), cmap="gray", interpolation="nearest")
        ax.set_title(method)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "samples.png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out / "samples.png"


def main(args: argparse.Namespace) -> int:
    s = settings_from(args)
    out = args.out or Path(f"results/image-{s.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    d = datasets.load(s.dataset, s.data_path or None, size=s.image_size, levels=s.levels)
    info = machine_info()
    print(f"{s.dataset}: {len(d.train)} train / {len(d.test)} test images, {d.seq_len} tokens each, "
          f"{d.vocab_size} levels; {info['cpu']}, {torch.get_num_threads()} threads")  # fmt: skip
    settings = asdict(s)
    del settings["methods"]
    rows = []
    for method in s.methods:
        rows += finished_or_run(out, method, settings, args.fresh, lambda method=method: run_method(s, method, d, out))
    write_csv(out / "image.csv", rows)
    table = summary(rows)
    (out / "table.md").write_text(
        f"Image generation, {s.dataset}, {info['cpu']}, {torch.get_num_threads()} threads, torch {info['torch']}; "
        f"settings {json.dumps(settings)}\n\n" + table
    )
    print()
    print(table)
    figure = plot_samples(out, s.methods)
    grids = ", ".join(f"samples_{m}.png" for m in s.methods)
    print(f"wrote {out / 'image.csv'}, {out / 'table.md'}, {figure} and {grids}")
    return 0
