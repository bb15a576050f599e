"""Image generation (the paper's Table 1, MNIST; Table 2, CIFAR-10): softmax, LSH and linear attention
trained on the same budget, then test bits/dim, generation speed and unconditional samples.

Each method is an autoregressive pixel model with the discretised mixture of logistics (10
components) trained by `linear_transformers.train` (RAdam, checkpoints, exact resume) on the same
data order. The budget is the same number of steps for every method (--steps, or --epochs of the
training set) and, optionally, a time limit per method (--minutes; then the methods get equal
time, not equal steps, and the table says so). Then: test bits/dim on --eval-images test images
(0: all of them), --samples unconditional samples (a PNG grid per method), and generation speed
in images/s at that batch (linear attention as an RNN, softmax with its KV cache and by
recomputing the prefix, LSH by recomputing, as in the paper). With --eval-every, the held-out
bits/dim on the first --curve-images test images is logged during training and plotted against
steps (curves.png), which shows whether a method had stopped improving.

The default fits about 30 minutes of training per method on 2 CPU cores (a 4-layer, 128-wide model,
batch 16); --paper sets the paper's model, optimiser and budget (MNIST: 8 layers, CIFAR-10: 16;
8 heads, d_model 256, d_ff 1024, RAdam 1e-4, batch 10, 250 epochs, all test images), days on a GPU;
the command prints its estimate on --device first. `--dataset cifar10 --data-path DIR` reads the
CIFAR-10 binary batches or the "python" batches (without running their pickle code). A method that
finished with the same settings is not trained again (--fresh retrains); one that was stopped
resumes from its last checkpoint. Writes image.csv, table.md, curves.png, samples_<method>.png,
samples.png (all methods side by side) and the runs under --out (default results/image-<dataset>;
--quick: results/image-<dataset>-quick).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import data as datasets
from ..checkpoint import load_model
from ..commands import apply_preset
from ..data.images import image_grid, write_png
from ..model import CausalTransformer, ModelConfig
from ..options import add_options, count, from_args, option
from ..results import fmt, machine_info, markdown_table, provenance, write_csv, write_run_record
from ..train import TrainConfig, resolve_device, train
from . import RunSwitches, finished_or_run, load_finished

METHODS = {  # name -> (ModelConfig fields, generation mode)
    "softmax": (dict(attention="causal-softmax"), "recompute"),
    "softmax-cache": (dict(attention="causal-softmax"), "rnn"),  # the softmax model, generating with its KV cache
    "lsh-1": (dict(attention="causal-lsh", lsh_hashes=1), "recompute"),
    "lsh-4": (dict(attention="causal-lsh", lsh_hashes=4), "recompute"),
    "linear": (dict(attention="causal-linear"), "rnn"),
}
PAPER_BPD = {  # the paper's Table 1 (MNIST) and Table 2 (CIFAR-10): test bits/dim
    "mnist": {"softmax": 0.621, "lsh-1": 0.745, "lsh-4": 0.676, "linear": 0.644},
    "cifar10": {"softmax": 3.47, "lsh-1": 3.39, "lsh-4": 3.51, "linear": 3.40},
}
PAPER_IMAGES_PER_S = {  # the same tables: images/s on the paper's GPU
    "mnist": {"softmax": 0.45, "lsh-1": 0.68, "lsh-4": 0.27, "linear": 142.8},
    "cifar10": {"softmax": 0.004, "lsh-1": 0.015, "lsh-4": 0.005, "linear": 17.85},
}


@dataclass
class ImageSettings:
    dataset: str = option("mnist", "the images", choices=["mnist", "fashion-mnist", "cifar10"])
    data_path: str = option("", "IDX folder (fashion-mnist) or CIFAR-10 binary or python batches (cifar10)")
    methods: tuple[str, ...] = option(
        ("softmax", "lsh-1", "lsh-4", "linear"),
        "the attention of each model",
        choices=[m for m in METHODS if m != "softmax-cache"],
    )
    n_layers: int = count(4, "transformer blocks")
    n_heads: int = count(8, "attention heads per block")
    d_model: int = count(128, "width of the residual stream")
    d_ff: int = count(512, "width of each block's feed-forward layer")
    norm: str = option(
        "pre",
        "layer norm before each sublayer (pre) or after the residual add (post, the paper's)",
        choices=["pre", "post"],
    )
    feature_map: str = option("elu", "phi of linear attention (a name in feature_maps.FEATURE_MAPS)")
    lsh_chunk: int = count(32, "sorted positions per LSH chunk")
    batch: int = count(16, "images per training step")
    lr: float = option(1e-3, "peak learning rate (RAdam)")
    schedule: str = option(
        "constant",
        "learning rate after 100 warm-up steps: constant, cosine (to 10% of lr) or linear (to 0)",
        choices=["constant", "cosine", "linear"],
    )
    steps: int = count(100_000, "training steps per method")
    epochs: float = option(0.0, "> 0: train this many epochs of the training set (overrides --steps)")
    minutes: float = option(30.0, "training time limit per method (0: none; then the methods get equal time)")
    eval_images: int = option(0, "test images scored at the end (0: all)")
    eval_every: int = option(0, "steps between held-out evaluations during training (0: none)")
    curve_images: int = count(160, "test images of each evaluation during training")
    samples: int = count(16, "unconditional samples drawn per method (and timed)")
    seed: int = option(0, "seed of the initialisation, data order and sampling")
    image_size: int = option(0, "> 0: average-pool the images to this side (14 halves MNIST: 196 tokens)")
    levels: int = option(0, "> 0: quantise pixels to this many levels (0 keeps 256)")
    device: str = option("cpu", "where training, evaluation and timing run: cpu, cuda or auto")
    jobs: int = count(1, "methods trained at once, each in its own process (threads split between them)")


@dataclass
class ImageRun(RunSwitches):
    paper: bool = option(
        False,
        "the paper's model, optimiser and budget: 8 layers (CIFAR-10: 16), d_model 256, "
        "RAdam 1e-4, batch 10, 250 epochs, all test images",
    )
    out: Path | None = option(None, "default results/image-<dataset> (--quick: results/image-<dataset>-quick)")


# what a result depends on: not where or how parallel it ran
NOT_SETTINGS = ("methods", "device", "jobs")
PAPER = dict(n_layers=8, n_heads=8, d_model=256, d_ff=1024, lr=1e-4, batch=10, minutes=0.0, epochs=250.0, eval_images=0)
PAPER_LAYERS = {"mnist": 8, "fashion-mnist": 8, "cifar10": 16}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ImageSettings, title="settings (what a result depends on, and where it runs)")
    add_options(p, ImageRun, title="this run")


def settings_from(args: argparse.Namespace) -> ImageSettings:
    s = from_args(ImageSettings, args)
    given = getattr(args, "given", set())  # options given on the command line win over the presets
    if args.paper:
        s = apply_preset(s, {**PAPER, "n_layers": PAPER_LAYERS[s.dataset]}, given)
    if args.quick:
        s = apply_preset(
            s,
            dict(
                n_layers=1,
                n_heads=2,
                d_model=16,
                d_ff=32,
                lsh_chunk=4,
                batch=4,
                steps=3,
                minutes=0.0,
                eval_images=8,
                samples=2,
                image_size=4,
                levels=8,
                curve_images=4,
            ),
            given,
        )
    for name in ("eval_images", "eval_every", "epochs", "minutes"):
        if getattr(s, name) < 0:
            raise ValueError(f"image: --{name.replace('_', '-')} must be >= 0, got {getattr(s, name)}")
    for name in ("jobs", "curve_images", "batch", "steps", "samples"):
        if getattr(s, name) < 1:
            raise ValueError(f"image: --{name.replace('_', '-')} must be >= 1, got {getattr(s, name)}")
    resolve_device(s.device)
    return s


def steps_of(s: ImageSettings, d: datasets.SequenceData) -> int:
    """The training steps: --epochs of the training set when given, else --steps."""
    return math.ceil(s.epochs * d.n_items("train") / s.batch) if s.epochs else s.steps


def model_config(s: ImageSettings, method: str, d: datasets.SequenceData) -> ModelConfig:
    return ModelConfig(
        vocab_size=d.vocab_size,
        max_len=d.seq_len,
        d_model=s.d_model,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        d_ff=s.d_ff,
        head="mol",
        lsh_chunk=s.lsh_chunk,
        norm=s.norm,
        feature_map=s.feature_map,
        **METHODS[method][0],
    )


def train_config(s: ImageSettings, run: Path, resume: bool, steps: int, threads: int = 0) -> TrainConfig:
    return TrainConfig(
        data=s.dataset,
        data_path=s.data_path,
        image_size=s.image_size,
        levels=s.levels,
        conditional=False,
        out=str(run),
        steps=steps,
        batch_size=s.batch,
        lr=s.lr,
        warmup=min(100, steps // 10),
        schedule=s.schedule,
        eval_every=s.eval_every,
        eval_batches=max(1, s.curve_images // s.batch),
        checkpoint_every=200,
        time_limit=60 * s.minutes,
        resume=resume,
        seed=s.seed,
        progress=False,
        device=s.device,
        threads=threads,
    )


def images_per_s(model, mode: str, n: int, device: torch.device) -> tuple[float, torch.Tensor]:
    # untimed first: what a process pays once (building the fused step, and its speed check on first
    # use in a new cache) is not generation speed
    model.generate(n=n, max_new_tokens=2, mode=mode)
    torch.manual_seed(0)
    start = time.perf_counter()
    tokens = model.generate(n=n, mode=mode, generator=torch.Generator(device).manual_seed(0))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - start), tokens


def run_method(s: ImageSettings, method: str, d: datasets.SequenceData, out: Path, threads: int = 0) -> list[dict]:
    folder = out / method
    run = folder / "run"
    resume = (run / "latest").exists()
    steps = steps_of(s, d)
    device = resolve_device(s.device)
    print(
        f"  {method}: {'resuming' if resume else 'training'} ({steps} steps"
        + (f", at most {s.minutes:g} minutes)" if s.minutes else ")"),
        flush=True,
    )
    start = time.perf_counter()
    checkpoint = train(model_config(s, method, d), train_config(s, run, resume, steps, threads), data=d)
    # the training time of every process of this run (resumes included), as the checkpoint records it
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    train_seconds = float(state.get("train_seconds", time.perf_counter() - start))
    model, config = load_model(run)
    model.to(device)
    n_test = d.n_items("test")
    n_eval = min(s.eval_images or n_test, n_test)
    t0 = time.perf_counter()
    bpd = score_test_images(model, d, device, n_eval, batch=max(s.batch, 32))
    print(f"  {method}: {n_eval} test images scored in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    modes = [(method, METHODS[method][1])] + ([("softmax-cache", "rnn")] if method == "softmax" else [])
    for name, mode in modes:
        speed, tokens = images_per_s(model, mode, s.samples, device)
        if name == method:
            grid = image_grid(d.to_images(tokens.cpu()), rows=max(1, int(s.samples**0.5)))
            write_png(out / f"samples_{method}.png", grid, scale=4)
        rows.append(
            {
                "method": name,
                "dataset": s.dataset,
                "steps": config["step"],
                "train_seconds": train_seconds,
                "test_bpd": bpd,
                "eval_images": n_eval,
                "images_per_s": speed,
                "device": str(device),
                "generation_batch": s.samples,
                "paper_bpd": PAPER_BPD.get(s.dataset, {}).get(name, ""),
                "paper_images_per_s": PAPER_IMAGES_PER_S.get(s.dataset, {}).get(name, ""),
            }
        )
        print(f"  {name:14s} step {config['step']:6d}  test {bpd:.4f} bits/dim  {speed:8.3f} images/s", flush=True)
    return rows


@torch.no_grad()
def score_test_images(model, d: datasets.SequenceData, device, n: int, batch: int) -> float:
    """Bits/dim over exactly the first n test images (unconditional), `batch` at a time."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, n, batch):
        tokens, _ = d.get("test", torch.arange(start, min(start + batch, n)))
        nll = model.nll(tokens.to(device), None)
        total += nll.double().sum().item()
        count += nll.numel()
    return total / count / math.log(2)


