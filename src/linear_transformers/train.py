"""Training: RAdam/AdamW with warmup and decay, clipping, optional bfloat16 autocast, evaluation in
bits per dimension, checkpoints that a killed run resumes from exactly, and data parallelism under
torchrun (gloo on CPU, nccl on GPUs).

Checkpoints and the run folder's layout: checkpoint.py (a run folder is locked while a training
writes to it, and a fresh run starts only in a new or empty folder). A loss or gradient that stops being finite
ends the run (TrainingDiverged) before the optimiser applies it, so no checkpoint ever holds NaN
weights; SIGINT/SIGTERM end it at the next step boundary with a checkpoint (then KeyboardInterrupt).
`resume` continues the run exactly: settings that would change it are refused, naming each.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import data as datasets
from .checkpoint import (
    RunLock,
    check_fresh_run,
    load_into,
    load_state,
    load_weights,
    model_config,
    read_config,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import (  # noqa: F401 (train's public names: train.TrainConfig, train.preset ...)
    PRESETS,
    RESUME_MAY_CHANGE,
    TrainConfig,
    preset,
    resolve_device,
)
from .model import CausalTransformer, ModelConfig


class TrainingDiverged(ArithmeticError):
    """The loss or the gradient norm stopped being finite."""


# ---- data order ---------------------------------------------------------------------------------


class Sampler:
    """Batches of item indices: a fresh random permutation per epoch, from its own generator, so
    the order is fixed by the seed and resumable from `state_dict`. Every data-parallel rank draws
    the same global batch and keeps its own slice."""

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        self.n_items, self.batch_size = n_items, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n_items, generator=self.generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            take = self.perm[self.pos : self.pos + need]
            out.append(take)
            self.pos += len(take)
            need -= len(take)
            if self.pos == self.n_items:
                self.perm, self.pos = torch.randperm(self.n_items, generator=self.generator), 0
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], state["pos"]


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 1.0


# ---- checkpoints ----------------------------------------------------------------------------------


def data_meta(d: datasets.SequenceData) -> dict:
    return {
        "name": d.name,
        "vocab_size": d.vocab_size,
        "seq_len": d.seq_len,
        "n_classes": d.n_classes,
        "image_shape": list(d.image_shape) if d.image_shape else None,
        "alphabet": d.alphabet,
    }


# ---- the loop -------------------------------------------------------------------------------------


def _setup_distributed(device: torch.device) -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


@torch.no_grad()
def evaluate(
    model: CausalTransformer,
    d: datasets.SequenceData,
    cfg: TrainConfig,
    device,
    batches: int,
    stride: int | None = None,
    progress: bool = False,
) -> float:
    """Bits per dimension (per token) on the first `batches` batches of the test split. Text's test
    items are windows starting at every character: `stride` picks every stride-th (default: spread
    over the split); images are taken in order."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    n = d.n_items("test")
    if stride is None:
        stride = max(1, n // (batches * cfg.batch_size)) if d.is_text else 1
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=batches, desc="eval", unit="batch", dynamic_ncols=True)
    for b in range(batches):
        idx = (torch.arange(cfg.batch_size) + b * cfg.batch_size) * stride
        idx = idx[idx < n]
        if len(idx) == 0:
            break
        tokens, labels = d.get("test", idx)
        labels = labels.to(device) if labels is not None and cfg.conditional else None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            nll = model.nll(tokens.to(device), labels)
        total += nll.double().sum().item()
        count += nll.numel()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)
    return total / max(count, 1) / math.log(2)


