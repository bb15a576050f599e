"""Stage 2 of linearisation: a LoRA fine-tune (peft) of the attention projections of a linearised
model, with next-token loss (or, --loss distill, the KL divergence to the teacher's next-token
distribution), on a CPU; resumable; held-out perplexity on both domains at the end.

    linear-transformers finetune --student runs/lz-hybrid/model --out runs/lz-hybrid-lora

`--mode window` fine-tunes the same model with its linear part removed (window + sinks alone), so
the two can be compared trained the same way. `--teacher` fine-tunes the softmax teacher itself, on
the same windows with the same LoRA: the control that says how much of stage 2's gain on held-out
text comes from the text alone rather than from repairing the conversion. The merged model is
written as a transformers folder (not for --teacher: that is the teacher plus a LoRA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..checkpoint import owned_by_training
from ..options import add_options, check_threads, count, from_args, option
from .attention import MODES, PPL_KEYS


@dataclass
class FinetuneConfig:
    student: str = option("runs/lz-hybrid/model", "the linearised model folder (linearize's model/)")
    data: str = option("", "the token windows (default: data.pt in the student's run folder)")
    out: str = option("runs/lz-lora", "run folder: state.pt (resumable), result.json, model/")
    mode: str = option("", "override the student's mode (window: its linear part removed)", choices=("", *MODES))
    teacher: bool = option(False, "fine-tune the softmax teacher instead (the control run; data from --student's run)")
    loss: str = option(
        "next-token",
        "next-token (cross-entropy on the text) or distill (KL divergence to the "
        "teacher's next-token distribution, the teacher run alongside)",
        choices=("next-token", "distill"),
    )
    rank: int = count(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA alpha")
    lr: float = option(1e-3, "AdamW learning rate")
    minutes: float = option(20.0, "training time limit, resumes included")
    steps: int = count(100_000, "optimiser steps at most")
    eval_windows: int = count(16, "held-out windows per domain scored at the end")
    checkpoint_every: int = count(20, "steps between saves of state.pt")
    pack: bool = option(
        False,
        "documents packed: each window's documents (ended by the end-of-text token) attend only to "
        "themselves, and no token is predicted across a boundary (training and evaluation)",
    )
    seed: int = option(0, "seed of the data order")
    threads: int = option(0, "CPU threads (0: torch's default)")

    def __post_init__(self) -> None:
        check_threads("finetune", self.threads)
        if not 0 < self.lr < math.inf or not 0 <= self.minutes < math.inf:
            raise ValueError("finetune: --lr must be > 0 and --minutes >= 0")
        if self.teacher and (self.mode or self.loss == "distill"):
            raise ValueError(
                "finetune: --teacher fine-tunes the softmax teacher with next-token loss; "
                "--mode and --loss distill apply to a student"
            )


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def with_lora(model, rank: int, alpha: float):
    """The model (frozen) with trainable LoRA adapters (peft) on its attention projections."""
    from peft import LoraConfig, get_peft_model

    for prm in model.parameters():
        prm.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_lora(model, lora: dict[str, torch.Tensor]) -> None:
    """A run's saved adapters (state.pt's "lora") into a with_lora model; every one must have its place."""
    params = dict(model.named_parameters())
    missing = [name for name in lora if name not in params]
    if missing:
        raise ValueError(f"finetune: the saved LoRA holds {missing[0]!r}, which this model does not have")
    for name, value in lora.items():
        params[name].data.copy_(value)


def teacher_with_lora(run: Path):
    """The teacher with the LoRA of a `finetune --teacher` run folder (its state.pt), merged."""
    from .transfer import load_teacher

    state = torch.load(run / "state.pt", weights_only=True)
    if not state["settings"].get("teacher"):
        raise ValueError(f"finetune: {run} is a student's run, not a finetune --teacher one; load its model/ folder")
    model = with_lora(load_teacher()[1], state["settings"]["rank"], state["settings"]["alpha"])
    load_lora(model, state["lora"])
    return model.merge_and_unload().eval()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, FinetuneConfig, title="finetune")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    import linear_transformers.linearize  # noqa: F401 (registers linear_llama)

    from ..results import finished, provenance
    from .convert import LinearizedAttention
    from .transfer import inputs, perplexity

    cfg = from_args(FinetuneConfig, args)
    started = provenance()  # (the checkout may move on while it runs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    if (owner := owned_by_training(out)) is not None:
        raise FileExistsError(f"--out {out} lies in {owner}, a training run's folder; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    data = torch.load(Path(cfg.data) if cfg.data else Path(cfg.student).parent / "data.pt", weights_only=True)
    if cfg.teacher:
        from .transfer import load_teacher

        model = load_teacher()[1]
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.student, dtype=torch.float32)
    if cfg.mode:
        for m in model.modules():
            if isinstance(m, LinearizedAttention):
                m.cfg = type(m.cfg)(**{**m.cfg.to_dict(), "mode": cfg.mode})
        model.config.linearize = {**model.config.linearize, "mode": cfg.mode}
    model = with_lora(model, cfg.rank, cfg.alpha)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    step, seconds, log = 0, 0.0, []
    state_path = out / "state.pt"
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        may_change = ("minutes", "steps", "threads", "eval_windows", "checkpoint_every", "student", "data", "out")
        diffs = [
            f"--{k.replace('_', '-')} {v!r} (the run has {state['settings'].get(k)!r})"
            for k, v in asdict(cfg).items()
            if k not in may_change and state["settings"].get(k) != v
        ]
        if diffs:
            raise ValueError(f"finetune: {out} was trained with other settings: {'; '.join(diffs)}")
        load_lora(model, state["lora"])
        opt.load_state_dict(state["optimizer"])
        step, seconds, log = state["step"], state["seconds"], state["log"]
        print(f"resuming {out} at step {step}", flush=True)

    def save() -> None:
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "lora": lora,
                "optimizer": opt.state_dict(),
                "step": step,
                "seconds": seconds,
                "log": log,
                "settings": asdict(cfg),
            },
            tmp,
        )
        os.replace(tmp, state_path)

    teacher = None
    if cfg.loss == "distill":
        from .transfer import load_teacher

        _, teacher = load_teacher()
        for prm in teacher.parameters():
            prm.requires_grad_(False)

    eos = None
    if cfg.pack:
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else 0
        eos = eos[0] if isinstance(eos, list) else eos

    def loss_of(w: torch.Tensor) -> torch.Tensor:
        kwargs, labels = inputs(w, eos)
        if teacher is None:
            return model(input_ids=w, labels=labels, **kwargs).loss
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=w, **kwargs).logits.float(), dim=-1)
        log_q = torch.log_softmax(model(input_ids=w, **kwargs).logits.float(), dim=-1)
        return torch.nn.functional.kl_div(log_q, target, log_target=True, reduction="batchmean") / w.shape[1]

    order = torch.randperm(len(data["train"]), generator=torch.Generator().manual_seed(cfg.seed + 1))
    bar = tqdm(total=cfg.steps, initial=step, desc="LoRA fine-tune", dynamic_ncols=True)
    model.train()
    start = time.perf_counter()
    while step < cfg.steps and seconds + time.perf_counter() - start < cfg.minutes * 60:
        w = data["train"][order[step % len(order)]][None]
        loss = loss_of(w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        log.append({"step": step, "loss": round(loss.item(), 5), "tokens": step * w.shape[1]})
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.checkpoint_every == 0:
            seconds, start = seconds + time.perf_counter() - start, time.perf_counter()
            save()
    bar.close()
    seconds += time.perf_counter() - start
    save()
    model.eval()
    merged = model.merge_and_unload()
    n = cfg.eval_windows
    linearize = None if cfg.teacher else merged.config.linearize
    key = "teacher_lora_ppl" if cfg.teacher else PPL_KEYS[linearize["mode"]]
    tokens = step * data["train"].shape[1]
    result = {
        "command": args.command_line,
        "settings": asdict(cfg),
        "linearize": linearize,
        "stage": 2,
        "steps": step,
        "tokens": tokens,
        "cpu_hours": round(seconds * torch.get_num_threads() / 3600, 3),
        "wall_seconds": round(seconds, 1),
        "eval_windows": n,
        key: perplexity(merged, data["held_out"][:n], eos),
        "second_domain": {key: perplexity(merged, data["second_domain"][:n], eos)},
        "loss_first_last_20": [
            sum(r["loss"] for r in log[:20]) / max(1, len(log[:20])),
            sum(r["loss"] for r in log[-20:]) / max(1, len(log[-20:])),
        ],
        "provenance": finished(started),
    }
    try:
        from transformers import AutoTokenizer

        from .transfer import greedy_samples, load_teacher

        tok = AutoTokenizer.from_pretrained(cfg.student)
        _, teacher = load_teacher()
        result["samples"] = greedy_samples(
            {"teacher": teacher, "teacher + LoRA" if cfg.teacher else "student": merged}, tok
        )
    except (OSError, ValueError, FileNotFoundError) as e:  # (no tokenizer in the folder, no teacher installed)
        result["samples"] = f"not drawn: {e}"
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "loss.csv", "w") as f:
        f.write("step,tokens,loss\n")
        for r in log[:: max(1, len(log) // 400)]:
            f.write(f"{r['step']},{r['tokens']},{r['loss']}\n")
    print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=2))
    if cfg.teacher:  # the control: its number is the result, the model is the teacher's
        print(f"results in {out}: result.json, loss.csv")
        return 0
    from transformers import AutoTokenizer

    from .hf import save_linearized

    try:
        tok = AutoTokenizer.from_pretrained(cfg.student)
    except (OSError, ValueError):
        tok = None  # (a folder saved without one)
    save_linearized(merged, out / "model", tok)
    print(f"results in {out}: result.json, loss.csv, model/")
    return 0
