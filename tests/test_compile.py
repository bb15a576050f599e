"""torch.compile(fullgraph=True) traces the attention layer and the model without graph breaks: the
kernels are registered operators (ops/library.py) with fake implementations."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import AttentionLayer
from linear_transformers.model import CausalTransformer, ModelConfig


@pytest.mark.parametrize("backend", ["chunked", "cpu"])
def test_layer_compiles_without_graph_breaks(backend):
    _check_compiled_layer(AttentionLayer(32, 4, backend=backend), torch.randn(2, 70, 32, requires_grad=True), 1e-5)


def test_bfloat16_layer_compiles_with_the_cpu_kernel():
    """bfloat16 goes through the kernel without a float32 copy of the output (the operator's fake
    says so per dtype): compiled and eager agree."""
    layer = AttentionLayer(32, 4, backend="cpu").to(torch.bfloat16)
    _check_compiled_layer(layer, torch.randn(2, 70, 32, dtype=torch.bfloat16, requires_grad=True), 2e-2)


def _check_compiled_layer(layer, x, tol):
    """The layer compiled with fullgraph=True (a graph break is an error) computes the eager outputs and
    input gradients."""
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)
    y = compiled(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y_ref = layer(x)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gx, gx_ref, atol=tol, rtol=tol)


def test_model_compiles_without_graph_breaks():
    torch._dynamo.reset()
    model = CausalTransformer(
        ModelConfig(vocab_size=16, n_classes=3, max_len=40, d_model=32, n_layers=2, n_heads=4, d_ff=64)
    )
    tokens, labels = torch.randint(0, 16, (2, 40)), torch.tensor([0, 2])
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(tokens, labels), model(tokens, labels), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_compiles_on_cuda_with_the_triton_backend():
    layer = AttentionLayer(64, 4).cuda()  # auto: the Triton kernels
    _check_compiled_layer(layer, torch.randn(2, 300, 64, device="cuda", requires_grad=True), 1e-4)
