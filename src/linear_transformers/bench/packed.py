"""Training on documents of every length: packed (cu_seqlens) against padded batches, in tokens/s.

    linear-transformers bench packed               # paragraphs of the Python documentation

The documents are the paragraphs of a folder of text files (--docs; by default the reST sources of
Debian's python3.11-doc: 73k paragraphs, median 91 bytes, 90th percentile 335, longest 19k),
byte-level, cut at --max-len. Every step trains one causal-linear CausalTransformer on --batch
documents drawn at random, three ways:

    padded     the batch [B, longest] right-padded, the loss over the real tokens only
    bucketed   the same, but each batch drawn from documents of similar length (sorted pool)
    packed     the documents one after another in one row, cu_seqlens marking them

First it verifies that packed and padded give the same loss and gradients on one batch; then, over
--rounds rounds, times one optimiser step (forward, backward, update) of each in turn. Reports real
(non-padding) tokens per second, median and best, and the padding share. Writes packed.csv,
table.md and packed.png under --out.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, provenance, write_csv, write_run_record

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
MODES = ("padded", "bucketed", "packed")


@dataclass
class PackedOptions:
    docs: Path = option(DOCS, "folder of UTF-8 text files; every paragraph (blank-line separated) is a document")
    max_len: int = count(1024, "longest document in bytes (longer paragraphs are cut)")
    batch: int = count(32, "documents per step")
    rounds: int = count(10, "rounds; each times one step of every mode")
    d_model: int = count(128, "model width")
    n_layers: int = count(4, "blocks")
    threads: int = option(torch.get_num_threads(), "CPU threads")
    seed: int = option(0, "seed of the model and of the batches")
    quick: bool = option(False, "a tiny model, 2 rounds of 8 documents (seconds: a smoke test)")
    out: Path = option(Path("results/bench-packed"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, PackedOptions, title="benchmark")


def read_documents(folder: Path, max_len: int) -> list[bytes]:
    """Every non-blank paragraph of every file under `folder`, as bytes, cut at max_len."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"--docs {folder} is not a folder (Debian: apt-get install python3.11-doc; or pass a folder of text files)"
        )
    docs = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        text = path.read_text(encoding="utf-8", errors="replace")
        for para in text.split("\n\n"):
            data = para.strip("\n").encode()
            docs += [data[i : i + max_len] for i in range(0, len(data), max_len)] if para.strip() else []
    if not docs:
        raise ValueError(f"--docs {folder} holds no text")
    return docs


def batches(docs: list[bytes], batch: int, rounds: int, seed: int) -> dict[str, list[list[bytes]]]:
    """The documents of every step: random draws (padded, packed: the same ones) and runs of a
    length-sorted random pool (bucketed)."""
    rng = random.Random(seed)
    drawn = [rng.sample(docs, batch) for _ in range(rounds + 1)]
    pool = sorted(rng.sample(docs, min(len(docs), batch * 64)), key=len)
    starts = [rng.randrange(0, len(pool) - batch + 1) for _ in range(rounds + 1)]
    return {"padded": drawn, "packed": drawn, "bucketed": [pool[s : s + batch] for s in starts]}


def as_padded(docs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [B, longest] right-padded with 0 and the mask of real tokens."""
    longest = max(len(d) for d in docs)
    tokens = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, d in enumerate(docs):
        tokens[i, : len(d)] = torch.frombuffer(bytearray(d), dtype=torch.uint8)
    lengths = torch.tensor([len(d) for d in docs])
    return tokens, torch.arange(longest)[None] < lengths[:, None]


def as_packed(docs: list[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [1, total] and cu_seqlens [B + 1]."""
    tokens = torch.frombuffer(bytearray(b"".join(docs)), dtype=torch.uint8).long()[None]
    cu = torch.tensor([0, *torch.tensor([len(d) for d in docs]).cumsum(0).tolist()], dtype=torch.int32)
    return tokens, cu


def loss_of(model, mode: str, docs: list[bytes]) -> tuple[torch.Tensor, int, int]:
    """(mean loss over the real tokens, real tokens, tokens computed)."""
    if mode == "packed":
        tokens, cu = as_packed(docs)
        nll = model.nll(tokens, cu_seqlens=cu)
        return nll.mean(), tokens.numel(), tokens.numel()
    tokens, real = as_padded(docs)
    nll = model.nll(tokens)
    return nll[real].mean(), int(real.sum()), tokens.numel()


def verify(model, docs: list[bytes]) -> float:
    """Packed and padded: the same loss and gradients on one batch (largest relative difference)."""
    worst = 0.0
    results = []
    for mode in ("padded", "packed"):
        model.zero_grad(set_to_none=True)
        loss, _, _ = loss_of(model, mode, docs)
        loss.backward()
        results.append([loss.detach(), *(p.grad.clone() for p in model.parameters() if p.grad is not None)])
    for a, b in zip(*results, strict=True):
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item())
    model.zero_grad(set_to_none=True)
    return worst


