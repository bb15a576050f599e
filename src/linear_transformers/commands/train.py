"""train (or resume) a causal transformer"""

from __future__ import annotations

import argparse
import dataclasses

from ..checkpoint import model_config, read_config, resolve_checkpoint
from ..model import ModelConfig
from ..options import add_options, from_args
from ..train import PRESETS, TrainConfig, preset, train
from . import apply_preset

# ModelConfig fields that the data decides (vocabulary, length, classes): not options of `train`.
DERIVED_MODEL_FIELDS = ("vocab_size", "n_classes", "max_len")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="a model size and training length, for the options not given: tiny (a minute or two), "
        "small (what make demo trains, ~5 min on MNIST), paper (the paper's image architecture; "
        "hours on a CPU)",
    )
    add_options(p, ModelConfig, skip=DERIVED_MODEL_FIELDS)
    add_options(p, TrainConfig)


def resumed_configs(model_cfg: ModelConfig, train_cfg: TrainConfig, given: set[str]):
    """`train --resume`: every setting left out is the run's own (from its latest checkpoint);
    those given are kept, and train() refuses the ones that would change the run."""
    try:
        ckpt = resolve_checkpoint(train_cfg.out)
    except FileNotFoundError:
        return model_cfg, train_cfg  # train() says there is nothing to resume
    stored = read_config(ckpt)
    model_config(stored, ckpt)  # the run's own settings must make a model (one-line error if damaged)
    model_values = {k: v for k, v in stored["model"].items() if k not in given}
    # (the run folder is where the command line points: it may have moved since)
    train_values = {k: v for k, v in stored.get("train", {}).items() if k not in given and k not in ("resume", "out")}
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return (
        dataclasses.replace(model_cfg, **{k: v for k, v in model_values.items() if k in model_fields}),
        dataclasses.replace(train_cfg, **{k: v for k, v in train_values.items() if k in train_fields}),
    )


def main(args: argparse.Namespace) -> int:
    model_cfg, train_cfg = from_args(ModelConfig, args), from_args(TrainConfig, args)
    if args.preset:
        if train_cfg.resume:
            raise ValueError("train: --preset starts a run; a resumed run keeps its own settings (leave it out)")
        model_values, train_values = preset(args.preset, train_cfg.data)
        model_cfg = apply_preset(model_cfg, model_values, args.given)
        train_cfg = apply_preset(train_cfg, train_values, args.given)
    if train_cfg.resume:
        model_cfg, train_cfg = resumed_configs(model_cfg, train_cfg, args.given)
    ckpt = train(model_cfg, train_cfg)
    print(f"checkpoint: {ckpt}")
    return 0
