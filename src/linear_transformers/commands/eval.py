"""test bits/dim of a checkpoint"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import load_model
from ..options import add_options, from_args, option
from ..train import TrainConfig, evaluate, resolve_device


@dataclass
class EvalConfig:
    checkpoint: str = option("runs/model", "run folder or checkpoint folder")
    batches: int = option(
        0,
        "test batches (0: the whole test split: every image, or for text every character "
        "once, in non-overlapping windows)",
    )
    batch_size: int = option(64, "test sequences per batch")
    data_path: str = option("", "where the data is now (default: where training found it)")
    device: str = option("auto", "auto, cpu or cuda")

    def __post_init__(self) -> None:
        if self.batches < 0:
            raise ValueError(f"--batches must be >= 0 (0: the whole test split), got {self.batches}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")


def run_eval(cfg: EvalConfig) -> float:
    from .. import data as datasets

    device = resolve_device(cfg.device)
    model, config = load_model(cfg.checkpoint, device)
    t = config.get("train")
    if not t:
        raise ValueError(
            f"eval: {cfg.checkpoint} does not record the data it trained on (a transformers folder saved "
            "without `linear-transformers export --hf`); evaluate the checkpoint"
        )
    t = {**TrainConfig().__dict__, **t}  # a transformers folder keeps only the data settings
    data_path = cfg.data_path or t["data_path"] or None
    if data_path and not Path(data_path).exists():
        source = "--data-path" if cfg.data_path else "its config"
        raise FileNotFoundError(
            f"eval: the data {cfg.checkpoint} trained on is not at {data_path} (from {source}); "
            "pass --data-path where it is"
        )
    d = datasets.load(t["data"], data_path, size=t["image_size"], levels=t["levels"], seq_len=t["seq_len"])
    # (the device it trained on may not be here: the evaluation's own)
    train_cfg = TrainConfig(
        **{
            **t,
            "batch_size": cfg.batch_size,
            "conditional": bool(model.cfg.n_classes),
            "device": str(device),
            "data_path": data_path or "",
        }
    )
    n = d.n_items("test")
    # text: non-overlapping windows of the model's length (every character scored once, each window
    # from the start token); images: every test image
    stride = t["seq_len"] if d.is_text else 1
    windows = -(-n // stride)
    batches = min(cfg.batches or windows, -(-windows // cfg.batch_size))
    bpd = evaluate(model, d, train_cfg, device, batches, stride=stride, progress=True)
    scored = min(batches * cfg.batch_size, windows)
    if d.is_text:
        print(f"{d.name} test: {bpd:.4f} bits/char over {scored} non-overlapping windows of {t['seq_len']} characters")
    else:
        print(f"{d.name} test: {bpd:.4f} bits/dim over {scored} images")
    return bpd


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, EvalConfig)


def main(args: argparse.Namespace) -> int:
    run_eval(from_args(EvalConfig, args))
    return 0
