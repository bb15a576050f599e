"""Decoding through Hugging Face transformers' `generate()` against our own `generate`, per token.

    linear-transformers bench hf                      # a 4-layer, 256-wide character model, batch 1
    linear-transformers bench hf --tokens 2048 --n-layers 8

One model (random weights: speed does not depend on them), three ways to decode --tokens tokens
after a 16-token prompt, greedy, batch 1: our `CausalTransformer.generate` (the fused C step where
it applies), the same with the fused step off (the PyTorch step), and transformers' `generate()`
on `LinearTransformerForCausalLM` (the same weights, a RecurrentStateCache, our step inside).
First the three must produce the same tokens; then each runs --repeats times and the time of every
token is read off a stopping criterion (transformers) and from runs of growing length (ours):
the average per token over the first n/4 ... n tokens is flat when each token costs the same.
Writes hf.csv (ms per token against the tokens generated), hf.png and table.md under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, write_csv


@dataclass
class HfOptions:
    tokens: int = count(1024, "tokens generated after the prompt")
    n_layers: int = count(4, "transformer blocks")
    d_model: int = count(256, "width of the residual stream")
    n_heads: int = count(8, "attention heads per block")
    vocab: int = count(96, "vocabulary size")
    repeats: int = count(3, "runs of each decoder (the best counts)")
    out: Path = option(Path("results/bench-hf"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, HfOptions, title="benchmark")


def _model(args: argparse.Namespace):
    from ..model import CausalTransformer, ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        max_len=args.tokens + 32,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        d_ff=4 * args.d_model,
    )
    return CausalTransformer(cfg).eval()


class _Clock:
    """A stopping criterion that never stops: it records when each token was chosen."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def main(args: argparse.Namespace) -> int:
    from transformers import StoppingCriteriaList

    from ..decode import DecodeConfig
    from ..hf import from_model

    if args.tokens < 64 or args.repeats < 1:
        raise ValueError("bench hf: --tokens must be >= 64 and --repeats >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    model = _model(args)
    hf = from_model(model)
    prompt = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    n = args.tokens

    def ours(tokens: int, fused: bool) -> torch.Tensor:
        return model.generate(prompt=prompt, max_new_tokens=tokens, temperature=0, config=DecodeConfig(fused=fused))

    def theirs(clock: _Clock | None = None) -> torch.Tensor:
        criteria = StoppingCriteriaList([clock]) if clock else None
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, stopping_criteria=criteria)

    # 1. the same tokens three ways
    reference = ours(n, True)
    same = {"ours, PyTorch step": ours(n, False), "transformers generate()": theirs()}
    for name, tokens in same.items():
        if not torch.equal(tokens, reference):
            raise RuntimeError(f"bench hf: {name} produced other tokens than our generate")
    print(f"the three decoders produce the same {n} tokens")

    # 2. time: the average ms per token over the first m tokens, for m = n/4, n/2, 3n/4, n (flat when
    #    each token costs the same): ours from runs of m tokens, transformers' from when token m was chosen
    marks = [n // 4, n // 2, 3 * n // 4, n]
    rows, summary = [], {}
    for name, fused in (("ours (fused step)", True), ("ours (PyTorch step)", False)):
        for m in marks:
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ours(m, fused)
                ts.append(time.perf_counter() - t0)
            rows.append({"decoder": name, "tokens": m, "ms_per_token": min(ts) / m * 1e3})
        summary[name] = rows[-1]["ms_per_token"]
    runs = []
    for _ in range(args.repeats):
        clock = _Clock()
        t0 = time.perf_counter()
        theirs(clock)
        runs.append([(t - t0) / (i + 1) * 1e3 for i, t in enumerate(clock.times)])
    for m in marks:
        rows.append({"decoder": "transformers generate()", "tokens": m, "ms_per_token": min(r[m - 1] for r in runs)})
    summary["transformers generate()"] = rows[-1]["ms_per_token"]
    write_csv(args.out / "hf.csv", rows)

    base = summary["ours (fused step)"]
    body = []
    for name, ms in summary.items():
        per = [r["ms_per_token"] for r in rows if r["decoder"] == name]
        body.append([name, fmt(ms, 3), fmt(ms / base, 2) + "x", fmt(per[0], 3), fmt(per[-1], 3)])
    table = markdown_table(
        ["decoder", f"ms/token, {n} tokens", "vs ours", f"ms/token, first {marks[0]}", f"ms/token, first {n}"], body
    )
    info = machine_info()
    header = (
        f"bench hf: {args.n_layers} layers, d_model {args.d_model}, {args.n_heads} heads, vocab {args.vocab}, "
        f"batch 1, greedy, {n} tokens after 16; {info['cpu']}, {info['threads']} threads, "
        f"torch {info['torch']}"
    )
    (args.out / "table.md").write_text(header + "\n" + "\n".join(isa_lines()) + "\n\n" + table + "\n")
    options = {k: v for k, v in vars(args).items() if k not in ("given", "out", "name")}
    (args.out / "settings.json").write_text(json.dumps({**options, **info}, indent=2))
    _plot(rows, args.out / "hf.png", header)
    print(table)
    print(f"wrote {args.out / 'hf.csv'}, {args.out / 'hf.png'}, {args.out / 'table.md'}")
    return 0


def _plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in dict.fromkeys(r["decoder"] for r in rows):
        r = [x for x in rows if x["decoder"] == name]
        ax.plot([x["tokens"] for x in r], [x["ms_per_token"] for x in r], marker="o", label=name)
    ax.set_xlabel("tokens generated (after a 16-token prompt)")
    ax.set_ylabel("ms per token (average over them)")
    ax.set_ylim(bottom=0)
    ax.set_title(title[:90] + ("..." if len(title) > 90 else ""), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
