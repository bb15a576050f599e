"""The fused C step of linearised Llama-style models (decode/llama.py, llama_step.c) against the
PyTorch layers it replaces: logits and every state tensor, for each attention mode and feature map,
grouped and plain heads, biases (Qwen2-style), batches, positions through the window and the sinks;
bfloat16 and int8 weights against the PyTorch model holding the same rounded weights; greedy tokens
through transformers' generate(); what it refuses; every ISA level and compiler."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaForCausalLM

from linear_transformers.decode import DecodeConfig, fused, llama
from linear_transformers.linearize import LinearizedCache
from linear_transformers.linearize.step import fused_step, llama_weights, why_not_fused

from helpers import linear_llama as student
from helpers import llama_with_weights_of as rounded_copy
from helpers import projection_reference

STATE = ("S", "z", "ring_k", "ring_v", "sink_k", "sink_v")


@pytest.fixture(autouse=True)
def _needs_the_library():
    if not llama.available():
        pytest.skip(f"the fused Llama step is not built here: {llama.unavailable_reason()}")


def run_both(model, reference, B=2, prompt_len=9, steps=12, config=None):
    """Prefill the same prompt into two caches (both through `reference`'s PyTorch layers), then
    step `reference` through PyTorch and `model` through the fused step (`config`), feeding the
    reference's greedy tokens to both; the worst logit error relative to the logits' scale, the two
    caches, and the tokens."""
    config = config or DecodeConfig()
    prompt = torch.randint(0, 97, (B, prompt_len))
    ours, theirs = LinearizedCache(), LinearizedCache()
    worst, tokens = 0.0, []
    with torch.no_grad():
        reference(prompt, cache=ours)
        reference(prompt, cache=theirs)
        token = prompt[:, -1:]
        for _ in range(steps):
            reference.decode_config = DecodeConfig(fused=False)
            want = reference(token, cache=theirs).logits
            model.decode_config = config
            got = model(token, cache=ours).logits
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
            token = want[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
    return worst, ours, theirs, torch.cat(tokens, 1)


def assert_states_equal(a: LinearizedCache, b: LinearizedCache, tol: float) -> None:
    assert a.seen == b.seen
    for layer in a.states:
        sa, sb = a.states[layer], b.states[layer]
        assert torch.equal(sa.seen, sb.seen)
        for name in STATE:
            x, y = getattr(sa, name), getattr(sb, name)
            if x is None or y is None or x.numel() == 0:
                continue
            scale = max(y.abs().max().item(), 1e-6)
            assert (x - y).abs().max().item() / scale < tol, (layer, name)


@pytest.mark.parametrize("mode", ["hybrid", "linear", "window"])
@pytest.mark.parametrize("feature_map", ["hedgehog", "elu", "relu"])
def test_fused_step_equals_the_pytorch_layers(mode, feature_map):
    model = student(mode, feature_map)
    # 9 prompt tokens + 12 steps with window 5 and 2 sinks: keys leave the window into the state
    worst, ours, theirs, _ = run_both(model, model)
    assert worst < 1e-5
    assert_states_equal(ours, theirs, 1e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "bias", "B"), [(4, 4, False, 1), (6, 2, True, 3), (4, 1, False, 5)])
@pytest.mark.parametrize(("window", "sinks", "prompt_len"), [(4, 0, 1), (3, 4, 2), (8, 1, 20)])
def test_grouped_heads_biases_batches_windows_and_sinks(heads, kv_heads, bias, B, window, sinks, prompt_len):
    model = student(
        "hybrid", "hedgehog", window=window, sinks=sinks, heads=heads, kv_heads=kv_heads, bias=bias, d=heads * 16
    )
    worst, ours, theirs, _ = run_both(model, model, B=B, prompt_len=prompt_len, steps=10)
    assert worst < 1e-5
    assert_states_equal(ours, theirs, 1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("mode", ["hybrid", "linear", "window"])
def test_heads_split_across_threads(mode, threads):
    """Attention's work items are halves of (row, head) pairs: with 3 heads, 1 row and 2 or 3 threads a
    head's halves fall on two threads (each computing its features), with 1 thread on one (the
    second reusing the first's)."""
    model = student(mode, "hedgehog", window=4, sinks=1, heads=3, kv_heads=1, d=48)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        worst, ours, theirs, _ = run_both(model, model, B=1, prompt_len=3, steps=10)
    finally:
        torch.set_num_threads(before)
    assert worst < 1e-5
    assert_states_equal(ours, theirs, 1e-5)


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_low_precision_weights_equal_the_model_with_those_weights(weights):
    dtype = getattr(torch, weights)
    model = student("hybrid", "hedgehog")
    worst, _, _, _ = run_both(model, rounded_copy(model, dtype), steps=16, config=DecodeConfig(weights=dtype))
    assert worst < 1e-5
    # and against the float32 model: within the format's error
    worst, _, _, _ = run_both(model, model, steps=16, config=DecodeConfig(weights=dtype))
    assert worst < {"bfloat16": 0.03, "int8": 0.03}[weights]


def test_bfloat16_dots_where_the_cpu_has_them():
    if not fused.has_bf16_dot():
        model = student(d=64)
        with pytest.raises(ValueError, match="AVX512-BF16"):
            llama.FusedLlamaStep(llama_weights(model), torch.bfloat16, torch.bfloat16)
        return
    model = student(heads=4, kv_heads=2, d=64)  # d and heads x head_dim multiples of 32
    model.config.intermediate_size = 96  # (the MLP width is 96: also a multiple of 32)
    ref = rounded_copy(model, torch.bfloat16)
    worst, _, _, _ = run_both(model, ref, config=DecodeConfig(weights=torch.bfloat16, dot=torch.bfloat16))
    assert worst < 0.02  # activations rounded to bfloat16 too


@pytest.mark.parametrize(("heads", "kv_heads", "d", "B"), [(4, 2, 64, 1), (6, 2, 96, 3), (4, 4, 128, 6)])
def test_int8_dots_equal_the_model_with_those_weights_and_inputs(heads, kv_heads, d, B):
    """int8 weights times inputs rounded to int8 per block of 32 (widths of 64, 96: an odd number of
    blocks, 128; the MLP's 96), against the PyTorch model rounding the same weights and inputs, and
    against the float32 model within the format's error."""
    model = student("hybrid", "hedgehog", heads=heads, kv_heads=kv_heads, d=d)
    config = DecodeConfig(weights=torch.int8, dot=torch.int8)
    worst, ours, theirs, _ = run_both(model, rounded_copy(model, torch.int8, torch.int8), B=B, config=config)
    # not 1e-5: an input that float32 rounding upstream moves across a rounding boundary of its int8
    # grid changes by one step (1/127 of its block's largest value); the projection itself is exact
    # to float32 rounding (test_every_format_projects_like_its_reference)
    assert worst < 1e-2
    assert_states_equal(ours, theirs, 1e-2)
    worst, _, _, _ = run_both(model, model, B=B, steps=16, config=config)
    assert worst < 0.05


FORMAT_NAMES = {
    (torch.float32, torch.float32): "float32",
    (torch.bfloat16, torch.float32): "bf16-weights",
    (torch.bfloat16, torch.bfloat16): "bf16",
    (torch.int8, torch.float32): "int8",
    (torch.int8, torch.int8): "int8-dot",
}


def projection_cases(shapes, seed):
    """(B, n_out, n_in, w, x, bias) for each shape: rows of w and x at scales apart, a block of x far
    below the others, a bias for odd B or n_out."""
    g = torch.Generator().manual_seed(seed)
    for B, n_out, n_in in shapes:
        w = torch.randn(n_out, n_in, generator=g) * torch.rand(n_out, 1, generator=g) * 3
        x = torch.randn(B, n_in, generator=g) * torch.rand(B, 1, generator=g) * 10
        x[0, :32] *= 1e-3
        yield B, n_out, n_in, w, x, torch.randn(n_out, generator=g) if B % 2 or n_out % 2 else None


def check_projections(formats, seed=0):
    shapes = [(1, 5, 32), (3, 37, 96), (6, 67, 160), (17, 9, 64), (2, 130, 576)]
    for B, n_out, n_in, w, x, bias in projection_cases(shapes, seed):
        for weights, dot in formats:
            got = llama.project(x, w, weights, dot, bias)
            want = projection_reference(x, w, weights, dot, bias)
            err = ((got.double() - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, (FORMAT_NAMES[(weights, dot)], B, n_out, n_in, err)


def available_formats():
    return [f for f in llama.FORMATS if f[1] != torch.bfloat16 or fused.has_bf16_dot()]


def test_every_format_projects_like_its_reference():
    """One projection through the step's GEMV in each weight format, against its float64 reference:
    batches of 1 to 17 rows (past the 16 that int8 dots round at a time), widths of an even and odd
    number of 32-blocks (the AVX-512 int8 loop's half-vector tail), awkward output counts, biases."""
    check_projections(available_formats())


TILE_FORMATS = [(torch.bfloat16, torch.bfloat16), (torch.int8, torch.int8)]


def tile_formats():
    have = [f for f in TILE_FORMATS if llama.has_tiles(*f)]
    if not have:
        pytest.skip("no AMX tiles here for the dot formats (llama.has_tiles): needs AMX-BF16/AMX-INT8")
    return have


def test_amx_tiles_project_like_the_reference_and_the_rows():
    """Both dot formats on AMX tiles: batches below, at and past 16 rows (the tile's), output counts
    of whole 32-row pairs, a single 16 and leftovers (the row path), inputs of 1 to 48 blocks; against
    the float64 reference of the same rounding, and against the row layout to float32 rounding."""
    check_tiles(tile_formats())


def check_tiles(formats, seed=3):
    shapes = [(1, 16, 32), (5, 48, 96), (16, 67, 160), (17, 130, 576), (40, 96, 1536)]
    for B, n_out, n_in, w, x, bias in projection_cases(shapes, seed):
        for weights, dot in formats:
            got = llama.project(x, w, weights, dot, bias, tiles=True)
            want = projection_reference(x, w, weights, dot, bias)
            rows = llama.project(x, w, weights, dot, bias)
            scale = want.abs().max()
            assert ((got.double() - want).abs().max() / scale).item() < 1e-5, (weights, B, n_out, n_in)
            assert ((got - rows).abs().max() / scale).item() < 1e-5, (weights, B, n_out, n_in)
            assert torch.equal(got[:, n_out // 16 * 16 :], rows[:, n_out // 16 * 16 :])  # leftovers: the rows'


@pytest.mark.parametrize(("B", "tile_rows"), [(18, None), (5, 1)])  # (18: past both formats' TILE_ROWS)
def test_amx_tiles_step_like_the_rows_and_the_model(B, tile_rows, monkeypatch):
    """The whole step with its projections on tiles (a batch past FusedLlamaStep.TILE_ROWS, or forced
    from one row on): against the PyTorch model holding the same rounded weights (and, for int8,
    inputs), and step by step against the same step in the row layout from the same states (logits
    and every state tensor)."""
    formats = tile_formats()
    if tile_rows is not None:
        monkeypatch.setattr(llama.FusedLlamaStep, "TILE_ROWS", dict.fromkeys((torch.bfloat16, torch.int8), tile_rows))
    for weights, dot in formats:
        config = DecodeConfig(weights=weights, dot=dot)
        model = student("hybrid", "hedgehog")  # d 64, q 64 and k, v 32 rows, MLP 96, vocab 97
        tiles = fused_step(model, config)
        assert tiles.tile_rows == llama.FusedLlamaStep.TILE_ROWS[dot] and B >= tiles.tile_rows
        ref = rounded_copy(model, weights, dot if dot == torch.int8 else torch.float32)
        worst, _, _, _ = run_both(model, ref, B=B, config=config)
        assert worst < 0.02, (weights, worst)

        rows = llama.FusedLlamaStep(llama_weights(model), weights, dot)
        rows.struct.amx_rows = 0  # the row layout at any batch
        prompt = torch.randint(0, 97, (B, 9), generator=torch.Generator().manual_seed(B))
        cache = LinearizedCache()
        model.decode_config = DecodeConfig(fused=False)
        with torch.no_grad():
            model(prompt, cache=cache)
        a = [cache.states[i] for i in range(len(cache.states))]
        b = copy.deepcopy(a)
        token, errs = prompt[:, -1], []
        for _ in range(10):
            got, want = tiles(token, a[0].seen.clone(), a), rows(token, b[0].seen.clone(), b)
            errs.append(((got - want).abs().max() / want.abs().max()).item())
            token = want.argmax(-1)
        # not float32 rounding alone: an input that a different summation order upstream moves across
        # a rounding boundary of bfloat16 (or of its int8 block) moves by a whole step (measured: up to
        # 2.3e-4 for bfloat16 at B=18, 2e-7 for int8)
        assert max(errs) < 2e-3, (weights, errs)
        for sa, sb in zip(a, b, strict=True):
            for name in ("S", "z", "ring_k", "ring_v", "sink_k", "sink_v"):
                x, y = getattr(sa, name), getattr(sb, name)
                assert (x - y).abs().max() <= 2e-3 * y.abs().max(), (weights, name)


def test_a_bad_tile_threshold_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(llama.FusedLlamaStep, "TILE_ROWS", {torch.int8: -1})
    with pytest.raises(ValueError, match=r"TILE_ROWS\[torch.int8\] must be an int >= 0"):
        llama.FusedLlamaStep(llama_weights(student(d=64)), torch.int8, torch.int8)


def test_a_projection_the_step_cannot_compute_is_refused():
    x, w = torch.randn(2, 40), torch.randn(3, 40)
    with pytest.raises(ValueError, match="multiple of 32"):
        llama.project(x, w, torch.int8, torch.int8)
    with pytest.raises(ValueError, match="must be one of"):
        llama.project(x, w, torch.float32, torch.int8)
    torch.testing.assert_close(
        llama.project(x, w, torch.int8), projection_reference(x, w, torch.int8, torch.float32).float()
    )


def test_int8_dot_products_equal_their_float64_reference():
    """gemv.h's quantize_input and the int32 group sums, through the step's LM head alone: a model
    whose last hidden state is given, against decode.llama.int8_dot_reference."""
    torch.manual_seed(1)
    for n_out, n_in in [(5, 32), (37, 96), (64, 160)]:
        w = torch.randn(n_out, n_in) * torch.rand(n_out, 1) * 3
        packed = llama.quantize_int8(w)
        x = torch.randn(4, n_in) * torch.rand(4, 1) * 10
        x[1, :32] = 0  # an all-zero block: scale 0, every x_q 0
        x[2, 5] = 1e4  # one large value: the rest of its block rounds to 0
        q, s = llama.quantize_input(x)
        assert q.abs().max() <= 127 and torch.equal(q, q.round())
        assert torch.all(s[1, 0] == 0) and torch.equal(q[1, :32], torch.zeros(32))
        back = (q.unflatten(-1, (-1, 32)) * s[..., None]).flatten(-2)
        assert torch.all((back - x).abs() <= s.repeat_interleave(32, -1) / 2 * (1 + 1e-6))
        want = llama.int8_dot_reference(packed, n_out, n_in, x)
        deq = (llama.dequantize_int8(packed, n_out, n_in).double() @ back.double().T).T
        assert (want - deq).abs().max() < 1e-6 * want.abs().max()  # (deq: float32 products)


def test_int8_packing_round_trips_within_half_a_step():
    w = torch.randn(7, 13)
    w[3] = 0  # a zero row keeps scale 1
    packed = llama.quantize_int8(w)
    assert packed.dtype == torch.int8 and packed.numel() == 7 * 13 + 4 * 7
    back = llama.dequantize_int8(packed, 7, 13)
    step = w.abs().amax(1, keepdim=True) / 127
    assert torch.all((back - w).abs() <= step / 2 + 1e-7)
    assert torch.equal(back[3], torch.zeros(13))


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_greedy_generate_gives_the_same_64_tokens(weights):
    """transformers' generate() (prefill in PyTorch, then a fused step per token) against the
    PyTorch layers: greedy tokens identical over 64 new tokens, with the float32 model and with the
    model holding bfloat16-rounded weights, at 4x the longest position the model was configured for."""
    dtype = getattr(torch, weights)
    model = student("hybrid", "hedgehog", window=8, sinks=2)
    reference = model if dtype == torch.float32 else rounded_copy(model, dtype)
    prompt = torch.randint(0, 97, (2, 7))
    calls = []
    original = llama.FusedLlamaStep.__call__
    llama.FusedLlamaStep.__call__ = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        with torch.no_grad():
            model.decode_config = DecodeConfig(weights=dtype)
            ours = model.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0)
            reference.decode_config = DecodeConfig(fused=False)
            theirs = reference.generate(prompt, max_new_tokens=64, do_sample=False, pad_token_id=0)
    finally:
        llama.FusedLlamaStep.__call__ = original
    assert len(calls) == 63  # every token after the prefill's
    assert torch.equal(ours, theirs)
    model.decode_config = DecodeConfig(weights=dtype)
    long = model.generate(prompt[:1], max_new_tokens=4 * 64, do_sample=False, pad_token_id=0)
    assert long.shape[1] == 7 + 256  # not capped by max_position_embeddings (64)


def test_sampling_and_beam_search_run_through_the_fused_step():
    model = student("hybrid", "elu")
    prompt = torch.randint(0, 97, (1, 5))
    outs = []
    for fused_step_on in (True, False):
        model.decode_config = DecodeConfig(fused=fused_step_on)
        torch.manual_seed(3)
        outs.append(model.generate(prompt, max_new_tokens=20, do_sample=True, top_k=10, pad_token_id=0))
    assert torch.equal(*outs)  # same logits, same random stream: same tokens
    beams = model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0)
    model.decode_config = DecodeConfig(fused=False)
    assert torch.equal(beams, model.generate(prompt, max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0))


def test_where_the_fused_step_does_not_apply():
    model = student()
    assert why_not_fused(model) is None
    assert fused_step(model, DecodeConfig(fused=False)) is None
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(97))
    assert "bias" in why_not_fused(model) and llama_weights(model) is None
    plain = LlamaForCausalLM(model.config).eval()
    assert "not LinearizedAttention" in why_not_fused(plain)


def test_a_replaced_weight_rebuilds_the_step():
    model = student()
    step = fused_step(model, DecodeConfig())
    assert fused_step(model, DecodeConfig()) is step  # nothing changed: the same step
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight = torch.nn.Parameter(torch.randn(96, 64))
    rebuilt = fused_step(model, DecodeConfig())
    assert rebuilt is not step
    worst, _, _, _ = run_both(model, model)
    assert worst < 1e-5
    int8 = fused_step(model, DecodeConfig(weights=torch.int8))
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.mul_(2)  # in place: the int8 copy is stale
    assert fused_step(model, DecodeConfig(weights=torch.int8)) is not int8


def test_generate_checks_the_weights_once_per_call_and_sees_changes_between_calls():
    model = student()
    model.decode_config = DecodeConfig(weights=torch.bfloat16)
    prompt = torch.randint(0, 97, (1, 5))
    checks, original = [], llama.FusedLlamaStep.current

    def counted(self):
        checks.append(self)
        return original(self)

    llama.FusedLlamaStep.current = counted
    try:
        first = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert len(checks) <= 1  # (none where the step was built in this call: it is new)
        with torch.no_grad():
            for layer in model.model.layers:  # in place: the bfloat16 copies are stale now
                layer.mlp.down_proj.weight.mul_(-3)
        checks.clear()
        second = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert len(checks) == 1
    finally:
        llama.FusedLlamaStep.current = original
    reference = rounded_copy(model, torch.bfloat16)  # PyTorch layers holding the rounded new weights
    reference.decode_config = DecodeConfig(fused=False)
    want = reference.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(second, want) and not torch.equal(first, second)


def prefilled(model, B: int = 2, T: int = 6) -> tuple[LinearizedCache, list]:
    """A cache after a random prompt [B, T] through `model`'s layers, and its per-layer states."""
    cache = LinearizedCache()
    with torch.no_grad():
        model(torch.randint(0, 97, (B, T)), cache=cache)
    return cache, [cache.states[i] for i in range(len(cache.states))]


def test_bad_states_and_tokens_are_refused_in_one_line():
    model = student()
    step = fused_step(model, DecodeConfig())
    _cache, states = prefilled(model)
    before = [s.S.clone() for s in states]
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 97\)"):
        step(torch.tensor([1, 97]), torch.tensor([6, 6]), states)
    with pytest.raises(ValueError, match="layer 0's state S must be a contiguous float32 CPU tensor"):
        step(torch.tensor([1]), torch.tensor([6]), states)  # a batch of 1 against states of 2
    with pytest.raises(ValueError, match="one state per layer"):
        step(torch.tensor([1, 2]), torch.tensor([6, 6]), states[:1])
    assert all(torch.equal(a, s.S) for a, s in zip(before, states, strict=True))  # nothing touched
    states[1].seen = states[1].seen + 1
    with pytest.raises(ValueError, match="seen the same tokens"):
        step(torch.tensor([1, 2]), torch.tensor([6, 6]), states)


def test_states_are_checked_again_whenever_a_tensor_or_seen_is_not_the_one_left():
    model = student()
    step = fused_step(model, DecodeConfig())
    cache, states = prefilled(model)
    step(torch.tensor([1, 2]), torch.tensor([6, 6]), states)
    assert step.knows(2, states) and not step.knows(1, states)
    copy = states[1].S.clone()
    states[1].S = copy  # a new tensor (what index_select and beam reordering give): checked again
    assert not step.knows(2, states)
    step(torch.tensor([1, 2]), torch.tensor([7, 7]), states)
    assert step.knows(2, states)
    for s in states:  # one object in every layer, but not the one the step left: checked again
        s.seen = torch.zeros(2)
    with pytest.raises(ValueError, match="seen must be an int64 CPU tensor"):
        step(torch.tensor([1, 2]), torch.tensor([8, 8]), states)
    for s in states:
        s.seen = torch.full((2,), 8)
    step(torch.tensor([1, 2]), torch.tensor([8, 8]), states)
    old = states[0].S.data_ptr()
    states[0].S.set_(torch.zeros_like(states[0].S))  # its storage swapped in place: the old one stays alive
    assert old in [st.data_ptr() for st in step._checked[0]["storages"]]
    step(torch.tensor([1, 2]), torch.tensor([9, 9]), states)  # (writes where it checked: no dangling pointer)
    other, others = prefilled(model)  # two generations taking turns: each keeps its check
    step(torch.tensor([1, 2]), torch.tensor([6, 6]), others)
    assert step.knows(2, states) and step.knows(2, others)
    del cache, states, copy, other, others
    assert not any(step._checked)  # the states are gone: nothing of theirs is kept


def test_the_mirror_of_the_struct_is_checked():
    import ctypes

    class Shifted(ctypes.Structure):
        _fields_ = [("n_layers", ctypes.c_long), *llama._LtLlama._fields_[1:]]

    llama.check_layout(llama.load())
    original = llama._LtLlama
    llama._LtLlama = Shifted
    try:
        with pytest.raises(RuntimeError, match="does not mirror lt_llama"):
            llama.check_layout(llama.load())
    finally:
        llama._LtLlama = original


def test_every_build_projects_like_the_reference(each_build):
    check_projections([f for f in llama.FORMATS if f[1] != torch.bfloat16 or fused.has_bf16_dot()], seed=1)
    check_tiles([f for f in TILE_FORMATS if llama.has_tiles(*f)], seed=4)  # (the AMX level's builds)


def test_every_build_steps_like_the_pytorch_layers(each_build):
    for weights in ("float32", "int8"):
        dtype = getattr(torch, weights)
        model = student("hybrid", "hedgehog")
        reference = model if dtype == torch.float32 else rounded_copy(model, dtype)
        worst, ours, theirs, _ = run_both(model, reference, B=3, config=DecodeConfig(weights=dtype))
        assert worst < 1e-5, weights
        assert_states_equal(ours, theirs, 1e-5)


def test_bench_perplexity_through_the_fused_step_equals_the_parallel_forward():
    """bench linearized's perplexity (every token through the C step, rows as a batch, from an empty
    state) equals the PyTorch parallel forward's on the same windows; the bandwidth probe reads the
    step's weight bytes."""
    from linear_transformers.bench.linearized import fused_perplexity, read_once, weight_views
    from linear_transformers.linearize.transfer import perplexity

    model = student("hybrid", "hedgehog", window=4, sinks=2)
    windows = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        want = perplexity(model, windows)
    step = fused_step(model, DecodeConfig())
    assert abs(fused_perplexity(step, windows) - want) < 1e-4 * want
    views = weight_views(step)
    assert sum(v.numel() * 4 for v in views) <= step.weight_bytes() and read_once(views) > 0


def test_weights_of_the_wrong_shape_are_refused_before_any_c_call():
    """The C step reads every weight by the sizes it is given; a description whose tensors disagree
    with them is refused in one line (it would otherwise be read out of bounds)."""
    w = llama_weights(student())
    w.layers[1]["wk"] = torch.zeros(16, 64)
    with pytest.raises(ValueError, match=r"layer 1's wk must have shape \[32, 64\], got \[16, 64\]"):
        llama.FusedLlamaStep(w)
    w = llama_weights(student())
    w.inv_freq = torch.zeros(3)
    with pytest.raises(ValueError, match=r"inv_freq must have shape \[8\]"):
        llama.FusedLlamaStep(w)
    w = llama_weights(student())
    w.layers[0]["fk_b"] = None
    with pytest.raises(ValueError, match="layer 0 lacks its Hedgehog feature-map weights"):
        llama.FusedLlamaStep(w)