def train(model_cfg: ModelConfig, cfg: TrainConfig, data: datasets.SequenceData | None = None) -> Path:
    """Train (or resume) a model; returns the last checkpoint's folder.

    Under `torchrun` (WORLD_SIZE > 1) the process group is created here and destroyed on the way out:
    a gloo group left alive at interpreter exit aborts the process ("terminate called without an
    active exception") after the run has finished.
    """
    device = resolve_device(cfg.device)
    owns_group = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized()
    try:
        rank, world = _setup_distributed(device)
        # rank 0 writes the run folder: it holds the folder's lock from the first check to the last checkpoint
        with RunLock(Path(cfg.out)) if rank == 0 else contextlib.nullcontext():
            return _train(model_cfg, cfg, data, device, rank, world)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    model_cfg: ModelConfig, cfg: TrainConfig, data: datasets.SequenceData | None, device, rank: int, world: int
) -> Path:
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    cp = cfg.context_parallel
    if world % cp:
        raise ValueError(f"context_parallel={cp} must divide the number of ranks torchrun started (WORLD_SIZE={world})")
    if cp > 1 and model_cfg.attention != "causal-linear":
        raise ValueError(f"context_parallel={cp} needs causal-linear attention, not {model_cfg.attention!r}")
    # ranks [g cp, (g + 1) cp) share the sequences of data-parallel rank g (new_group: every rank makes every group)
    groups = [dist.new_group(list(range(g, g + cp))) for g in range(0, world, cp)] if cp > 1 else None
    group = groups[rank // cp] if groups else None
    dp_rank, dp_world = rank // cp, world // cp
    if cfg.batch_size % dp_world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {dp_world} data-parallel ranks")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.data_path:  # stored absolute: eval and sample may run from another directory
        cfg = replace(cfg, data_path=str(Path(cfg.data_path).resolve()))
    run = Path(cfg.out)
    d = data or datasets.load(
        cfg.data, cfg.data_path or None, size=cfg.image_size, levels=cfg.levels, seq_len=cfg.seq_len
    )
    model_cfg = replace(
        model_cfg,
        vocab_size=d.vocab_size,
        max_len=d.seq_len,
        n_classes=d.n_classes if cfg.conditional else 0,
    )
    torch.manual_seed(cfg.seed)
    model = CausalTransformer(model_cfg).to(device)
    opt_cls = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.AdamW
    optimizer = opt_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(cfg, s))
    sampler = Sampler(d.n_items("train"), cfg.batch_size, cfg.seed)
    step, trained_before = 0, 0.0  # seconds of training in earlier processes of this run
    if cfg.resume:
        if not (run / "latest").exists():
            raise FileNotFoundError(
                f"resume: {run} holds no run to resume (no 'latest' file); leave out --resume to start one there"
            )
        ckpt = resolve_checkpoint(run)
        stored = read_config(ckpt)
        model_config(stored, ckpt)  # the run's settings make a model (else a one-line error naming them)
        check_resume(run, stored, model_cfg, cfg)
        load_into(model, load_weights(ckpt, stored), ckpt)
        state = load_state(ckpt)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{ckpt / 'state.pt'} does not fit this run ({e}): the checkpoint is damaged") from None
        step = state["step"]
        trained_before = float(state.get("train_seconds", 0.0))  # (absent in older checkpoints)
        if rank == 0:
            print(f"resuming {run} from {ckpt.name}", flush=True)
    elif rank == 0:
        check_fresh_run(run)  # a fresh run must not mix its checkpoints with (or prune) another's
    # (under context parallelism the start embedding serves the first segment only)
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=cp > 1) if world > 1 else model
    meta = data_meta(d)

    def checkpoint(at: int) -> None:
        if rank == 0:
            extra = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(),
                "rng": torch.get_rng_state(),
                "step": at,
                "train_seconds": trained_before + time.perf_counter() - start,  # time_limit spans resumes
            }
            save_checkpoint(run, at, model, model_cfg, asdict(cfg), meta, extra, cfg.keep)
        if world > 1:
            dist.barrier()

    log_path = run / "log.csv"
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        if not log_path.exists() or step == 0:
            with open(log_path, "w", newline="") as f:
                csv.writer(f).writerow(["step", "loss", "bits_per_dim", "lr", "tokens_per_s", "test_bits_per_dim"])
    bar = None
    if cfg.progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {d.name}", unit="step", dynamic_ncols=True)
    local = cfg.batch_size // dp_world
    start, tokens_seen = time.perf_counter(), 0
    model.train()
    with _StopOnSignal() as stop:
        while step < cfg.steps:
            idx = sampler.next()[dp_rank * local : (dp_rank + 1) * local]
            tokens, labels = d.get("train", idx)
            tokens = tokens.to(device)
            labels = labels.to(device) if labels is not None and model_cfg.n_classes else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                if group is None:
                    loss = model.head.nll(net(tokens, labels), tokens.long()).mean()
                else:  # this rank's share of the sequences' mean loss
                    params = net(tokens, labels, context_group=group)
                    segment = model.head.nll(params, tokens[:, model.segment(tokens.shape[1], group)].long())
                    loss = segment.sum() / tokens.numel()
            optimizer.zero_grad(set_to_none=True)
            # data parallelism averages the gradients over all ranks; the cp ranks of a group hold parts
            # of one loss, whose gradients add up
            (loss * cp).backward()
            if group is not None:
                loss = loss.detach()
                dist.all_reduce(loss, group=group)
            loss_value = loss.item()
            # (max_norm inf: the norm, no clipping; under data parallelism the gradients are already
            # averaged, so every rank sees the same norm)
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or math.inf))
            diverged = not (math.isfinite(loss_value) and math.isfinite(norm))
            if world > 1:  # (each rank's loss is its own): every rank stops together
                flag = torch.tensor([float(diverged)], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                diverged = bool(flag.item())
            if diverged:
                if bar is not None:
                    bar.close()
                what = f"loss {loss_value}" if not math.isfinite(loss_value) else f"gradient norm {norm}"
                latest = (run / "latest").read_text().strip() if (run / "latest").exists() else "none yet"
                raise TrainingDiverged(
                    f"train: the {what} at step {step + 1} is not finite; stopped before applying it (the last "
                    f"checkpoint, {latest}, is untouched). Try a lower --lr, --clip 1 or a longer --warmup"
                )
            optimizer.step()
            scheduler.step()
            step += 1
            tokens_seen += tokens.numel() * dp_world
            bpd = loss_value / math.log(2)
            test_bpd = None
            if rank == 0 and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps):
                test_bpd = evaluate(model, d, cfg, device, cfg.eval_batches)
            elapsed = time.perf_counter() - start
            tok_s = tokens_seen / max(elapsed, 1e-9)
            if rank == 0:
                with open(log_path, "a", newline="") as f:
                    lr = scheduler.get_last_lr()[0]
                    csv.writer(f).writerow(
                        [
                            step,
                            f"{loss_value:.5f}",
                            f"{bpd:.4f}",
                            f"{lr:.3g}",
                            f"{tok_s:.0f}",
                            "" if test_bpd is None else f"{test_bpd:.4f}",
                        ]
                    )
                if bar is not None:
                    post = {"loss": f"{loss_value:.3f}", "bpd": f"{bpd:.3f}", "tok/s": f"{tok_s:.0f}"}
                    if test_bpd is not None:
                        post["test_bpd"] = f"{test_bpd:.3f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
            out_of_time = cfg.time_limit and trained_before + time.perf_counter() - start > cfg.time_limit
            interrupted = stop.name is not None
            if world > 1:  # every rank stops at the same step
                flags = torch.tensor([float(bool(out_of_time)), float(interrupted)], device=device)
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                out_of_time, interrupted = bool(flags[0].item()), bool(flags[1].item())
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or out_of_time or interrupted:
                checkpoint(step)
            if interrupted:
                if bar is not None:
                    bar.close()
                if rank == 0:
                    print(
                        f"\n{stop.name or 'a signal'} at step {step}: checkpoint step-{step:06d} written to {run}; "
                        "--resume continues",
                        flush=True,
                    )
                raise KeyboardInterrupt
            if out_of_time:
                if rank == 0:
                    print(f"\nstopped at step {step}: time limit of {cfg.time_limit:.0f} s", flush=True)
                break
            if bar is None and rank == 0 and step % 100 == 0:
                print(f"step {step}: loss {loss_value:.4f}, {bpd:.3f} bits/dim, {tok_s:.0f} tokens/s", flush=True)
    if bar is not None:
        bar.close()
    if world > 1:
        _check_ranks_agree(model)
    return resolve_checkpoint(run)


