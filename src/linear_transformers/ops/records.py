"""What a causal linear attention backend returns: the typed records of backends.py (kept apart
so that the backends can build them without importing the table that lists them)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Forward(NamedTuple):
    """What a backend's forward returns."""

    y: Tensor  # [B, T, H, Dv], the inputs' dtype
    S: Tensor  # the final state [B, H, Dk, Dv] (float32; float64 for float64 inputs)
    z: Tensor  # [B, H, Dk]
    out_acc: Tensor  # the output in the accumulation dtype where y was rounded to a half type; else empty
    saved: tuple[Tensor, Tensor, Tensor]  # the backend's Saved record: empty tensors unless asked to save

    def outputs(self) -> tuple[Tensor, ...]:
        """The forward operator's seven outputs."""
        return (self.y, self.S, self.z, self.out_acc, *self.saved)


class Grads(NamedTuple):
    dq: Tensor
    dk: Tensor
    dv: Tensor
    dS0: Tensor
    dz0: Tensor


def result(y, S_final, z_final, out_acc, saved: tuple | None, like: torch.Tensor) -> Forward:
    """A kernel backend's Forward, with a distinct empty placeholder for out_acc when it is None and
    for the saved tensors when nothing is saved (operator outputs may not alias one another)."""

    def empty():
        return like.new_empty(0)

    saved = saved if saved is not None else (empty(), empty(), empty())
    return Forward(y, S_final, z_final, empty() if out_acc is None else out_acc, saved)