def _run_method(s: ImageSettings, method: str, out: Path) -> list[dict]:
    """run_method in a worker process (--jobs): its share of the threads, its own copy of the data."""
    threads = max(1, torch.get_num_threads() // s.jobs)
    torch.set_num_threads(threads)
    d = datasets.load(s.dataset, s.data_path or None, size=s.image_size, levels=s.levels)
    return run_method(s, method, d, out, threads)


def estimate_seconds(s: ImageSettings, d: datasets.SequenceData, methods: list[str]) -> float:
    """Seconds this command will take on --device: two timed training steps of each method (after one
    untimed) scaled to the steps, plus scoring the test images at a third of a step per batch."""
    device = resolve_device(s.device)
    steps = steps_of(s, d)
    n_eval = min(s.eval_images or d.n_items("test"), d.n_items("test"))
    total = 0.0
    for method in methods:
        torch.manual_seed(0)
        model = CausalTransformer(model_config(s, method, d)).to(device)
        opt = torch.optim.RAdam(model.parameters(), lr=s.lr)
        tokens = torch.randint(0, d.vocab_size, (s.batch, d.seq_len), device=device)
        for i in range(3):
            if i == 1:
                t0 = time.perf_counter()
            loss = model.nll(tokens, None).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        per_step = (time.perf_counter() - t0) / 2
        train_s = min(steps * per_step, 60 * s.minutes) if s.minutes else steps * per_step
        total += train_s + per_step / 3 * n_eval / s.batch
    return total / min(s.jobs, len(methods))


def summary(rows: list[dict]) -> str:
    base = next((r["images_per_s"] for r in rows if r["method"] == "softmax"), None)
    body = []
    for r in rows:
        speedup = fmt(r["images_per_s"] / base, 1) + "x" if base else "-"
        body.append(
            [
                r["method"],
                str(r["steps"]),
                fmt(r["train_seconds"] / 60, 1),
                fmt(r["test_bpd"], 3),
                str(r["paper_bpd"] or "-"),
                fmt(r["images_per_s"], 3),
                speedup,
                str(r["paper_images_per_s"] or "-"),
            ]
        )
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


def plot_curves(out: Path, methods: list[str]) -> Path | None:
    """Held-out bits/dim against steps for each method (from its run's log.csv), curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    plotted = False
    for method in methods:
        logs = [out / method / "run" / name for name in ("log.csv", "log.csv.gz")]  # (committed logs are gzipped)
        log = next((p for p in logs if p.exists()), None)
        if log is None:
            continue
        text = gzip.decompress(log.read_bytes()).decode() if log.suffix == ".gz" else log.read_text()
        rows = [r for r in csv.DictReader(text.splitlines()) if r["test_bits_per_dim"]]
        if rows:
            ax.plot([int(r["step"]) for r in rows], [float(r["test_bits_per_dim"]) for r in rows], label=method)
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("training steps")
    ax.set_ylabel("held-out bits/dim (first test images)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    return out / "curves.png"


def gap_line(rows: list[dict], dataset: str) -> str:
    """linear - softmax test bits/dim here and in the paper."""
    bpd = {r["method"]: r["test_bpd"] for r in rows}
    paper = PAPER_BPD.get(dataset, {})
    if "linear" not in bpd or "softmax" not in bpd:
        return ""
    line = f"linear - softmax: {bpd['linear'] - bpd['softmax']:+.3f} bits/dim"
    if "linear" in paper and "softmax" in paper:
        line += f" (the paper: {paper['linear'] - paper['softmax']:+.3f})"
    return line


def _finish_method(s: ImageSettings, method: str, out: Path, settings: dict, fresh: bool) -> list[dict]:
    """A worker process's whole method (--jobs > 1): reused when finished, else trained and saved."""
    return finished_or_run(out, method, settings, fresh, lambda: _run_method(s, method, out))


def main(args: argparse.Namespace) -> int:
    started = provenance(getattr(args, "command_line", None))  # (the checkout may move on while it runs)
    s = settings_from(args)
    out = args.out or Path(f"results/image-{s.dataset}" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    d = datasets.load(s.dataset, s.data_path or None, size=s.image_size, levels=s.levels)
    info = machine_info()
    steps = steps_of(s, d)
    budget = f"{steps} steps each" + (f", at most {s.minutes:g} minutes each (equal time)" if s.minutes else "")
    print(
        f"{s.dataset}: {len(d.train)} train / {len(d.test)} test images, {d.seq_len} tokens each, "
        f"{d.vocab_size} levels; {info['cpu']}, {s.device}, {torch.get_num_threads()} threads; {budget}"
    )
    settings = {k: v for k, v in asdict(s).items() if k not in NOT_SETTINGS}
    todo = [m for m in s.methods if args.fresh or load_finished(out / m / "result.json", settings) is None]
    if todo:
        print(f"  estimated {estimate_seconds(s, d, todo) / 3600:.2f} hours here for {', '.join(todo)}", flush=True)
    results = {}
    if s.jobs > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(s.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {m: pool.submit(_finish_method, s, m, out, settings, args.fresh) for m in todo}
            results = {m: f.result() for m, f in futures.items()}
    rows = []
    for method in s.methods:
        if method not in results:
            train_it = lambda m=method: run_method(s, m, d, out)  # noqa: E731
            results[method] = finished_or_run(out, method, settings, args.fresh, train_it)
        rows += results[method]
    write_csv(out / "image.csv", rows)
    table = summary(rows)
    gap = gap_line(rows, s.dataset)
    (out / "table.md").write_text(
        f"Image generation, {s.dataset}, {info['cpu']}, {s.device}, torch {info['torch']}; {budget}; "
        f"settings {json.dumps(settings)}\n\n" + table + (f"\n\n{gap}\n" if gap else "\n")
    )
    print()
    print(table)
    if gap:
        print(gap)
    write_run_record(out, started, models={m: model_config(s, m, d).to_dict() for m in s.methods})
    figure = plot_samples(out, s.methods)
    curves = plot_curves(out, s.methods)
    grids = ", ".join(f"samples_{m}.png" for m in s.methods)
    plots = f"{figure}{', ' + str(curves) if curves else ''}"
    print(f"wrote {out / 'image.csv'}, {out / 'table.md'}, {out / 'run.json'}, {plots} and {grids}")
    return 0
