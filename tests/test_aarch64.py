"""The CPU kernels built for AArch64 (NEON: 4 floats a vector, 32 registers), cross-compiled with
Debian's gcc-aarch64-linux-gnu and run under qemu-user through a small driver
(tests/native/kernel_harness.c): the attention forward/backward against the PyTorch reference and
the fused model step against the PyTorch step. Correctness only (qemu's speed says nothing). The
same driver built for this machine checks the driver itself. Skipped, naming the package, where the
cross compiler or qemu is missing (.ci/run installs both)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from linear_transformers import native, ops
from linear_transformers.decode import fused
from linear_transformers.model import CausalTransformer, ModelConfig, ModelState
from linear_transformers.native import build
from linear_transformers.ops import LinearState, cpu

from helpers import attention_with_grads, projection_reference, qkv, random_sampling_cases, random_state, rel_err

HARNESS = Path(__file__).parent / "native" / "kernel_harness.c"
KERNELS = [
    Path(cpu.__file__).parent / "causal_linear.c",
    *(f for f in fused.SOURCES if f.suffix == ".c"),
    Path(fused.__file__).parent / "llama_step.c",
    Path(fused.__file__).parent / "token_sample.c",
]
INCLUDES = [native.SIMD_H.parent, Path(cpu.__file__).parent, Path(fused.__file__).parent]
TARGETS = {
    # target: (compiler, level flags, how to run the program)
    "aarch64": ("aarch64-linux-gnu-gcc", build.LEVELS["armv8-a"].flags, ["qemu-aarch64"]),
    "native": ("gcc", build.LEVELS[build.best_level()].flags, []),
}
PACKAGES = {"aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu", "qemu-aarch64": "qemu-user", "gcc": "gcc"}


@pytest.fixture(scope="module", params=list(TARGETS))
def harness(request, tmp_path_factory):
    cc, flags, runner = TARGETS[request.param]
    for tool in [cc, *runner]:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {PACKAGES[tool]})")
    exe = tmp_path_factory.mktemp(request.param) / "kernel_harness"
    static = ["-static"] if runner else []  # qemu then needs no AArch64 sysroot
    include = [arg for folder in INCLUDES for arg in ("-I", str(folder))]
    cmd = [
        cc,
        "-O3",
        "-std=gnu11",
        *flags,
        *include,
        "-fopenmp",
        "-pthread",
        *static,
        str(HARNESS),
        *map(str, KERNELS),
        "-lm",
        "-o",
        str(exe),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def run(kind: str, request_bytes: bytes, tmp: Path) -> bytes:
        (tmp / "in.bin").write_bytes(request_bytes)
        proc = subprocess.run(
            [*runner, str(exe), kind, str(tmp / "in.bin"), str(tmp / "out.bin")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, (proc.returncode, proc.stderr)
        return (tmp / "out.bin").read_bytes()

    return run


def _i64(*values: int) -> bytes:
    return np.array(values, dtype=np.int64).tobytes()


def _split(data: bytes, dtype, shapes):
    flat = np.frombuffer(data, dtype=dtype)
    out, at = [], 0
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(torch.from_numpy(flat[at : at + n].copy()).reshape(shape))
        at += n
    assert at == flat.size
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("B", "T", "H", "Dk", "Dv"), [(2, 65, 3, 16, 24), (1, 63, 2, 5, 3), (1, 130, 1, 33, 17)])
def test_attention_kernel_equals_the_reference(harness, tmp_path, dtype, B, T, H, Dk, Dv):
    C = 16
    q, k, v = qkv(B, T, H, Dk, Dv, requires_grad=True)
    state = random_state(B, H, Dk, Dv, requires_grad=True)
    dy, dS, dz = torch.randn(B, T, H, Dv, dtype=torch.float64), torch.randn(B, H, Dk, Dv), torch.randn(B, H, Dk)
    y, final = ops.causal_linear_attention(q, k, v, initial_state=state, return_state=True, backend="naive")
    grads = torch.autograd.grad((y, final.S, final.z), (q, k, v, state.S, state.z), (dy, dS.double(), dz.double()))
    want = [y, final.S, final.z, *grads]
    es = 8 if dtype == torch.float64 else 4
    inputs = [x.detach().to(dtype).contiguous().numpy().tobytes() for x in (q, k, v, state.S, state.z, dy, dS, dz)]
    data = harness("attention", _i64(es, B, T, H, Dk, Dv, C) + np.float64(1e-6).tobytes() + b"".join(inputs), tmp_path)
    shapes = [
        (B, T, H, Dv),
        (B, H, Dk, Dv),
        (B, H, Dk),
        (B, T, H, Dk),
        (B, T, H, Dk),
        (B, T, H, Dv),
        (B, H, Dk, Dv),
        (B, H, Dk),
    ]
    got = _split(data, np.float64 if es == 8 else np.float32, shapes)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, g, w in zip(("y", "S", "z", "dq", "dk", "dv", "dS0", "dz0"), got, want, strict=True):
        assert rel_err(g, w) < tol, (name, rel_err(g, w))


@pytest.mark.parametrize(("B", "T", "H", "Dk", "Dv", "C"), [(2, 65, 3, 16, 24, 16), (1, 77, 2, 17, 5, 5)])
def test_bfloat16_attention_kernel_is_within_bfloat16_error(harness, tmp_path, B, T, H, Dk, Dv, C):
    """bfloat16 in and out, float32 states: within twice the error of "chunked" (float32 copies) here."""
    q, k, v = qkv(B, T, H, Dk, Dv, torch.bfloat16)
    state = random_state(B, H, Dk, Dv, torch.float32)
    dy = torch.randn(B, T, H, Dv).bfloat16()
    dS, dz = torch.randn(B, H, Dk, Dv), torch.randn(B, H, Dk)

    def reference(backend, dtype, acc):
        return attention_with_grads(backend, dtype, acc, q, k, v, state, dy, dS, dz, C)

    exact = reference("naive", torch.float64, torch.float64)
    chunked = reference("chunked", torch.bfloat16, torch.float32)
    inputs = [x.contiguous().view(torch.int16).numpy().tobytes() for x in (q, k, v)]
    inputs += [x.contiguous().numpy().tobytes() for x in (state.S, state.z)]
    inputs += [dy.view(torch.int16).numpy().tobytes(), dS.numpy().tobytes(), dz.numpy().tobytes()]
    data = harness("attention", _i64(2, B, T, H, Dk, Dv, C) + np.float64(1e-6).tobytes() + b"".join(inputs), tmp_path)
    sizes = [(B, T, H, Dv, 2), (B, H, Dk, Dv, 4), (B, H, Dk, 4), (B, T, H, Dk, 2), (B, T, H, Dk, 2), (B, T, H, Dv, 2)]
    sizes += [(B, H, Dk, Dv, 4), (B, H, Dk, 4)]
    got, at = [], 0
    for *shape, es in sizes:
        n = int(np.prod(shape)) * es
        raw = torch.frombuffer(bytearray(data[at : at + n]), dtype=torch.int16 if es == 2 else torch.float32)
        got.append((raw.view(torch.bfloat16) if es == 2 else raw).reshape(shape))
        at += n
    assert at == len(data)
    for name, g, r, e in zip(("y", "S", "z", "dq", "dk", "dv", "dS0", "dz0"), got, chunked, exact, strict=True):
        slack = 2**-8 if name == "y" else 1e-6
        assert rel_err(g, e) <= 2 * rel_err(r, e) + slack, (name, rel_err(g, e), rel_err(r, e))


def test_token_sampler_draws_the_reference_token(harness, tmp_path):
    """The C sampler (token_sample.c) on this target: the token llama.sample_tokens_reference draws
    for the same u, over random logits with ties and -inf entries and every kind of setting."""
    from linear_transformers.decode import llama

    for logits, temperature, top_k, top_p, u in random_sampling_cases(40, seed=3):
        B, V = logits.shape
        request = _i64(B, V, top_k) + np.array([temperature, top_p], dtype=np.float32).tobytes()
        request += logits.contiguous().numpy().tobytes() + u.contiguous().numpy().tobytes()
        got = np.frombuffer(harness("sample", request, tmp_path), dtype=np.int64)
        want = llama.sample_tokens_reference(logits, temperature, top_k, top_p, u)
        assert got.tolist() == want.tolist(), (B, V, temperature, top_k, top_p)


def _step_request(model: CausalTransformer, tokens: torch.Tensor) -> bytes:
    cfg, n, B = model.cfg, tokens.shape[1], tokens.shape[0]
    step = fused.from_model(model)
    io = step.io
    dk = cfg.d_model // cfg.n_heads
    header = _i64(
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        dk,
        dk,
        cfg.d_ff,
        cfg.norm == "pre",
        fused.FEATURE_MAPS[cfg.feature_map],
        cfg.vocab_size,
        cfg.max_len,
        io["head_w"].shape[0],
        io["pos"] is not None,
        io["norm_w"] is not None,
        B,
        n,
    )
    eps = np.array([model.blocks[0].norm1.eps, cfg.eps, getattr(model.norm, "eps", 0.0)], dtype=np.float32)
    tensors = [layer[name] for layer in step.layers for name in fused.FusedModelStep.WEIGHTS]
    tensors += [t for t in (io[name] for name in fused.FusedModelStep.IO) if t is not None]
    body = b"".join(t.detach().float().contiguous().numpy().tobytes() for t in tensors)
    return header + eps.tobytes() + body + tokens.T.contiguous().numpy().astype(np.int64).tobytes()


@pytest.mark.parametrize(
    ("norm", "feature_map", "batch", "n_heads"), [("pre", "elu", 1, 2), ("post", "relu", 5, 4), ("pre", "elu", 21, 2)]
)
def test_fused_step_equals_the_pytorch_step(harness, tmp_path, norm, feature_map, batch, n_heads):
    """batch 21: the batched layout; heads of 16 (attention a vector at a time) and of 8."""
    cfg = ModelConfig(
        vocab_size=16,
        max_len=32,
        d_model=32,
        n_layers=2,
        n_heads=n_heads,
        d_ff=72,
        norm=norm,
        feature_map=feature_map,
        head="mol",
    )
    model = CausalTransformer(cfg).eval()
    tokens = torch.randint(0, 16, (batch, 12))
    dk = cfg.d_model // cfg.n_heads
    state = ModelState([LinearState.zeros(batch, n_heads, dk, dk, dtype=torch.float32) for _ in model.blocks])
    with torch.no_grad():  # from an empty state at position 0, as the driver steps
        want = [model.step_pytorch(tokens[:, t], state)[0] for t in range(tokens.shape[1])]
    n_params = model.head.proj.weight.shape[0]
    shapes = [(12, batch, n_params)]
    shapes += [s for _ in range(cfg.n_layers) for s in ((batch, n_heads, dk, dk), (batch, n_heads, dk))]
    params, *states = _split(harness("step", _step_request(model, tokens), tmp_path), np.float32, shapes)
    torch.testing.assert_close(params, torch.stack(want), atol=1e-5, rtol=1e-5)
    for (S, z), layer in zip(zip(states[::2], states[1::2], strict=True), state.layers, strict=True):
        assert isinstance(layer, LinearState)
        torch.testing.assert_close(S, layer.S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z, layer.z, atol=1e-5, rtol=1e-5)


def _llama_request(model, wkind: int, tokens: torch.Tensor) -> bytes:
    """The harness's llama request for a linearised Llama (float32 or int8 weights, zero state)."""
    from linear_transformers.decode import llama
    from linear_transformers.linearize.step import llama_weights

    w = llama_weights(model)
    B, n = tokens.shape
    hedgehog = w.feature_map == "hedgehog" and w.mode != "window"
    hh_m = w.layers[0]["fq_w"].shape[-1] if hedgehog else 0
    F = 2 * hh_m if hedgehog else w.head_dim
    has_bias = w.layers[0]["bq"] is not None
    header = _i64(
        len(w.layers),
        w.embed.shape[1],
        w.n_heads,
        w.n_kv_heads,
        w.head_dim,
        w.layers[0]["wg"].shape[0],
        w.embed.shape[0],
        llama.MODES[w.mode],
        llama.FEATURE_MAPS[w.feature_map],
        F,
        hh_m,
        w.window,
        w.sinks,
        wkind,
        has_bias,
        B,
        n,
    )
    floats = np.array([w.rms_eps, w.attn_eps, w.rope_scale], dtype=np.float32).tobytes()

    def raw(t):
        return t.detach().float().contiguous().numpy().tobytes()

    def matrix(t):
        return llama.quantize_int8(t).numpy().tobytes() if wkind in (3, 4) else raw(t)

    def hedgehog_weight(t):  # (the maps' weights in the projections' family)
        return llama.quantize_int8(t).numpy().tobytes() if wkind in (3, 4) else raw(t)

    body = [raw(w.inv_freq)]
    for layer in w.layers:
        body += [raw(layer["attn_norm"]), raw(layer["mlp_norm"])]
        body += [matrix(layer[k]) for k in ("wq", "wk", "wv", "wo", "wg", "wu", "wd")]
        if has_bias:
            body += [raw(layer[k]) for k in ("bq", "bk", "bv", "bo")]
        if hedgehog:
            body += [
                hedgehog_weight(layer["fq_w"]),
                raw(layer["fq_b"]),
                hedgehog_weight(layer["fk_w"]),
                raw(layer["fk_b"]),
            ]
    body += [raw(w.embed), raw(w.final_norm), matrix(w.head)]
    return header + floats + b"".join(body) + tokens.T.contiguous().numpy().astype(np.int64).tobytes()