def main(args: argparse.Namespace) -> int:
    started = provenance(getattr(args, "command_line", None))  # (run.json: what made the results)
    from ..model import CausalTransformer, ModelConfig

    torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.rounds, args.d_model, args.n_layers = 8, 2, 32, 1
    docs = read_documents(args.docs, args.max_len)
    lengths = sorted(len(d) for d in docs)
    torch.manual_seed(args.seed)
    cfg = ModelConfig(
        vocab_size=256,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=4,
        d_ff=4 * args.d_model,
        max_len=args.max_len,
        attention="causal-linear",
    )
    model = CausalTransformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    plan = batches(docs, args.batch, args.rounds, args.seed)
    err = verify(model, plan["padded"][0])
    if not err < 1e-4:
        raise SystemExit(f"verification failed: packed and padded differ (largest relative difference {err:.2e})")
    info = machine_info()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} threads")
    for line in isa_lines():
        print(line)
    print(
        f"{len(docs)} documents from {args.docs}: median {statistics.median(lengths):.0f} bytes, 90th percentile "
        f"{lengths[int(0.9 * (len(lengths) - 1))]}, longest {lengths[-1]}; packed = padded verified "
        f"(largest relative difference {err:.1e})",
        flush=True,
    )
    rows = []
    for r in range(args.rounds + 1):  # round 0 warms up
        for mode in MODES:
            t0 = time.perf_counter()
            loss, real, computed = loss_of(model, mode, plan[mode][r])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds = time.perf_counter() - t0
            if r:
                rows.append(
                    {
                        "mode": mode,
                        "round": r,
                        "seconds": seconds,
                        "real_tokens": real,
                        "computed_tokens": computed,
                        "tokens_per_s": real / seconds,
                    }
                )
    summary = []
    for mode in MODES:
        mine = [x for x in rows if x["mode"] == mode]
        tps = [x["tokens_per_s"] for x in mine]
        padding = 1 - sum(x["real_tokens"] for x in mine) / sum(x["computed_tokens"] for x in mine)
        summary.append({"mode": mode, "median": statistics.median(tps), "best": max(tps), "padding": padding})
    base = summary[0]["median"]
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / "packed.csv", rows)
    table = markdown_table(
        ["batches", "real tokens/s (median)", "best", "x padded", "padding share"],
        [
            [s["mode"], fmt(s["median"], 0), fmt(s["best"], 0), fmt(s["median"] / base, 2), f"{s['padding']:.0%}"]
            for s in summary
        ],
    )
    header = (
        f"One optimiser step on {args.batch} documents (paragraphs of {args.docs}, cut at {args.max_len} bytes), "
        f"causal-linear CausalTransformer d_model {args.d_model}, {args.n_layers} layers, {args.rounds} rounds "
        f"interleaved; {info['cpu']}, {args.threads} threads, torch {info['torch']}\n"
        + "".join(line + "\n" for line in isa_lines())
    )
    (args.out / "table.md").write_text(header + "\n" + table)
    print(table)
    plotted = plot(summary, args.out / "packed.png", f"training tokens/s by batching, {info['cpu']}")
    write_run_record(args.out, started)
    print(f"wrote {args.out}/packed.csv, table.md, run.json" + (", packed.png" if plotted else ""))
    return 0


def plot(summary: list[dict], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([s["mode"] for s in summary], [s["median"] for s in summary], color=["#999", "#69c", "#c63"])
    for i, s in enumerate(summary):
        label = f"{s['median']:.0f}\n({s['padding']:.0%} padding)"
        ax.text(i, s["median"], label, ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("real tokens / s (median)")
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
