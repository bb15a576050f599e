"""The GPU benchmark's parts that need no GPU: its tables and plot, the glue that times
pytorch-fast-transformers' causal product (against the reference, with a stand-in for the CUDA
kernel), the refusal without a CUDA device, and the Triton dot-precision policy it compares."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import ops
from linear_transformers.bench import gpu
from linear_transformers.bench.__main__ import main
from linear_transformers.ops import triton as triton_backend

from helpers import qkv, rel_err


def _rows():
    rows = []
    for impl, scale in (("triton", 1.0), ("triton-tf32", 0.5), ("sdpa", 2.0), ("fla", 1.5)):
        for N in (1024, 4096):
            rows.append(
                {
                    "dtype": "bfloat16",
                    "D": 64,
                    "N": N,
                    "impl": impl,
                    "fwd_ms": 0.1 * scale * N / 1024,
                    "fwdbwd_ms": 0.3 * scale * N / 1024,
                    "fwdbwd_tflops": 1.0,
                }
            )
    return rows


def test_tables_and_plot(tmp_path):
    summary = gpu.summary(_rows())
    assert "| bfloat16 | 64 | 4096 | 0.400 | 1.200 | 1.0 | 2.0x | - | 2.0x | 1.5x | - |" in summary
    times = gpu.times_table(_rows())
    assert "triton-tf32 fwd+bwd ms" in times and "| bfloat16 | 64 | 1024 | 0.300 | 0.150 | 0.600 | 0.450 |" in times
    gpu.plot(_rows(), tmp_path / "gpu.png", "test")
    assert (tmp_path / "gpu.png").stat().st_size > 10_000


class _StandInKernel:
    """What pytorch-fast-transformers' causal_product_cuda computes, in PyTorch: the unnormalised
    causal product [N, H, L, M] into `product`, and its gradients into the given buffers."""

    @staticmethod
    def _product(Q, K, V):
        return (Q @ K.transpose(-1, -2)).tril() @ V

    def causal_dot_product(self, Q, K, V, product):
        product.copy_(self._product(Q, K, V))

    def causal_dot_backward(self, Q, K, V, grad_out, gQ, gK, gV):
        with torch.enable_grad():
            xs = [x.detach().requires_grad_() for x in (Q, K, V)]
            for buffer, g in zip((gQ, gK, gV), torch.autograd.grad(self._product(*xs), xs, grad_out), strict=True):
                buffer.copy_(g)


def test_fast_transformers_glue_equals_the_reference():
    q, k, v = (x.requires_grad_() for x in qkv(2, 37, 3, 8, 5, torch.float32))
    attend = gpu._fast_transformers_attention(_StandInKernel())
    got, ref = attend(q, k, v), ops.causal_linear_attention(q, k, v, backend="naive")
    assert rel_err(got, ref) < 1e-5
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), w), torch.autograd.grad(ref, (q, k, v), w), strict=True):
        assert rel_err(a, b) < 1e-5


def test_fast_transformers_source_must_hold_the_kernel(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "fast_transformers", None)  # not installed
    assert gpu.fast_transformers_kernel(None) is None
    with pytest.raises(SystemExit, match="causal_product_cuda.cu"):
        gpu.fast_transformers_kernel(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_cuda(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        main(["gpu", "--out", str(tmp_path)])


def test_dot_precision_policy():
    assert triton_backend.dot_precision(torch.bfloat16) == "tf32"
    assert triton_backend.dot_precision(torch.float16) == "tf32x3"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert triton_backend.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert triton_backend.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    with triton_backend.precision("tf32x3"):
        assert triton_backend.dot_precision(torch.float32) == triton_backend.dot_precision(torch.bfloat16) == "tf32x3"
        with triton_backend.precision("ieee"):
            assert triton_backend.dot_precision(torch.bfloat16) == "ieee"
        assert triton_backend.dot_precision(torch.float32) == "tf32x3"
    assert triton_backend.dot_precision(torch.bfloat16) == "tf32"
    with pytest.raises(ValueError, match="unknown dot precision 'fp8'"):
        triton_backend.precision("fp8")
