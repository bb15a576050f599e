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

from helpers import attention_with_grads, qkv, random_state, rel_err, shape_id

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


# bfloat16 shapes: the SHAPES above plus chunks that do not divide T, Dk wider than the chunk, odd
# widths (a bfloat16 pair split at the end of a row), a chunk of 1, larger chunks
BF16_CASES = [(shape, 16) for shape in SHAPES] + [
    (dict(B=2, T=77, H=2, Dk=17, Dv=5), 5),
    (dict(B=1, T=40, H=1, Dk=70, Dv=66), 32),
    (dict(B=1, T=9, H=2, Dk=3, Dv=1), 1),
    # the default chunk, and one of 48: AMX tiles (16 rows at a time) skip the zero blocks of the
    # triangular products; widths not whole tiles
    (dict(B=1, T=200, H=2, Dk=64, Dv=64), 64),
    (dict(B=1, T=150, H=1, Dk=48, Dv=40), 48),
]


@pytest.mark.parametrize("shape, chunk", BF16_CASES, ids=[f"{shape_id(**s)}-C{c}" for s, c in BF16_CASES])
def test_bfloat16_kernel_is_within_bfloat16_error_of_float64(each_build, shape, chunk):
    """bfloat16 in, bfloat16 out, float32 states (products in bfloat16 on AVX512-BF16 builds): the
    output within one bfloat16 rounding of "chunked" (which computes in float32 copies), the final
    state and all gradients as accurate as it, everything against float64 on the same rounded inputs."""
    B, T, H, Dk, Dv = shape.values()
    g = torch.Generator().manual_seed(T * 1000 + Dk)
    q, k, v = qkv(B, T, H, Dk, Dv, torch.bfloat16)
    state = random_state(B, H, Dk, Dv, torch.float32)
    dy = torch.randn(B, T, H, Dv, generator=g).bfloat16()
    dS, dz = torch.randn(B, H, Dk, Dv, generator=g), torch.randn(B, H, Dk, generator=g)

    def run(backend, dtype, acc):
        return attention_with_grads(backend, dtype, acc, q, k, v, state, dy, dS, dz, chunk, n_tokens=5)

    exact = run("naive", torch.float64, torch.float64)
    got = run("cpu", torch.bfloat16, torch.float32)
    ref = run("chunked", torch.bfloat16, torch.float32)
    names = ("out", "S", "z", "dq", "dk", "dv", "dS0", "dz0")
    for name, x, r, e in zip(names, got, ref, exact, strict=True):
        assert x.dtype == r.dtype, name
        slack = 2**-8 if name == "out" else 1e-6  # out: one more bfloat16 rounding (of the products' operands)
        assert rel_err(x, e) <= 2 * rel_err(r, e) + slack, (name, rel_err(x, e), rel_err(r, e))
