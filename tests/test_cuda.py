"""The device-generic paths on a GPU: the PyTorch chunked backend, the recurrent step, softmax with
its cache and the layer. Skipped, with the reason, where no CUDA device exists (CI)."""

from __future__ import annotations

import pytest
import torch

from linear_transformers import FEATURE_MAPS, AttentionLayer, ops

from helpers import qkv, random_state, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _grads(backend, q, k, v, state):
    out, final = ops.causal_linear_attention(q, k, v, initial_state=state, return_state=True, backend=backend)
    g = torch.Generator(device=q.device).manual_seed(1)
    w = torch.randn(out.shape, generator=g, device=q.device, dtype=torch.float64).to(out.dtype)
    loss = (out * w).sum() + final.S.sum() + final.z.sum()
    return [out, final.S, final.z, *torch.autograd.grad(loss, (q, k, v, state.S, state.z))]


@pytest.mark.parametrize("T", [1, 63, 65, 1000])
def test_chunked_matches_naive_on_cuda(T):
    q, k, v = (x.cuda().detach().requires_grad_() for x in qkv(2, T, 3, 16, 8))
    state = random_state(2, 3, 16, 8)
    state = type(state)(state.S.cuda().requires_grad_(), state.z.cuda().requires_grad_(), state.n_tokens)
    for got, ref in zip(_grads("chunked", q, k, v, state), _grads("naive", q, k, v, state), strict=True):
        assert got.device.type == "cuda"
        assert rel_err(got, ref) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_on_cuda(dtype):
    q, k, v = (x.cuda() for x in qkv(2, 300, 2, 16, 8, dtype))
    exact = ops.causal_linear_attention(q.double(), k.double(), v.double(), backend="naive")
    ref = ops.causal_linear_attention(q, k, v, backend="naive")
    got = ops.causal_linear_attention(q, k, v)  # auto: chunked on CUDA
    assert got.dtype == dtype
    assert rel_err(got, exact) <= 2 * rel_err(ref, exact) + 1e-7


def test_step_and_split_on_cuda():
    q, k, v = (x.cuda() for x in qkv(2, 50, 2, 8, 8, torch.float32))
    out, final = ops.causal_linear_attention(q, k, v, return_state=True)
    state, steps = None, []
    with torch.no_grad():
        for t in range(50):
            o, state = ops.linear_attention_step(q[:, t], k[:, t], v[:, t], state)
            steps.append(o)
    assert rel_err(torch.stack(steps, 1), out) < 1e-5 and rel_err(state.S, final.S) < 1e-5
    assert state.S.device.type == "cuda" and state.S.dtype == torch.float32


def test_softmax_and_cache_on_cuda():
    q, k, v = (torch.randn(2, 40, 2, 8, device="cuda") for _ in range(3))
    ref = ops.softmax_attention(q, k, v, causal=True)
    out, cache = ops.softmax_attention_with_cache(q[:, :30], k[:, :30], v[:, :30])
    outs = [out]
    for t in range(30, 40):
        o, cache = ops.softmax_attention_step(q[:, t], k[:, t], v[:, t], cache)
        outs.append(o[:, None])
    assert rel_err(torch.cat(outs, 1), ref) < 1e-5


@pytest.mark.parametrize("fm", list(FEATURE_MAPS))
def test_layer_step_equals_parallel_on_cuda(fm):
    kwargs = {"feature_map_kwargs": {"seed": 0}} if fm in ("favor", "fourier") else {}
    layer = AttentionLayer(32, 4, "causal-linear", fm, **kwargs).cuda().double().eval()
    x = torch.randn(2, 30, 32, device="cuda", dtype=torch.float64)
    y = layer(x)
    state, steps = None, []
    for t in range(30):
        y_t, state = layer.step(x[:, t], state)
        steps.append(y_t)
    assert rel_err(torch.stack(steps, 1), y) < 1e-10


def test_triton_step_replays_from_a_cuda_graph():
    """The fused step allocates nothing, so it can be captured once and replayed per token: the
    replayed graph, fed new q, k, v in its input buffers, matches the PyTorch step token by token."""
    from linear_transformers.bench.gpu import capture_step
    from linear_transformers.ops import LinearState
    from linear_transformers.ops import triton as triton_backend
    from linear_transformers.ops.step import step_pytorch

    if not triton_backend.available(torch.device("cuda")):
        pytest.skip(triton_backend.unavailable_reason(torch.device("cuda")))
    B, H, Dk, Dv, T = 2, 3, 40, 24, 30  # Dk, Dv not powers of two
    q, k, v = (torch.zeros(B, H, d, device="cuda") for d in (Dk, Dk, Dv))
    state = LinearState.zeros(B, H, Dk, Dv, device="cuda")
    out = torch.empty(B, H, Dv, device="cuda")
    graph = capture_step(q, k, v, state.S, state.z, out)
    assert state.S.abs().max() == 0  # capturing did not advance the state
    ref = LinearState.zeros(B, H, Dk, Dv, device="cuda")
    for _ in range(T):
        new = [torch.rand(B, H, d, device="cuda") for d in (Dk, Dk, Dv)]
        for buffer, x in zip((q, k, v), new, strict=True):
            buffer.copy_(x)
        graph.replay()
        with torch.no_grad():
            want, ref = step_pytorch(*new, ref, 1e-6)
        assert rel_err(out, want) < 1e-5
    assert rel_err(state.S, ref.S) < 1e-5 and rel_err(state.z, ref.z) < 1e-5
