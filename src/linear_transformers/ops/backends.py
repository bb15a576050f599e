"""The backends of causal linear attention: one table, BACKENDS, keyed by name, and the typed records
they pass.

    causal_linear_attention(..., backend=name)  ->  BACKENDS[name].forward / .backward  (the math)

A kernel backend (chunked.py, cpu/, triton/) provides

    run_forward(q, k, v, S0, z0, eps, chunk_size, save) -> Forward
    run_backward(q, k, v, y, out_acc, saved, dy, dS_final, dz_final, eps, chunk_size) -> Grads
    Saved            a NamedTuple of the three tensors its forward keeps for the backward
    saved_shapes(B, T, H, Dk, Dv, chunk_size) -> the shapes of those three

and "naive" is differentiated by PyTorch itself (backward None). Under torch.compile the kernel
backends run behind one registered operator pair (library.py), whose outputs are these records
flattened; in eager mode the same functions are called directly (library.EagerCausalLinearAttention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import chunked, cpu, naive
from . import triton as triton_backend
from .records import Forward, Grads, result
from .state import LinearState

__all__ = ["BACKENDS", "Backend", "Forward", "Grads"]


def _anywhere(device: torch.device) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One backend: its math, and what it supports and why not, so that choosing one (by name or by
    "auto", ops._causal_backend) is a loop over the table, not a branch per name."""

    name: str
    forward: Callable[..., Forward]  # (q, k, v, S0, z0, eps, chunk_size, save) -> Forward
    backward: Callable[..., Grads] | None  # None: PyTorch differentiates `forward` itself
    Saved: type | None = None  # the NamedTuple of what `forward` keeps for `backward`
    saved_shapes: Callable[..., tuple[tuple[int, ...], ...]] | None = None
    # autograd can differentiate its backward again (create_graph=True): only where PyTorch
    # differentiates the forward itself (the chunked backward writes into out= buffers)
    twice_differentiable: bool = True
    device_type: str | None = None  # the one kind of device whose tensors it takes (None: any)
    why_unavailable: Callable[[torch.device], str | None] = _anywhere  # None where it can run
    check_shapes: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None  # its limits: one-line errors
    chunk: int | None = None  # its fixed chunk, where chunk_size is not its parameter
    # "auto" considers it for these inputs (None: never; the default is "chunked") ...
    auto_candidate: Callable[[torch.Tensor, torch.Tensor], bool] | None = None
    # ... and, where it is available, takes it when this says it was measured faster here
    auto_faster: Callable[[], bool] = lambda: True
    # with these half-precision inputs its forward keeps a float32 copy of the output for the backward
    keeps_float_output: Callable[[torch.dtype], bool] = lambda dtype: True


def _naive_forward(q, k, v, S0, z0, eps: float, chunk_size: int, save: bool) -> Forward:
    y, state = naive.causal_linear_attention(q, k, v, initial_state=LinearState(S0, z0, 0), eps=eps)
    return result(y, state.S, state.z, None, None, like=y)


def _kernel(module, **supports) -> Backend:
    return Backend(
        module.NAME,
        module.run_forward,
        module.run_backward,
        module.Saved,
        module.saved_shapes,
        twice_differentiable=False,
        **supports,
    )


def _triton_candidate(q: torch.Tensor, v: torch.Tensor) -> bool:
    dims_fit = q.shape[-1] <= triton_backend.MAX_DIM and v.shape[-1] <= triton_backend.MAX_DIM
    return q.device.type == "cuda" and q.dtype != torch.float64 and dims_fit


# (the lambdas look the module functions up at each call: tests and the prepare command replace them)
BACKENDS: dict[str, Backend] = {
    "naive": Backend("naive", _naive_forward, None),
    "chunked": _kernel(chunked),
    "cpu": _kernel(
        cpu,
        device_type="cpu",
        why_unavailable=lambda device: None if cpu.available() else cpu.unavailable_reason(),
        auto_candidate=lambda q, v: q.device.type == "cpu",
        auto_faster=lambda: cpu.auto_uses_kernel(),
        keeps_float_output=lambda dtype: dtype != torch.bfloat16,  # bfloat16 runs in the kernel as it is
    ),
    "triton": _kernel(
        triton_backend,
        why_unavailable=lambda device: triton_backend.unavailable_reason(device),
        check_shapes=lambda fn, q, v: triton_backend.check_shapes(fn, q, v),
        chunk=triton_backend.CHUNK,
        auto_candidate=_triton_candidate,
        keeps_float_output=lambda dtype: False,
    ),
}
