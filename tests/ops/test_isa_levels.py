"""Every ISA level this machine runs, with every C compiler it has (gcc, clang): the attention
kernel against the reference (outputs, states, all gradients; float64 and float32; awkward shapes);
tests/decode/test_fused_step.py runs the fused step's checks on the same builds. Each build is its own
library (native/build.py), selected with native.use(level, compiler). A compiler that is missing is a
skip that names it; AArch64 is tested under qemu in tests/test_aarch64.py."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import ops
from linear_transformers.ops import LinearState

from helpers import qkv, random_state, rel_err, shape_id

SHAPES = [
    dict(B=1, T=1, H=1, Dk=8, Dv=8),
    dict(B=2, T=65, H=3, Dk=16, Dv=24),
    dict(B=1, T=63, H=2, Dk=5, Dv=3),  # narrower than any vector
    dict(B=1, T=200, H=2, Dk=64, Dv=64),
    dict(B=1, T=130, H=1, Dk=33, Dv=17),  # vector tails everywhere
]


@pytest.mark.parametrize("shape", SHAPES, ids=[shape_id(**s) for s in SHAPES])
def test_attention_kernel_equals_the_reference(each_build, shape):
    B, T, H, Dk, Dv = shape.values()
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        q, k, v = qkv(B, T, H, Dk, Dv, dtype, requires_grad=True)
        state = random_state(B, H, Dk, Dv, ops.cpu.accumulation_dtype(dtype), requires_grad=True)
        results = []
        reference = [x.detach().double().requires_grad_() for x in (q, k, v)]
        for backend, inputs in (("cpu", (q, k, v)), ("naive", reference)):
            S0 = state.S.detach().double().requires_grad_() if backend == "naive" else state.S
            z0 = state.z.detach().double().requires_grad_() if backend == "naive" else state.z
            y, final = ops.causal_linear_attention(
                *inputs, initial_state=LinearState(S0, z0, 5), return_state=True, backend=backend, chunk_size=16
            )
            loss = y.square().sum() + final.S.square().sum() + final.z.sum()
            results.append([y, final.S, final.z, *torch.autograd.grad(loss, [*inputs, S0, z0])])
        for name, got, want in zip(("out", "S", "z", "dq", "dk", "dv", "dS0", "dz0"), *results, strict=True):
            assert rel_err(got, want) < tol, (name, dtype, rel_err(got, want))
