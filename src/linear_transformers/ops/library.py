"""Causal linear attention as registered PyTorch operators, so `torch.compile(..., fullgraph=True)`
treats it as one opaque node (no graph break) whichever backend computes it.

    linear_transformers::causal_linear_attention_fwd(q, k, v, S0, z0, eps, chunk_size, backend, save)
        -> (y, S_final, z_final, out_acc, *saved)            a backends.Forward, flattened
    linear_transformers::causal_linear_attention_bwd(q, k, v, y, out_acc, saved0, saved1, saved2,
                                                     dy, dS_final, dz_final, eps, chunk_size, backend)
        -> (dq, dk, dv, dS0, dz0)                            a backends.Grads

An operator's outputs must be flat tensors: the three `saved` ones are the backend's Saved record
(what its forward keeps for its backward, one state per chunk, the normaliser...), empty when `save`
is False, rebuilt into that record before the backend's backward sees them. The autograd formula
registered on the forward calls the backward operator. Fake implementations give every output's
shape, dtype and device without computing anything.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import BACKENDS
from .validation import accumulation_dtype


@torch.library.custom_op("linear_transformers::causal_linear_attention_fwd", mutates_args=())
def causal_linear_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, S0: Tensor, z0: Tensor, eps: float, chunk_size: int, backend: str, save: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return BACKENDS[backend].forward(q, k, v, S0, z0, eps, chunk_size, save).outputs()


@causal_linear_attention_fwd.register_fake
def _(q, k, v, S0, z0, eps, chunk_size, backend, save):
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    acc = accumulation_dtype(q.dtype)
    empty = q.new_empty(0, dtype=acc)
    half = q.dtype != acc and BACKENDS[backend].keeps_float_output(q.dtype)
    out_acc = q.new_empty(B, T, H, Dv, dtype=acc) if save and half else empty
    saved = [
        q.new_empty(shape, dtype=acc) if save else empty
        for shape in BACKENDS[backend].saved_shapes(B, T, H, Dk, Dv, chunk_size)
    ]
    return q.new_empty(B, T, H, Dv), S0.new_empty(S0.shape), z0.new_empty(z0.shape), out_acc, *saved


@torch.library.custom_op("linear_transformers::causal_linear_attention_bwd", mutates_args=())
def causal_linear_attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    y: Tensor,
    out_acc: Tensor,
    saved0: Tensor,
    saved1: Tensor,
    saved2: Tensor,
    dy: Tensor,
    dS_final: Tensor,
    dz_final: Tensor,
    eps: float,
    chunk_size: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    b = BACKENDS[backend]
    return tuple(
        b.backward(q, k, v, y, out_acc, b.Saved(saved0, saved1, saved2), dy, dS_final, dz_final, eps, chunk_size)
    )


@causal_linear_attention_bwd.register_fake
def _(q, k, v, y, out_acc, saved0, saved1, saved2, dy, dS_final, dz_final, eps, chunk_size, backend):
    return (
        q.new_empty(q.shape),
        k.new_empty(k.shape),
        v.new_empty(v.shape),
        dS_final.new_empty(dS_final.shape),
        dz_final.new_empty(dz_final.shape),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, S0, z0, eps, chunk_size, backend, _save = inputs
    y, _, _, out_acc, *saved = output
    ctx.save_for_backward(q, k, v, y, out_acc, *saved)
    # The extra outputs never receive gradients; materialising zeros for them would allocate one
    # more copy of every per-chunk state during the backward.
    ctx.set_materialize_grads(False)
    ctx.eps, ctx.chunk_size, ctx.backend = eps, chunk_size, backend
    ctx.state_shapes = (S0.shape, z0.shape)


def _gradients(ctx, dy, dS_final, dz_final, eager: bool):
    """(dq, dk, dv, dS0, dz0) from what _setup_context kept: by the registered backward operator, or
    (eager) the backend's backward called directly."""
    if torch.is_grad_enabled() and not BACKENDS[ctx.backend].twice_differentiable:  # backward(create_graph=True)
        raise NotImplementedError(
            f"causal_linear_attention: backend {ctx.backend!r} has no double backward (create_graph=True, "
            "torch.autograd.grad of a gradient); backend='naive' has one (plain autograd)"
        )
    q, k, v, y, out_acc, *saved = ctx.saved_tensors
    if saved[0].numel() == 0:
        raise RuntimeError("causal_linear_attention: backward through a forward that kept nothing (save=False)")
    acc = saved[0].dtype
    dy = torch.zeros_like(y) if dy is None else dy
    dS_final = q.new_zeros(ctx.state_shapes[0], dtype=acc) if dS_final is None else dS_final
    dz_final = q.new_zeros(ctx.state_shapes[1], dtype=acc) if dz_final is None else dz_final
    if eager:
        b = BACKENDS[ctx.backend]
        with torch.autocast(q.device.type, enabled=False):  # (a backward called inside an autocast block)
            return b.backward(q, k, v, y, out_acc, b.Saved(*saved), dy, dS_final, dz_final, ctx.eps, ctx.chunk_size)
    return torch.ops.linear_transformers.causal_linear_attention_bwd(
        q, k, v, y, out_acc, *saved, dy, dS_final, dz_final, ctx.eps, ctx.chunk_size, ctx.backend
    )


def _backward(ctx, dy, dS_final, dz_final, *_):
    return (*_gradients(ctx, dy, dS_final, dz_final, eager=False), None, None, None, None)


causal_linear_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class EagerCausalLinearAttention(torch.autograd.Function):
    """The registered operators' forward and backward, calling the backend directly: outside
    torch.compile this skips the custom-operator dispatch and its autograd wrapper, a fixed cost
    per call that shows at small sizes (bench dispatch; BENCHMARKS.md, "The eager path").
    apply(q, k, v, S0, z0, eps, chunk_size, backend) -> (y, S_final, z_final), keeping what the
    backward needs."""

    @staticmethod
    def forward(ctx, q, k, v, S0, z0, eps, chunk_size, backend):
        out = BACKENDS[backend].forward(q, k, v, S0, z0, eps, chunk_size, True).outputs()
        _setup_context(ctx, (q, k, v, S0, z0, eps, chunk_size, backend, True), out)
        return out[:3]

    @staticmethod
    def backward(ctx, dy, dS_final, dz_final):
        return (*_gradients(ctx, dy, dS_final, dz_final, eager=True), None, None, None)
