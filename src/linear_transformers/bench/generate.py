"""Generation and training speed of the paper's image models (Tables 1, 4 and 5, speed columns).

Models with random weights (speed does not depend on them):
    mnist   8 layers, 8 heads, d_model 256, d_ff 1024, 784 tokens, mixture-of-logistics head
    cifar   16 layers, same widths, 3072 tokens

Generators compared: linear attention as an RNN (the fused CPU step; also with bfloat16 copies of
the projection weights, and, on CPUs with AVX512-BF16, with bfloat16 dot products), softmax with a
key/value cache ("stateful"), and softmax recomputing the whole prefix for every token (the paper's
softmax baseline); --tables adds Reformer (lsh-1, lsh-4, chunks of 32 positions), which has no
recurrent form and recomputes, as in the paper, and writes the paper's Tables 1 and 2 speed columns
next to ours (paper.md). Each is first verified (greedy RNN/cache generation must equal greedy
recomputation; bfloat16 dots within bfloat16 error of float32), then timed per token at
a set of positions (best of 10 for a stepped token, one run for a recomputed one); seconds per
image is the sum over all positions, integrated from those measurements (exact for the RNN, whose
per-token cost is flat; marked "integrated" for the others, whose cost grows with the position);
every timed token includes drawing it from the head (temperature 1). The RNN modes are also timed
the way a user meets them: whole images at batch 1 through model.generate(n=1), the modes taking
turns (median of --images); with them, in turn, the floor for float32 at batch 1: one read of the
float32 projection weights per token (measure.read_f32: a pass per token in one parallel region, the
step's threads reading the way its GEMVs do), what memory bandwidth alone costs per image. Also:
training step tokens/s, linear vs softmax. Where whole images take seconds (MNIST), the PyTorch step
("linear-rnn-pytorch", the fused step switched off) takes turns with them too. --parts picks the parts.
Writes generate.csv, table.md, generate.png and run.json under --out.

--isa LEVEL... (or all) runs the benchmark once per ISA level of the C kernels, each in its own
process with PyTorch capped to that level (bench/levels.py), and adds levels.csv and levels.md: per
level, whole images and one step at batch 1, fused against the PyTorch step of the same process.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..decode import DEFAULT, DecodeConfig, fused
from ..model import CausalTransformer, ModelConfig, ModelState
from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, provenance, write_csv, write_run_record
from . import levels, measure
from .generate_report import PAPER, paper_tables, plot, summary
from .measure import time_fn

CONFIGS = {
    "mnist": ModelConfig(vocab_size=256, max_len=784, d_model=256, n_layers=8, n_heads=8, d_ff=1024, head="mol"),
    "cifar": ModelConfig(vocab_size=256, max_len=3072, d_model=256, n_layers=16, n_heads=8, d_ff=1024, head="mol"),
}
LSH_CHUNK = 32
PARTS = ("steps", "images", "tokens", "train")  # step table, whole images, per-token timings, training
PYTORCH_IMAGES_MAX_LEN = 784  # whole images through the PyTorch step are timed where they take seconds


@dataclass
class GenerateOptions:
    configs: list[str] = option(
        list(CONFIGS), "model configurations (the paper's MNIST and CIFAR-10 models)", choices=list(CONFIGS)
    )
    batch: int = count(64, "the fixed batch of the images/s columns")
    points: int = count(6, "positions at which per-token cost is timed")
    threads: int = option(torch.get_num_threads(), "CPU threads")
    out: Path = option(Path("results/bench_generate"), "output folder")
    images: int = count(7, "whole images at batch 1 per RNN mode (median reported)")
    quick: bool = option(False, "tiny models: a smoke test in seconds")
    tables: bool = option(False, "add lsh-1/lsh-4 and the paper's Tables 1 and 2 (paper.md)")
    parts: list[str] = option(
        list(PARTS),
        "steps: one RNN step, fused vs PyTorch, per batch; images: whole images "
        "at batch 1; tokens: per-token timings and images/s; train: training tokens/s",
        choices=PARTS,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, GenerateOptions, title="benchmark")
    levels.add_isa_argument(p)


def _state_at(model: CausalTransformer, batch: int, position: int) -> tuple[torch.Tensor, ModelState]:
    """The RNN state (or KV cache) after `position` random tokens, as generation would have it."""
    labels = None
    tokens = torch.randint(0, model.cfg.vocab_size, (batch, position))
    return model.prefill(tokens, labels)


def _best_seconds(fn, repeats: int) -> float:
    """Best of `repeats` runs after one warm-up, in seconds."""
    return time_fn(fn, repeats).best_ms / 1e3


def per_token_seconds(
    model: CausalTransformer, mode: str, batch: int, position: int, repeats: int = 10, config: DecodeConfig = DEFAULT
) -> float:
    """Seconds to produce the token at `position` (0-based) for a batch, sampling included: best of
    `repeats` for the stepping modes (milliseconds each, so a moment of noise would otherwise decide
    the row), one run for recomputing (seconds each)."""
    with torch.no_grad():
        if mode == "recompute":
            tokens = torch.randint(0, model.cfg.vocab_size, (batch, position + 1))

            def run():
                model.head.sample(model(tokens)[:, position])

            return _best_seconds(run, 1)
        # token `position` comes from stepping token position - 1, which sits at network position `position`
        _, state = _state_at(model, batch, max(position - 1, 0))
        token = torch.randint(0, model.cfg.vocab_size, (batch,))
        lengths = [getattr(s, "length", None) for s in state.layers]
        start = state.position

        def run():
            model.head.sample(model.step(token, state, config)[0])
            # a cache grows by the token: roll it back, so every run sees the same position
            for s, n in zip(state.layers, lengths, strict=True):
                if n is not None:
                    s.length = n
            state.position = start

        return _best_seconds(run, repeats)


def seconds_per_image(model, mode, batch, positions, config: DecodeConfig = DEFAULT) -> tuple[float, list[float]]:
    """Sum of the per-token time over positions 0..T-1, integrated (trapezoid) from the measured positions."""
    times = [per_token_seconds(model, mode, batch, p, config=config) for p in positions]
    total = float(np.trapezoid(times, positions)) + (times[0] + times[-1]) / 2
    return total / batch, times


FLOOR = "float32 weights, one read per token"


def streamed_weights(model: CausalTransformer) -> list[torch.Tensor]:
    """The blocks' float32 projection weights: what the fused step streams from memory for every
    token at batch 1 (embedding, norms, head and state are small beside them)."""
    return [w for b in model.blocks for w in (b.attn.qkv.weight, b.attn.out.weight, b.ff_in.weight, b.ff_out.weight)]


def whole_images(
    models: dict[str, tuple[CausalTransformer, DecodeConfig]], repeats: int, floor: list[torch.Tensor] | None = None
):
    """Seconds for whole images at batch 1 through model.generate(n=1) (sampling at temperature 1):
    the models take turns, image by image, so the machine's drift falls on all of them alike. With
    `floor` (streamed_weights), each turn also times reading those tensors once per token of an
    image (measure.read_f32: max_len passes in one parallel region, the step's threads, in the pattern
    its GEMVs read): what reading the float32 weights alone costs per image at that moment."""
    times: dict[str, list[float]] = {label: [] for label in models}
    if floor is not None:
        times[FLOOR] = []
    for model, config in models.values():  # a few tokens each, untimed: builds the fused step
        model.generate(n=1, max_new_tokens=8, config=config)
    for _ in range(repeats):
        for label, (model, config) in models.items():
            t0 = time.perf_counter()
            model.generate(n=1, config=config)
            times[label].append(time.perf_counter() - t0)
        if floor is not None:
            t0 = time.perf_counter()
            measure.read_f32(floor, passes=next(iter(models.values()))[0].cfg.max_len)
            times[FLOOR].append(time.perf_counter() - t0)
    return times


def step_crossover(cfg: ModelConfig, batches: list[int], repeats: int) -> list[dict]:
    """Milliseconds per RNN step of the fused C step and of the PyTorch step at each batch size
    (best of `repeats`, the two taking turns): where generation should switch (DecodeConfig.max_batch)."""
    model = CausalTransformer(cfg).eval()
    configs = {True: DecodeConfig(max_batch=max(batches)), False: DecodeConfig(fused=False)}
    rows = []
    with torch.no_grad():
        for batch in batches:
            _, state = _state_at(model, batch, 8)
            token = torch.randint(0, cfg.vocab_size, (batch,))
            best = {True: float("inf"), False: float("inf")}
            for _ in range(repeats):
                for fused in (True, False):
                    t0 = time.perf_counter()
                    model.step(token, state, configs[fused])
                    best[fused] = min(best[fused], time.perf_counter() - t0)
            rows.append({"batch": batch, "step_ms_fused": best[True] * 1e3, "step_ms_pytorch": best[False] * 1e3})
    return rows


def verify(model_linear: CausalTransformer, model_softmax: CausalTransformer) -> list[str]:
    lines = []
    for name, m in (("linear RNN", model_linear), ("softmax KV cache", model_softmax)):
        a = m.generate(n=2, max_new_tokens=24, temperature=0)
        b = m.generate(n=2, max_new_tokens=24, temperature=0, mode="recompute")
        if not torch.equal(a, b):
            raise SystemExit(f"verification failed: greedy {name} generation differs from recomputation")
        lines.append(f"{name}: greedy generation of 24 tokens equals recomputing the prefix")
    return lines


def verify_bf16_dot(model: CausalTransformer, reference: CausalTransformer) -> str:
    """bfloat16 dots change the arithmetic: the step's outputs must stay within bfloat16 error of float32."""
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        outs = []
        for m, config in ((model, DecodeConfig.precision("bf16")), (reference, DEFAULT)):
            params, state = m.prefill(tokens[:, :0])
            seq = [params]
            for t in range(23):
                params, state = m.step(tokens[:, t], state, config)
                seq.append(params)
            outs.append(torch.stack(seq, 1))
    err = float((outs[0] - outs[1]).abs().max() / outs[1].abs().max())
    if not 0 < err < 0.05:
        raise SystemExit(f"verification failed: bfloat16-dot step differs from float32 by {err:.3g} (relative)")
    return f"linear RNN with bfloat16 dots: 24 steps within {err:.1e} (relative) of float32"