@pytest.mark.parametrize(
    ("mode", "feature_map", "weights", "bias"),
    [
        ("hybrid", "hedgehog", "float32", False),
        ("linear", "elu", "int8", True),
        ("window", "hedgehog", "int8", False),
        ("hybrid", "hedgehog", "int8-dot", False),
    ],
)
def test_fused_llama_step_equals_the_pytorch_layers(harness, tmp_path, mode, feature_map, weights, bias):
    """The linearised Llama step (int8 weights: against the model holding the dequantised weights),
    from an empty state through the window and the sinks."""
    pytest.importorskip("transformers")
    from linear_transformers.decode import DecodeConfig
    from linear_transformers.linearize import LinearizedCache

    from helpers import linear_llama, llama_with_weights_of

    model = linear_llama(mode, feature_map, window=4, sinks=2, heads=4, kv_heads=2, bias=bias, d=64)
    dot = torch.int8 if weights == "int8-dot" else torch.float32
    reference = model if weights == "float32" else llama_with_weights_of(model, torch.int8, dot)
    reference.decode_config = DecodeConfig(fused=False)
    B, n = 3, 10
    tokens = torch.randint(0, 97, (B, n))
    cache = LinearizedCache()
    with torch.no_grad():  # the PyTorch step from an empty state, one token at a time
        want = torch.cat([reference(tokens[:, t : t + 1], cache=cache).logits for t in range(n)], 1).transpose(0, 1)
    wkind = {"float32": 0, "int8": 3, "int8-dot": 4}[weights]
    got_bytes = harness("llama", _llama_request(model, wkind, tokens), tmp_path)
    logits = torch.from_numpy(np.frombuffer(got_bytes, dtype=np.float32)[: n * B * 97].copy()).view(n, B, 97)
    if weights == "int8-dot":  # an input near a rounding boundary of its int8 grid may round the other way
        assert ((logits - want).abs().max() / want.abs().max()).item() < 1e-2
        return
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-4)


