"""A linearised SmolLM2-135M against its softmax teacher: prefill time and per-token decode time
against context length, both through transformers (the teacher with SDPA and its key/value cache,
the student with its recurrent LinearizedCache), batch 1, greedy.

    linear-transformers bench linearized                       # contexts 512 ... 4096
    linear-transformers bench linearized --contexts 1024 16384

Speed does not depend on the trained weights: the student is the teacher converted in place
(untrained feature maps) unless --student names a folder. First each model's cached one-token
step must give the logits of its own parallel forward over the same tokens (verified at a short
context); then, per context, the prefill is timed once (--repeats runs, median) and --tokens
single-token steps after it (the median per token). Writes linearized.csv, linearized.png and
table.md under --out. The fused C decoder for this architecture is not written yet: the student
steps through PyTorch, layer by layer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..options import add_options, count, option
from .measure import isa_lines, machine_info
from .report import fmt, markdown_table, write_csv


@dataclass
class LinearizedOptions:
    contexts: list[int] = count([512, 1024, 2048, 4096], "context lengths (prompt tokens before decoding)")
    tokens: int = count(16, "single-token decode steps timed after each prefill")
    repeats: int = count(3, "prefills per context and model (the median counts)")
    mode: str = option("hybrid", "the student's mode", choices=("linear", "hybrid", "window"))
    student: str = option("", "a linearised model folder (default: the teacher converted, untrained)")
    out: Path = option(Path("results/bench-linearized"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, LinearizedOptions, title="benchmark")


def _models(args):
    from transformers import AutoModelForCausalLM

    from ..linearize import LinearizeConfig, LinearizedCache, linearize
    from ..linearize.transfer import load_teacher

    if args.student and not (Path(args.student) / "config.json").is_file():
        raise FileNotFoundError(f"bench linearized: --student {args.student} is not a model folder (no config.json)")
    _, teacher = load_teacher()
    if args.student:
        student = AutoModelForCausalLM.from_pretrained(args.student).eval()
    else:
        _, student = load_teacher()
        linearize(student, LinearizeConfig(mode=args.mode))
    teacher.config._attn_implementation = "sdpa"
    return teacher, student, LinearizedCache


def _cache_for(model, linear_cache):
    from transformers import DynamicCache

    return linear_cache() if hasattr(model.config, "linearize") else DynamicCache(config=model.config)


@torch.no_grad()
def verify(teacher, student, linear_cache, n: int = 48) -> list[str]:
    tokens = torch.randint(0, teacher.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    lines = []
    for name, model in (("teacher", teacher), ("student", student)):
        full = model(tokens).logits
        cache = _cache_for(model, linear_cache)
        model(tokens[:, : n - 8], past_key_values=cache, use_cache=True)
        steps = [model(tokens[:, t : t + 1], past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[t]])).logits for t in range(n - 8, n)]  # fmt: skip
        err = (torch.cat(steps, 1) - full[:, n - 8 :]).abs().max().item()
        if not err < 1e-3:
            raise RuntimeError(f"bench linearized: the {name}'s cached steps differ from its forward by {err:.2e}")
        lines.append(f"{name}: cached steps = parallel forward (largest logit difference {err:.1e})")
    return lines


@torch.no_grad()
def measure(model, linear_cache, context: int, tokens: int, repeats: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context))
    prefill, per_token = [], []
    for _ in range(repeats):
        cache = _cache_for(model, linear_cache)
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        prefill.append(time.perf_counter() - t0)
    nxt = logits[:, -1:].argmax(-1)
    for i in range(tokens):
        t0 = time.perf_counter()
        logits = model(nxt, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[context + i]])).logits
        per_token.append(time.perf_counter() - t0)
        nxt = logits[:, -1:].argmax(-1)
    return {"prefill_s": statistics.median(prefill), "decode_ms": statistics.median(per_token) * 1e3,
            "decode_ms_min": min(per_token) * 1e3}  # fmt: skip


def main(args: argparse.Namespace) -> int:
    teacher, student, linear_cache = _models(args)
    for line in verify(teacher, student, linear_cache):
        print(line, flush=True)
    rows = []
    for context in args.contexts:
        for name, model in (("teacher (SDPA, KV cache)", teacher), (f"student ({args.mode}, recurrent)", student)):
            r = measure(model, linear_cache, context, args.tokens, args.repeats)
            rows.append({"model": name, "context": context, **{k: round(v, 4) for k, v in r.items()},
                         "prefill_tokens_per_s": round(context / r["prefill_s"], 1)})  # fmt: skip
            print(
                f"  {name:28s} context {context:6d}: prefill {r['prefill_s']:7.2f} s "
                f"({context / r['prefill_s']:6.0f} tok/s), decode {r['decode_ms']:7.1f} ms/token",
                flush=True,
            )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "linearized.csv", rows)
    info = machine_info()
    header = (f"SmolLM2-135M: the teacher against its linearised student ({args.mode}), batch 1, fp32, through "
              f"transformers; median of {args.repeats} prefills and of {args.tokens} decode steps\n\n"
              f"Machine: {info['cpu']} ({info['cores']} cores, {info['threads']} threads), torch {info['torch']}; "
              f"{time.strftime('%Y-%m-%d')}\n" + "".join(f"{line}\n" for line in isa_lines()) + "\n")  # fmt: skip
    table = markdown_table(
        ["model", "context", "prefill s", "prefill tok/s", "decode ms/token (median)", "decode min"],
        [[r["model"], str(r["context"]), fmt(r["prefill_s"], 2), fmt(r["prefill_tokens_per_s"], 0),
          fmt(r["decode_ms"], 1), fmt(r["decode_ms_min"], 1)] for r in rows],
    )  # fmt: skip
    (out / "table.md").write_text(header + table)
    (out / "run.json").write_text(json.dumps({"options": {k: str(v) for k, v in vars(args).items()}, "machine": info},
                                             indent=1))  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        axes[0].plot([r["context"] for r in mine], [r["prefill_s"] for r in mine], marker="o", label=name)
        axes[1].plot([r["context"] for r in mine], [r["decode_ms"] for r in mine], marker="o", label=name)
    for ax, label in ((axes[0], "prefill seconds"), (axes[1], "decode ms per token")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "linearized.png", dpi=110)
    print(header + table)
    print(f"wrote {out / 'linearized.csv'}, {out / 'linearized.png'} and {out / 'table.md'}")
    return 0
