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

from . import chunked, cpu, naive
from . import triton as triton_backend
from .records import Forward, Grads, result
from .state import LinearState

__all__ = ["BACKENDS", "Backend", "Forward", "Grads"]


@dataclass(frozen=True)
class Backend:
    name: str
    forward: Callable[..., Forward]  # (q, k, v, S0, z0, eps, chunk_size, save) -> Forward
    backward: Callable[..., Grads] | None  # None: PyTorch differentiates `forward` itself
    Saved: type | None = None  # the NamedTuple of what `forward` keeps for `backward`
    saved_shapes: Callable[..., tuple[tuple[int, ...], ...]] | None = None
    # autograd can differentiate its backward again (create_graph=True): only where PyTorch
    # differentiates the forward itself (the chunked backward writes into out= buffers)
    twice_differentiable: bool = True


def _naive_forward(q, k, v, S0, z0, eps: float, chunk_size: int, save: bool) -> Forward:
    y, state = naive.causal_linear_attention(q, k, v, initial_state=LinearState(S0, z0, 0), eps=eps)
    return result(y, state.S, state.z, None, None, like=y)


def _kernel(module) -> Backend:
    return Backend(module.NAME, module.run_forward, module.run_backward, module.Saved, module.saved_shapes,
                   twice_differentiable=False)  # fmt: skip


BACKENDS: dict[str, Backend] = {
    "naive": Backend("naive", _naive_forward, None),
    "chunked": _kernel(chunked),
    "cpu": _kernel(cpu),
    "triton": _kernel(triton_backend),
}