def test_projections_in_every_portable_format(harness, tmp_path):
    """lt_llama_gemv_f32 in float32, int8 and int8 dot products (NEON: the plain-C group sums) against
    the float64 references, at batches and widths that take every loop's tail."""
    from linear_transformers.decode import llama

    g = torch.Generator().manual_seed(3)
    for B, n_out, n_in in [(1, 5, 32), (3, 37, 96), (17, 9, 160)]:
        w = torch.randn(n_out, n_in, generator=g)
        x = torch.randn(B, n_in, generator=g) * 4
        bias = torch.randn(n_out, generator=g)
        for wkind, (weights, dot) in [
            (0, (torch.float32,) * 2),
            (3, (torch.int8, torch.float32)),
            (4, (torch.int8,) * 2),
        ]:
            packed = w if wkind == 0 else llama.quantize_int8(w)
            request = _i64(wkind, B, n_in, n_out, 1) + b"".join(
                t.contiguous().numpy().tobytes() for t in (packed, bias, x)
            )
            y = torch.from_numpy(np.frombuffer(harness("gemv", request, tmp_path), dtype=np.float32).copy())
            want = projection_reference(x, w, weights, dot, bias)
            assert ((y.view(B, n_out).double() - want).abs().max() / want.abs().max()).item() < 1e-5, (wkind, B, n_in)
