"""Every ISA level this machine runs, with every C compiler it has (gcc, clang): the attention
kernel against the reference (outputs, states, all gradients; float64 and float32; awkward shapes),
and the fused model step and its generation loop against the PyTorch step. Each build is its own
library (native/build.py), selected with native.use(level, compiler). A compiler that is missing is a
skip that names it; AArch64 is tested under qemu in tests/test_aarch64.py."""

from __future__ import annotations

import shutil

import pytest
import torch

import test_model as model_tests
from linear_transformers import native, ops
from linear_transformers.decode import fused
from linear_transformers.native import build
from linear_transformers.ops import LinearState, cpu

from helpers import qkv, random_state, rel_err, shape_id

COMPILERS = ("gcc", "clang")
BUILDS = [(level, cc) for level in build.supported_levels() for cc in COMPILERS]


@pytest.fixture(params=BUILDS, ids=[f"{level}-{cc}" for level, cc in BUILDS])
def each_build(request):
    level, cc = request.param
    if shutil.which(cc) is None:
        pytest.skip(f"{cc} is not installed (apt-get install {cc})")
    with native.use(level, cc):
        if not (cpu.available() and fused.available()):
            why = cpu.unavailable_reason() or fused.unavailable_reason()
            pytest.fail(f"{level} with {cc} does not build: {why}")
        info = native.build_info(fused.LIBRARY)
        assert info.level == level and cc in info.compiler.lower()
        yield level, cc


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


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("batch", [1, 7])
def test_fused_step_equals_the_pytorch_step(each_build, norm, batch):
    model_tests.test_fused_cpu_step_equals_the_pytorch_step(norm, "elu", batch, "sinusoidal", "mol")


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_fused_step_in_the_batched_layout_equals_the_pytorch_step(each_build, norm):
    # 37 rows: whole and partial vectors of rows; heads of 8 (attention one value at a time)
    model_tests.test_fused_step_in_the_batched_layout_equals_the_pytorch_step(norm, 4, 37, "float32")
    model_tests.test_fused_step_with_feed_forward_widths_that_leave_a_remainder(36)


def test_fused_generation_loop_draws_the_same_tokens_as_stepping(each_build, monkeypatch):
    model_tests.test_generation_loop_in_c_draws_the_same_tokens_as_stepping(monkeypatch, 21, 0, 4, "float32", 7)
    model_tests.test_mixture_sampling_in_c_equals_the_pytorch_arithmetic(monkeypatch)


def test_bfloat16_dots_where_the_level_has_them(each_build, monkeypatch):
    level, _ = each_build
    assert fused.has_bf16_dot() == (level in ("x86-64-v4-amx", "x86-64-v4-bf16"))
    assert not fused.has_amx() or level == "x86-64-v4-amx"  # AMX tiles only where built for them
    if not fused.has_bf16_dot():
        model = model_tests._model(n_classes=0)
        with pytest.raises(ValueError, match=f"needs a CPU with AVX512-BF16 .* this one is built for {level}"):
            fused.from_model(model, torch.bfloat16, torch.bfloat16)
        return
    model_tests.test_fused_step_with_bfloat16_dots_equals_rounding_then_float32("pre", 37)
    model_tests.test_generation_loop_in_c_draws_the_same_tokens_as_stepping(monkeypatch, 3, 3, 5, "bfloat16", 7)