def verify_lsh(model: CausalTransformer) -> str:
    """LSH draws its rotations from torch's RNG: seeded generation must reproduce, tokens in range."""
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(model.generate(n=2, max_new_tokens=24, temperature=0))
    if not torch.equal(*runs) or runs[0].min() < 0 or runs[0].max() >= model.cfg.vocab_size:
        raise SystemExit("verification failed: seeded LSH generation does not reproduce")
    torch.manual_seed(0)
    return f"lsh-{model.cfg.lsh_hashes}: seeded greedy generation (recomputing) reproduces, tokens in range"


def train_tokens_per_s(cfg: ModelConfig, batch: int) -> float:
    model = CausalTransformer(cfg)
    opt = torch.optim.RAdam(model.parameters(), 1e-4)
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_len))

    def step():
        loss = model.nll(tokens).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return batch * cfg.max_len / _best_seconds(step, 1)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    configs = {k: CONFIGS[k] for k in args.configs}
    if args.quick:
        configs = {k: replace(v, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=64) for k, v in configs.items()}
        args.batch, args.points, args.images = 4, 3, 2
    if args.isa:
        return per_level(args)
    started = provenance(getattr(args, "command_line", None))  # (run.json: what made the results)
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    for line in isa_lines():
        print(line)
    rows, curves = [], {}
    for name, cfg in configs.items():
        linear = CausalTransformer(cfg).eval()
        softmax = CausalTransformer(replace(cfg, attention="causal-softmax")).eval()
        print(f"{name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.max_len} tokens per image")
        for line in verify(linear, softmax):
            print("  verified: " + line)
        T = cfg.max_len
        positions = sorted({int(x) for x in np.linspace(0, T - 1, args.points)})
        # recomputing is compute-bound: at the fixed batch it is timed at a batch of at most 8 MNIST images
        recompute_batch = max(1, min(args.batch, 8 * 784 // T)) if T <= 784 else 1
        # (a model per precision: each keeps its own fused step, built once)
        linear_bf16 = CausalTransformer(cfg).eval()
        linear_bf16.load_state_dict(linear.state_dict())
        generators = [
            ("linear-rnn", linear, "rnn", DEFAULT),
            ("linear-rnn-bf16", linear_bf16, "rnn", DecodeConfig.precision("bf16-weights")),
        ]
        if fused.available() and fused.has_bf16_dot():
            linear_dot = CausalTransformer(cfg).eval()
            linear_dot.load_state_dict(linear.state_dict())
            print("  verified: " + verify_bf16_dot(linear_dot, linear))
            print(f"  bfloat16 dots from 20 rows on: {'AMX tiles' if fused.has_amx() else 'AVX512-BF16 (no AMX)'}")
            generators.append(("linear-rnn-bf16dot", linear_dot, "rnn", DecodeConfig.precision("bf16")))
        generators += [
            ("softmax-cache", softmax, "cache", DEFAULT),
            ("softmax-recompute", softmax, "recompute", DEFAULT),
        ]
        if args.tables:
            for hashes in (1, 4):
                lsh = CausalTransformer(replace(cfg, attention="causal-lsh", lsh_hashes=hashes, lsh_chunk=LSH_CHUNK))
                print("  verified: " + verify_lsh(lsh.eval()))
                generators.append((f"lsh-{hashes}", lsh, "recompute", DEFAULT))
        step_batches = [1, 4, 8] if args.quick else [1, 4, 16, 32, 64, 128, 256]
        for r in step_crossover(cfg, step_batches, 3 if args.quick else 10) if "steps" in args.parts else []:
            rows.append({"config": name, "generator": "linear-rnn step", **r})
            print(
                f"  one RNN step at batch {r['batch']:3d}: fused C {r['step_ms_fused']:8.3f} ms, "
                f"PyTorch {r['step_ms_pytorch']:8.3f} ms"
            )
        rnn = {label: (model, config) for label, model, mode, config in generators if mode == "rnn"}
        if T <= PYTORCH_IMAGES_MAX_LEN:
            rnn["linear-rnn-pytorch"] = (linear, DecodeConfig(fused=False))
        floor = streamed_weights(linear) if fused.available() else None
        images = whole_images(rnn, args.images, floor).items() if "images" in args.parts else []
        for label, times in images:
            median = float(np.median(times))
            rows.append(
                {
                    "config": name,
                    "generator": label,
                    "batch": 1,
                    "whole_image_median_s": median,
                    "whole_image_s": " ".join(f"{t:.4g}" for t in times),
                }
            )
            print(f"  {label:18s} whole images, batch 1: median {median:.3f} s ({min(times):.3f}-{max(times):.3f})")
        for label, model, mode, config in generators if "tokens" in args.parts else []:
            for batch in sorted({1, recompute_batch if mode == "recompute" else args.batch}):
                s, times = seconds_per_image(model, mode, batch, positions, config)
                how = f"timed at {len(positions)} positions, integrated over {T}"
                if mode == "recompute" and batch != args.batch and batch != 1:
                    how += f"; fixed-batch column timed at batch {batch}"
                rows.append(
                    {
                        "config": name,
                        "generator": label,
                        "batch": batch,
                        "fixed_batch": batch != 1,
                        "seconds_per_image": s,
                        "images_per_s": 1 / s,
                        "how": how,
                        "paper_images_per_s": PAPER.get((name, label), ""),
                        "positions": " ".join(map(str, positions)),
                        "seconds_per_step": " ".join(f"{t:.6g}" for t in times),
                    }
                )
                curves[(name, label, batch)] = (positions, times)
                print(f"  {label:18s} batch {batch:3d}: {s:9.3f} s/image  {1 / s:9.2f} images/s", flush=True)
        for attention in ("causal-linear", "causal-softmax") if "train" in args.parts else []:
            tps = train_tokens_per_s(replace(cfg, attention=attention), batch=max(1, 4 * 784 // T))
            rows.append({"config": name, "generator": f"train {attention}", "tokens_per_s": tps})
            print(f"  training step, {attention}: {tps:.0f} tokens/s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "generate.csv", rows)
    table = summary(rows, args.batch)
    if args.tables:
        paper = paper_tables(rows, args.batch)
        (args.out / "paper.md").write_text(
            f"Generation speed vs the paper, {info['cpu']}, {args.threads} threads, torch {info['torch']}\n\n" + paper
        )
        print(paper)
    (args.out / "table.md").write_text(
        f"Generation speed, {info['cpu']}, {args.threads} threads, torch {info['torch']}\n"
        + "".join(line + "\n" for line in isa_lines())
        + "\n"
        + table
    )
    print()
    print(table)
    written = [args.out / "generate.csv", args.out / "table.md", write_run_record(args.out, started)]
    if curves:  # the per-token timings (part "tokens")
        plot(curves, args.out / "generate.png", args.batch)
        written.append(args.out / "generate.png")
    print("wrote " + ", ".join(map(str, written)))
    return 0


def per_level(args: argparse.Namespace) -> int:
    """The benchmark once per ISA level (bench/levels.py), then per level: whole images and one
    step at batch 1, the fused C step against the PyTorch step measured in the same process."""
    import csv

    argv = [
        "--configs",
        *args.configs,
        "--images",
        str(args.images),
        "--threads",
        str(args.threads),
        "--parts",
        *args.parts,
        *(["--quick"] if args.quick else []),
    ]
    folders = levels.run_each("generate", argv, levels.resolve(args.isa), args.out)
    out = []
    for level, folder in folders.items():
        with open(folder / "generate.csv") as f:
            rows = list(csv.DictReader(f))
        for config in dict.fromkeys(r["config"] for r in rows):
            mine = [r for r in rows if r["config"] == config]
            image = {r["generator"]: float(r["whole_image_median_s"]) for r in mine if r.get("whole_image_median_s")}
            step = next((r for r in mine if r.get("step_ms_fused") and int(r["batch"]) == 1), None)
            row = {"level": level, "config": config}
            if "linear-rnn" in image:
                row["fused_f32_image_s"] = image["linear-rnn"]
            if "linear-rnn-pytorch" in image:
                row["pytorch_image_s"] = image["linear-rnn-pytorch"]
            if step:
                row["fused_step_ms"] = float(step["step_ms_fused"])
                row["pytorch_step_ms"] = float(step["step_ms_pytorch"])
            out.append(row)
    write_csv(args.out / "levels.csv", out)

    def ratio(r, a, b):
        return fmt(r[b] / r[a], 2) + "x" if a in r and b in r else "-"

    cells = [
        [
            r["level"],
            r["config"],
            fmt(r.get("fused_f32_image_s"), 3),
            fmt(r.get("pytorch_image_s"), 3),
            ratio(r, "fused_f32_image_s", "pytorch_image_s"),
            fmt(r.get("fused_step_ms"), 3),
            fmt(r.get("pytorch_step_ms"), 3),
            ratio(r, "fused_step_ms", "pytorch_step_ms"),
        ]
        for r in out
    ]
    table = markdown_table(
        [
            "level",
            "config",
            "whole image, fused float32: median s",
            "whole image, PyTorch step: s",
            "PyTorch / fused",
            "step ms, fused (batch 1)",
            "step ms, PyTorch",
            "PyTorch / fused",
        ],
        cells,
    )
    heads = [(folder / "table.md").read_text().split("\n\n")[0].strip() for folder in folders.values()]
    text = "Generation at batch 1 per ISA level\n\n" + "\n\n".join(
        f"{level}: {head}" for level, head in zip(folders, heads, strict=True)
    )
    (args.out / "levels.md").write_text(text + "\n\n" + table + "\n")
    print()
    print(table)
    print(f"wrote {args.out / 'levels.csv'}, {args.out / 'levels.md'}")
    return 0
