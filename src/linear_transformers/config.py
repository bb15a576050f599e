"""The settings of a model and of its training: ModelConfig (what CausalTransformer builds),
TrainConfig (what `train` does), the named presets of both, and which training settings a resumed
run may change. Each field is a command-line option (options.option) with its default and help."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from . import data as datasets
from .attention import ATTENTION_KINDS
from .feature_maps import FEATURE_MAPS
from .heads import HEADS
from .options import check_threads, option

POSITIONAL = ("sinusoidal", "learned", "none")
NORMS = ("pre", "post")


@dataclass
class ModelConfig:
    vocab_size: int = option(256, "values a token takes: 256 pixel levels, or the characters of a text")
    n_classes: int = option(0, "> 0: class-conditional; the class label is the start token")
    max_len: int = option(784, "longest sequence the positional encoding covers (28 x 28 pixels)")
    d_model: int = option(256, "width of the residual stream")
    n_layers: int = option(8, "transformer blocks")
    n_heads: int = option(8, "attention heads per block")
    d_ff: int = option(1024, "width of each block's feed-forward layer")
    dropout: float = option(0.0, "dropout on embeddings, attention and feed-forward outputs")
    attention: str = option("causal-linear", '"causal-linear" (the paper\'s); baselines "causal-softmax", "causal-lsh"')
    feature_map: str = option("elu", "phi of linear attention, a name in feature_maps.FEATURE_MAPS")
    positional: str = option("sinusoidal", '"sinusoidal", "learned" or "none"')
    norm: str = option(
        "pre", 'layer norm before each sublayer ("pre") or after the residual add ("post", the paper\'s)'
    )
    head: str = option("categorical", '"categorical" softmax, or "mol": discretised mixture of logistics (images)')
    mol_components: int = option(10, 'mixture components of the "mol" head')
    eps: float = option(1e-6, "normaliser epsilon of linear attention")
    chunk_size: int = option(64, "chunk of the parallel causal linear attention")
    lsh_hashes: int = option(1, 'hashing rounds of "causal-lsh" attention (the paper ran 1, 4 and 8)')
    lsh_buckets: int = option(64, 'hash buckets of "causal-lsh" attention (even)')
    lsh_chunk: int = option(0, "sorted positions per LSH chunk; 0: the average bucket, ceil(length / lsh_buckets)")

    def __post_init__(self) -> None:
        def choose(name, value, choices):
            if value not in choices:
                raise ValueError(f"ModelConfig: {name}={value!r} is not one of {', '.join(map(repr, choices))}")

        choose("attention", self.attention, [k for k in ATTENTION_KINDS if k.startswith("causal")])
        choose("feature_map", self.feature_map, list(FEATURE_MAPS))
        if self.attention == "causal-linear" and not FEATURE_MAPS[self.feature_map].non_negative:
            raise ValueError(
                f"ModelConfig: feature_map={self.feature_map!r} can give negative similarities, so the "
                "causal normaliser can reach zero and training diverges; use elu, relu, favor, hedgehog "
                "or taylor"
            )
        choose("positional", self.positional, POSITIONAL)
        choose("norm", self.norm, NORMS)
        choose("head", self.head, list(HEADS))
        for name in (
            "vocab_size",
            "max_len",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
            "chunk_size",
            "lsh_hashes",
            "mol_components",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.lsh_buckets < 2 or self.lsh_buckets % 2 or self.lsh_chunk < 0:
            raise ValueError(
                f"ModelConfig: lsh_buckets must be even and >= 2 and lsh_chunk >= 0, "
                f"got {self.lsh_buckets} and {self.lsh_chunk}"
            )
        if self.n_classes < 0:
            raise ValueError(f"ModelConfig: n_classes must be >= 0, got {self.n_classes}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"ModelConfig: dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.eps < math.inf:
            raise ValueError(f"ModelConfig: eps must be a finite number >= 0, got {self.eps}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainConfig:
    data: str = option("mnist", "dataset: mnist, fashion-mnist, digits, cifar10 or text")
    data_path: str = option("", "folder or file for datasets that are not bundled (IDX, CIFAR-10 binary, text)")
    image_size: int = option(0, "average-pool images to this side (0 keeps them; 14 halves MNIST)")
    levels: int = option(0, "quantise pixels to this many levels (0 keeps 256)")
    seq_len: int = option(256, "window length of text datasets")
    conditional: bool = option(True, "condition on the class label (image datasets)")
    out: str = option("runs/model", "run folder: checkpoints and log")
    steps: int = option(2000, "optimiser steps in all (a resumed run continues up to this)")
    batch_size: int = option(32, "global batch, split across data-parallel ranks")
    context_parallel: int = option(
        1,
        "ranks that share each sequence under torchrun, each holding a segment (context parallelism, "
        "causal-linear attention); the data-parallel ranks are WORLD_SIZE / this",
    )
    optimizer: str = option("radam", "radam or adamw")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.0, "weight decay (AdamW's decoupled; L2 for RAdam)")
    warmup: int = option(100, "steps of linear warmup")
    schedule: str = option("cosine", "after warmup: cosine (to 10% of lr), linear (to 0) or constant")
    clip: float = option(1.0, "gradient norm clipping (0: off)")
    bf16: bool = option(False, "bfloat16 autocast for forward and loss")
    eval_every: int = option(500, "steps between evaluations on the test split (0: only at the end)")
    eval_batches: int = option(20, "test batches per evaluation")
    checkpoint_every: int = option(200, "steps between checkpoints (and one at the end)")
    keep: int = option(2, "checkpoints kept in the run folder")
    time_limit: float = option(
        0.0, "stop after this many seconds of training, resumes included, with a checkpoint (0: none)"
    )
    resume: bool = option(False, "continue from the run folder's latest checkpoint")
    seed: int = option(0, "seed of the initialisation, data order and sampling")
    threads: int = option(0, "CPU threads (0: torch's default)")
    device: str = option("auto", "auto (cuda when available), cpu or cuda")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        if self.data not in datasets.DATASETS:
            raise ValueError(f"TrainConfig: data={self.data!r} is not one of {', '.join(datasets.DATASETS)}")
        if self.optimizer not in ("radam", "adamw"):
            raise ValueError(f"TrainConfig: optimizer must be 'radam' or 'adamw', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"TrainConfig: schedule must be cosine, linear or constant, got {self.schedule!r}")
        for name in ("steps", "batch_size", "checkpoint_every", "keep", "eval_batches", "context_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("image_size", "warmup", "eval_every", "threads", "weight_decay", "clip", "time_limit"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig: {name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig: lr must be a finite number > 0, got {self.lr}")
        if self.levels == 1 or self.levels < 0 or self.levels > 256:
            raise ValueError(f"TrainConfig: levels must be in [2, 256] (0 keeps 256), got {self.levels}")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig: seq_len must be >= 2, got {self.seq_len}")
        check_threads("TrainConfig", self.threads)
        resolve_device(self.device)


def resolve_device(name: str) -> torch.device:
    """--device: "auto" (CUDA when there is one), "cpu", "cuda" or "cuda:N", checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if not torch.backends.cuda.is_built() else "no CUDA device found"
            raise ValueError(f"device {name!r}: {why}; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# Settings a resumed run may change: how long it goes on, how often it reports and saves, where it
# runs. Every other one (model, data, optimiser, schedule, batch, seed) must be the run's own.
RESUME_MAY_CHANGE = (
    "steps",
    "time_limit",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep",
    "resume",
    "threads",
    "device",
    "progress",
    "out",
    "data_path",
    "context_parallel",
)


# ---- presets --------------------------------------------------------------------------------------

PRESETS = ("tiny", "small", "paper")
_PRESET_MODELS = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_ff": 512},
    "paper": {"d_model": 256, "n_layers": 8, "n_heads": 8, "d_ff": 1024},
}
_PRESET_TRAINING = {
    "tiny": {"steps": 300, "batch_size": 16, "lr": 3e-3, "warmup": 30, "seq_len": 128},
    "small": {"steps": 900, "batch_size": 32, "lr": 2e-3, "warmup": 50, "seq_len": 256},
    "paper": {"steps": 10_000, "batch_size": 32, "lr": 1e-3, "warmup": 500, "seq_len": 256},
}


def preset(name: str, data: str) -> tuple[dict, dict]:
    """(ModelConfig values, TrainConfig values) of a named size for data set `data`:

        tiny    2 layers, d_model 64, 300 steps: a minute or two on 2 cores, to see it work
        small   4 layers, d_model 128, 900 steps: what `make demo` trains (~5 min on MNIST)
        paper   the paper's image architecture (8 layers, d_model 256, 8 heads; 16 layers on
                CIFAR-10) on full-size images, 10,000 steps: hours on a CPU

    tiny and small pool MNIST and Fashion-MNIST to 14 x 14 and 16 grey levels (a quarter of the
    tokens, as the demo does)."""
    if name not in PRESETS:
        raise ValueError(f"train: preset must be one of {', '.join(PRESETS)}, got {name!r}")
    model, training = dict(_PRESET_MODELS[name]), dict(_PRESET_TRAINING[name])
    if name == "paper" and data == "cifar10":
        model["n_layers"] = 16
    if name != "paper" and data in ("mnist", "fashion-mnist"):
        training |= {"image_size": 14, "levels": 16}
    return model, training
