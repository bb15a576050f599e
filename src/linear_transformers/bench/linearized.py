"""A linearised SmolLM2-135M against its softmax teacher, batch 1: prefill time and per-token decode
time against context length. The student decodes through PyTorch (its layers, LinearizedCache) and
through the fused C step (decode/llama.py) in each weight format; the teacher through transformers
with SDPA and its key/value cache; and, where llama-cpp-python is importable, llama.cpp on the
teacher's own GGUF requantised to the same widths (F32, BF16, Q8_0) and as shipped (Q4_1).

    linear-transformers bench linearized                              # contexts 512 ... 32768
    linear-transformers bench linearized --contexts 512 2048 --tokens 8 --student runs/lz-hybrid/model

Speed does not depend on the trained weights: the student is the teacher converted in place
(untrained feature maps) unless --student names a folder. First every decoder is verified: each
model's cached one-token steps must give the logits of its own parallel forward, and the fused step
those of the PyTorch step (float32 to 1e-4, the other formats within their error). Then, per context
and decoder, the prefill is timed (--repeats, median; once from 8k tokens on) and --tokens
single-token steps after it, taking turns between decoders (the median per token, and the min).
The bandwidth floor of each format is the time to read its weights once on the same threads
(`measure.read_f32`), taking turns with the decoders at the smallest context (median of --tokens
passes): the fused step's time there, through the model's forward (inside `weights_fixed`, as
generate() calls it: the weights checked once), as the bare C call (on its
own copy of the state) and through linearize.generate's own loop (the C step and the C sampler at
temperature 1, top-p 0.9: what `linear-transformers sample` runs), is quoted as a multiple of it.
--perplexity DATA.pt (a linearize run's token windows) adds each format's held-out perplexity,
every token through the fused step. Writes linearized.csv, floor.csv, [perplexity.csv],
linearized.png and table.md under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decode import PRECISIONS, DecodeConfig, fused
from ..options import add_options, count, option
from ..results import fmt, isa_lines, machine_info, markdown_table, write_csv
from . import measure
from .llama_cpp import LLAMA_CPP_TYPES, LlamaCpp


@dataclass
class LinearizedOptions:
    contexts: list[int] = count([512, 2048, 8192, 16384, 32768], "context lengths (prompt tokens before decoding)")
    teacher_max: int = count(16384, "longest context for the teacher and llama.cpp (their prefill is quadratic)")
    tokens: int = count(16, "single-token decode steps timed after each prefill, per decoder")
    repeats: int = count(3, "prefills per context and model below 8k tokens (the median counts)")
    formats: list[str] = option(
        list(PRECISIONS),
        "the fused step's weight formats (--cpu-precision names; bf16 only where the CPU has AVX512-BF16)",
    )
    mode: str = option("hybrid", "the student's mode", choices=("linear", "hybrid", "window"))
    student: str = option("", "a linearised model folder (default: the teacher converted, untrained)")
    llama_cpp: list[str] = option(
        ["f32", "bf16", "q8_0", "q4_1"],
        "llama.cpp on the teacher's GGUF in these types "
        "(requantised from the shipped q4_1) where llama-cpp-python is importable; none: "
        "leave it out",
    )
    perplexity: str = option(
        "",
        "a linearize run's data.pt: also the held-out perplexity of each weight format, "
        "through the fused step token by token (both domains)",
    )
    windows: int = count(8, "held-out windows per domain for --perplexity (all at once, as a batch)")
    out: Path = option(Path("results/bench-linearized"), "output folder")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, LinearizedOptions, title="benchmark")


def _models(args):
    from transformers import AutoModelForCausalLM

    from ..linearize import LinearizeConfig, from_linearized, linearize
    from ..linearize.transfer import load_teacher

    if args.student and not (Path(args.student) / "config.json").is_file():
        raise FileNotFoundError(f"bench linearized: --student {args.student} is not a model folder (no config.json)")
    _, teacher = load_teacher()
    if args.student:
        student = AutoModelForCausalLM.from_pretrained(args.student).eval()
    else:
        _, student = load_teacher()
        student = from_linearized(linearize(student, LinearizeConfig(mode=args.mode)))
    teacher.config._attn_implementation = "sdpa"
    return teacher, student


def _cache_for(model):
    from transformers import DynamicCache

    from ..linearize import LinearizedCache

    return LinearizedCache() if hasattr(model.config, "linearize") else DynamicCache(config=model.config)


def _formats(args) -> list[str]:
    unknown = [f for f in args.formats if f not in PRECISIONS]
    if unknown:
        raise ValueError(f"bench linearized: --formats must be among {', '.join(PRECISIONS)}, got {unknown}")
    return [f for f in args.formats if f != "bf16" or fused.has_bf16_dot()]


@torch.no_grad()
def verify(teacher, student, formats: list[str], n: int = 48) -> list[str]:
    """Each model's cached steps against its own parallel forward; the fused step in each format
    against the PyTorch step (float32: 1e-4 of the logits' scale; the others: 5e-2)."""
    tokens = torch.randint(0, teacher.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    lines = []
    runs = [("teacher", teacher, None), ("student, PyTorch step", student, DecodeConfig(fused=False))]
    runs += [(f"student, fused {f}", student, DecodeConfig.precision(f)) for f in formats]
    full = {id(m): m(tokens).logits for m in (teacher, student)}
    for name, model, config in runs:
        if config is not None:
            model.decode_config = config
        cache = _cache_for(model)
        model(tokens[:, : n - 8], cache=cache, use_cache=True)
        steps = [model(tokens[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(n - 8, n)]
        want = full[id(model)][:, n - 8 :]
        err = ((torch.cat(steps, 1) - want).abs().max() / want.abs().max()).item()
        bound = 1e-4 if config is None or config.weights == torch.float32 else 5e-2
        if not err < bound:
            raise RuntimeError(f"bench linearized: the {name}'s cached steps differ from the forward by {err:.2e}")
        lines.append(f"{name}: cached steps = parallel forward (largest logit difference {err:.1e} of the scale)")
    student.decode_config = DecodeConfig()
    return lines


def _decode(model, cache, first: torch.Tensor, tokens: int) -> list[float]:
    times, nxt = [], first
    for _ in range(tokens):
        t0 = time.perf_counter()
        logits = model(nxt, cache=cache, use_cache=True).logits
        times.append(time.perf_counter() - t0)
        nxt = logits[:, -1:].argmax(-1)
    return times


def time_sampling(logits: torch.Tensor, rounds: int) -> list[dict]:
    """One next token from logits [1, V]: the C sampler (decode/llama.sample_tokens, as
    linearize.generate calls it) against transformers' logits processors and torch.multinomial (as
    generate() samples), taking turns; median and min ms per call for three settings."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from ..decode import llama

    ids = torch.zeros(1, 1, dtype=torch.int64)
    work = torch.empty(4 * logits.shape[1])

    def theirs(top_k, top_p):
        scores = TemperatureLogitsWarper(1.0)(ids, logits)
        scores = TopKLogitsWarper(top_k)(ids, scores) if top_k else scores
        scores = TopPLogitsWarper(top_p)(ids, scores) if top_p < 1 else scores
        return torch.multinomial(scores.softmax(-1), 1)

    rows = []
    for top_k, top_p in ((0, 1.0), (0, 0.9), (50, 0.9)):
        fns = {
            "C sampler": lambda k=top_k, p=top_p: llama.sample_tokens(logits, 1.0, k, p, torch.rand(1), work),
            "transformers": lambda k=top_k, p=top_p: theirs(k, p),
        }
        times = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name, ts in times.items():
            rows.append(
                {
                    "sampler": name,
                    "top_k": top_k,
                    "top_p": top_p,
                    "ms": round(statistics.median(ts), 4),
                    "ms_min": round(min(ts), 4),
                }
            )
    return rows


def _prefill(model, ids, repeats: int):
    times = []
    for _ in range(repeats):
        cache = _cache_for(model)
        t0 = time.perf_counter()
        logits = model(ids, cache=cache, use_cache=True).logits
        times.append(time.perf_counter() - t0)
    return statistics.median(times), cache, logits[:, -1:].argmax(-1), logits[:, -1]


@torch.no_grad()
def fused_perplexity(step, windows: torch.Tensor) -> float:
    """Perplexity of windows [B, T] (next-token, as linearize.transfer.perplexity counts it) through
    the fused step alone, from an empty state: every token of every window stepped in C, B rows at once."""
    from ..linearize import HybridState

    B, T = windows.shape
    H, D, F, W, ns = step.n_heads, step.head_dim, step.n_features, step.window, step.sinks
    Hk = step.struct.n_kv_heads  # (the ring and the sinks: one per key/value head)
    zeros = lambda *shape: torch.zeros(*shape)  # noqa: E731
    states = [
        HybridState(
            zeros(B, H, F, D),
            zeros(B, H, F),
            zeros(B, Hk, W, D),
            zeros(B, Hk, W, D),
            zeros(B, Hk, ns, D),
            zeros(B, Hk, ns, D),
        )
        for _ in range(step.struct.n_layers)
    ]
    nll, count = 0.0, 0
    for t in range(T - 1):
        logits = step(windows[:, t], torch.full((B,), t, dtype=torch.int64), states)
        nll += torch.nn.functional.cross_entropy(logits, windows[:, t + 1], reduction="sum").item()
        count += B
    return float(torch.exp(torch.tensor(nll / count)))


def weight_views(step) -> list[torch.Tensor]:
    """The step's weight tensors as float32 views of their bytes (what the bandwidth probe reads)."""
    views = []
    for t in step.weight_tensors():
        flat = t.reshape(-1)
        n = flat.numel() * flat.element_size() // 4
        views.append(flat.view(torch.uint8)[: 4 * n].view(torch.float32))
    return views


def read_once(views: list[torch.Tensor]) -> float:
    """Seconds to read the views once on the fused step's threads (measure.read_f32)."""
    t0 = time.perf_counter()
    measure.read_f32(views)
    return time.perf_counter() - t0


@torch.no_grad()
def main(args: argparse.Namespace) -> int:
    from ..linearize.generate import RecurrentGenerator
    from ..linearize.step import fused_step, weights_fixed

    formats = _formats(args)
    teacher, student = _models(args)
    checks = verify(teacher, student, formats)
    for line in checks:
        print(line, flush=True)
    cpp_tags = [t for t in args.llama_cpp if t != "none"]
    unknown = [t for t in cpp_tags if t not in (*LLAMA_CPP_TYPES, "q4_1")]
    if unknown:
        raise ValueError(
            f"bench linearized: --llama-cpp types must be among {', '.join(LLAMA_CPP_TYPES)}, q4_1 or "
            f"none, got {unknown}"
        )
    if cpp_tags:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            print("llama-cpp-python is not importable: llama.cpp is left out", flush=True)
            cpp_tags = []
    args.out.mkdir(parents=True, exist_ok=True)
    cpp = {
        tag: LlamaCpp(tag, max(c for c in args.contexts if c <= args.teacher_max) + args.tokens + 8) for tag in cpp_tags
    }
    rows = []
    steps = {f: fused_step(student, DecodeConfig.precision(f)) for f in formats}
    views = {f: weight_views(step) for f, step in steps.items()}
    floor_times: dict[str, list[float]] = {f: [] for f in formats}  # the probe taking turns with the decoders
    raw_times: dict[str, list[float]] = {f: [] for f in formats}
    for context in args.contexts:
        repeats = args.repeats if context < 8192 else 1
        ids = torch.randint(
            0, student.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(context)
        )
        decoders = {}  # name -> (callable giving one token's seconds list)
        student.decode_config = DecodeConfig()
        s_prefill, s_cache, s_next, s_logits = _prefill(student, ids, repeats)
        rows.append({"model": f"student ({args.mode}) prefill", "context": context, "prefill_s": s_prefill})
        for name, config in [("student, PyTorch step", DecodeConfig(fused=False))] + [
            (f"student, fused {f}", DecodeConfig.precision(f)) for f in formats
        ]:
            decoders[name] = (config, copy.deepcopy(s_cache))
        own = {  # linearize.generate's loop: the C step and the C sampler (temperature 1, top-p 0.9)
            f"student, own loop {f}, top-p 0.9": RecurrentGenerator.resume(
                student,
                copy.deepcopy(s_cache),
                s_logits,
                top_p=0.9,
                generator=torch.Generator().manual_seed(context),
                config=DecodeConfig.precision(f),
            )
            for f in formats
        }
        if context <= args.teacher_max:
            t_prefill, t_cache, t_next, _ = _prefill(teacher, ids, repeats)
            rows.append({"model": "teacher (SDPA) prefill", "context": context, "prefill_s": t_prefill})
            for tag, runner in cpp.items():
                rows.append(
                    {
                        "model": f"llama.cpp {tag} prefill",
                        "context": context,
                        "prefill_s": runner.prefill(ids[0].tolist()),
                    }
                )
        times = {name: [] for name in [*decoders, *own]}
        if context == min(args.contexts):  # the C step called directly, on its own copy of the prefill's state
            raw_states = {f: [copy.deepcopy(s_cache.states[i]) for i in range(len(s_cache.states))] for f in formats}
            raw_token = s_next[:, 0]

            def raw_call(f, states=raw_states, token=raw_token):
                positions = states[f][0].seen.clone()
                t0 = time.perf_counter()
                steps[f](token, positions, states[f])
                return time.perf_counter() - t0

        if context <= args.teacher_max:
            times["teacher (SDPA, KV cache)"] = []
            times.update({f"llama.cpp {tag}": [] for tag in cpp})
        with weights_fixed(student):  # (as generate() runs its steps: the weights checked once)
            for _ in range(args.tokens):  # one token per decoder in turn, so a slow moment hits all
                for name, (config, cache) in decoders.items():
                    student.decode_config = config
                    times[name] += _decode(student, cache, s_next, 1)
                for name, gen in own.items():
                    t0 = time.perf_counter()
                    gen.next_tokens()
                    times[name].append(time.perf_counter() - t0)
                if context <= args.teacher_max:
                    times["teacher (SDPA, KV cache)"] += _decode(teacher, t_cache, t_next, 1)
                    for tag, runner in cpp.items():
                        times[f"llama.cpp {tag}"] += runner.decode(1)
                if context == min(args.contexts):  # the floor and the bare C call, in the same rounds
                    for f in formats:
                        floor_times[f].append(read_once(views[f]))
                        raw_times[f].append(raw_call(f))
        for name, ts in times.items():
            rows.append(
                {
                    "model": name,
                    "context": context,
                    "decode_ms": statistics.median(ts) * 1e3,
                    "decode_ms_min": min(ts) * 1e3,
                }
            )
        line = ", ".join(f"{n} {statistics.median(t) * 1e3:.1f}" for n, t in times.items())
        print(f"context {context}: decode ms/token: {line}", flush=True)
    student.decode_config = DecodeConfig()
    sampling_rows = time_sampling(s_logits[0:1].float(), args.tokens * 4)
    write_csv(args.out / "sampling.csv", sampling_rows)
    for r in rows:
        for k in ("prefill_s", "decode_ms", "decode_ms_min"):
            if k in r:
                r[k] = round(r[k], 4)
        if "prefill_s" in r:
            r["prefill_tokens_per_s"] = round(r["context"] / r["prefill_s"], 1)
    smallest, floor_rows = min(args.contexts), []
    for f, step in steps.items():
        mine = next(r for r in rows if r["model"] == f"student, fused {f}" and r["context"] == smallest)
        loop = next(r for r in rows if r["model"] == f"student, own loop {f}, top-p 0.9" and r["context"] == smallest)
        floor = statistics.median(floor_times[f]) * 1e3
        raw = statistics.median(raw_times[f]) * 1e3
        floor_rows.append(
            {
                "format": f,
                "weight_mb": round(step.weight_bytes() / 1e6, 1),
                "floor_ms": round(floor, 3),
                "floor_min_ms": round(min(floor_times[f]) * 1e3, 3),
                "fused_ms": mine["decode_ms"],
                "times_floor": round(mine["decode_ms"] / floor, 2),
                "c_call_ms": round(raw, 3),
                "c_call_times_floor": round(raw / floor, 2),
                "own_loop_ms": loop["decode_ms"],
                "own_loop_times_floor": round(loop["decode_ms"] / floor, 2),
            }
        )
    ppl_rows = []
    if args.perplexity:
        data = torch.load(args.perplexity, weights_only=True)
        for domain, key in (("first (held out)", "held_out"), ("second", "second_domain")):
            windows = data[key][: args.windows]
            for f, step in steps.items():
                ppl = fused_perplexity(step, windows)
                ppl_rows.append(
                    {
                        "domain": domain,
                        "format": f,
                        "windows": len(windows),
                        "tokens": windows.numel(),
                        "perplexity": round(ppl, 4),
                    }
                )
                print(f"perplexity, {domain} domain, fused {f}: {ppl:.4f}", flush=True)
        for r in ppl_rows:
            base = next(q["perplexity"] for q in ppl_rows if q["domain"] == r["domain"] and q["format"] == "float32")
            r["vs_float32"] = round(r["perplexity"] / base, 4)
        write_csv(args.out / "perplexity.csv", ppl_rows)
    write_csv(args.out / "linearized.csv", rows)
    write_csv(args.out / "floor.csv", floor_rows)
    report(args, rows, floor_rows, ppl_rows, sampling_rows, checks)
    return 0


def report(args, rows: list[dict], floor_rows: list[dict], ppl_rows: list[dict], sampling_rows=(), checks=()) -> None:
    out = args.out
    info = machine_info()
    header = (
        f"SmolLM2-135M: the teacher against its linearised student ({args.mode}), batch 1, greedy; median of "
        f"{args.tokens} decode steps per decoder (taking turns) after a prefill\n\n"
        f"Machine: {info['cpu']} ({info['cores']} cores, {info['threads']} threads), torch {info['torch']}; "
        f"{time.strftime('%Y-%m-%d')}; command: {getattr(args, 'command_line', '')}\n"
        + "".join(f"{line}\n" for line in isa_lines())
        + "\n"
    )
    decode = [r for r in rows if "decode_ms" in r]
    contexts = sorted({r["context"] for r in decode})
    names = list(dict.fromkeys(r["model"] for r in decode))
    table = "Decode, ms per token (median; the min in parentheses):\n\n" + markdown_table(
        ["decoder", *map(str, contexts)],
        [
            [
                n,
                *[
                    next(
                        (
                            f"{fmt(r['decode_ms'], 1)} ({fmt(r['decode_ms_min'], 1)})"
                            for r in decode
                            if r["model"] == n and r["context"] == c
                        ),
                        "",
                    )
                    for c in contexts
                ],
            ]
            for n in names
        ],
    )
    prefill = [r for r in rows if "prefill_s" in r]
    pnames = list(dict.fromkeys(r["model"] for r in prefill))
    table += "\n\nPrefill, tokens per second:\n\n" + markdown_table(
        ["model", *map(str, contexts)],
        [
            [
                n,
                *[
                    next(
                        (fmt(r["prefill_tokens_per_s"], 0) for r in prefill if r["model"] == n and r["context"] == c),
                        "",
                    )
                    for c in contexts
                ],
            ]
            for n in pnames
        ],
    )
    table += "\n\nThe fused step against the bandwidth floor (its weights read once per token):\n\n" + markdown_table(
        [
            "format",
            "weights MB",
            "floor ms",
            f"through forward, ms (context {min(contexts)})",
            "x floor",
            "C call alone, ms",
            "x floor",
            "own loop + C sampler, ms",
            "x floor",
        ],
        [
            [
                r["format"],
                fmt(r["weight_mb"], 1),
                fmt(r["floor_ms"], 2),
                fmt(r["fused_ms"], 2),
                fmt(r["times_floor"], 2),
                fmt(r["c_call_ms"], 2),
                fmt(r["c_call_times_floor"], 2),
                fmt(r["own_loop_ms"], 2),
                fmt(r["own_loop_times_floor"], 2),
            ]
            for r in floor_rows
        ],
    )
    if sampling_rows:
        table += (
            "\n\nSampling one token from the student's logits at the smallest context, temperature 1, "
            "ms per call (median; the min in parentheses):\n\n"
        )
        ms = {(r["top_k"], r["top_p"], r["sampler"]): r for r in sampling_rows}
        settings = list(dict.fromkeys((r["top_k"], r["top_p"]) for r in sampling_rows))
        table += markdown_table(
            ["top-k", "top-p", "C sampler (linearize.generate)", "transformers' processors + multinomial", "ratio"],
            [
                [
                    str(k),
                    str(p),
                    *[
                        f"{fmt(ms[k, p, n]['ms'], 3)} ({fmt(ms[k, p, n]['ms_min'], 3)})"
                        for n in ("C sampler", "transformers")
                    ],
                    f"{ms[k, p, 'transformers']['ms'] / ms[k, p, 'C sampler']['ms']:.1f}x",
                ]
                for k, p in settings
            ],
        )
    if ppl_rows:
        table += "\n\nHeld-out perplexity through the fused step, per weight format:\n\n" + markdown_table(
            ["domain", "format", "windows x tokens", "perplexity", "/ float32"],
            [
                [
                    r["domain"],
                    r["format"],
                    f"{r['windows']} x {r['tokens'] // r['windows']}",
                    fmt(r["perplexity"], 3),
                    fmt(r["vs_float32"], 4),
                ]
                for r in ppl_rows
            ],
        )
    (out / "table.md").write_text(header + table + "\n")
    from ..results import provenance

    record = {
        "command": getattr(args, "command_line", ""),
        "options": {k: str(v) for k, v in vars(args).items()},
        "machine": info,
        "provenance": provenance(),
        "checks": list(checks),  # (what verify() printed: each decoder's error against the parallel forward)
    }
    (out / "run.json").write_text(json.dumps(record, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        mine = [r for r in decode if r["model"] == n]
        axes[1].plot([r["context"] for r in mine], [r["decode_ms"] for r in mine], marker="o", label=n)
    for n in pnames:
        mine = [r for r in prefill if r["model"] == n]
        axes[0].plot([r["context"] for r in mine], [r["prefill_tokens_per_s"] for r in mine], marker="o", label=n)
    for ax, label in ((axes[0], "prefill tokens per second"), (axes[1], "decode ms per token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "linearized.png", dpi=110)
    print(header + table)
    print(f"wrote {out / 'linearized.csv'}, {out / 'floor.csv'}, {out / 'linearized.png'} and {out / 'table.md'}")