class _StopOnSignal:
    """SIGINT/SIGTERM during training set a flag; the loop checkpoints at the end of the step and
    stops. A second signal interrupts at once. Only the main thread can hold signal handlers."""

    def __init__(self) -> None:
        self.name: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def check_resume(run: Path, stored: dict, model_cfg: ModelConfig, cfg: TrainConfig) -> None:
    """A resumed run continues exactly: refuse settings that differ from the run's (but those in
    RESUME_MAY_CHANGE), naming each."""

    def same(a, b) -> bool:
        return json.loads(json.dumps(a)) == json.loads(json.dumps(b))

    diffs = [
        f"{k}={v!r} (the run has {stored['train'][k]!r})"
        for k, v in asdict(cfg).items()
        if k not in RESUME_MAY_CHANGE and k in stored.get("train", {}) and not same(v, stored["train"][k])
    ]
    diffs += [
        f"{k}={v!r} (the run has {stored['model'][k]!r})"
        for k, v in model_cfg.to_dict().items()
        if k in stored["model"] and not same(v, stored["model"][k])
    ]
    if diffs:
        raise ValueError(
            f"resume: {run} was trained with other settings: {'; '.join(diffs)}. A resumed run continues "
            "exactly; leave these out (the command line then takes the run's own)"
        )


def _check_ranks_agree(model: torch.nn.Module) -> None:
    """Data parallelism must leave every rank with the same parameters; fail loudly if not."""
    flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    lo, hi = flat.clone(), flat.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if not torch.equal(lo, hi):
        raise RuntimeError(f"data-parallel ranks disagree on parameters (max difference {(hi - lo).max().item():.3g})")
    if dist.get_rank() == 0:
        print(f"data-parallel check: all {dist.get_world_size()} ranks hold identical parameters", flush=True)
