"""The fused C step (decode/fused.py, model_step.c) against the PyTorch step it replaces: outputs and
states for every norm placement, feature map, position encoding, head, batch layout and weight
precision; the generation loop and the sampler in C; what it refuses; when it runs. The same checks
run on every ISA level and compiler this machine has (at the end)."""

from __future__ import annotations

import warnings

import pytest
import torch

from linear_transformers import decode, native
from linear_transformers.decode import DecodeConfig, fused
from linear_transformers.heads import MixtureOfLogisticsHead
from linear_transformers.model import CausalTransformer, ModelConfig
from linear_transformers.ops import cpu

from helpers import small_model as _model


def check_fused_step_equals_pytorch(norm, feature_map, batch, positional, head):
    """The C step (embedding, positions, blocks, final norm, head) against the PyTorch step."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=3, norm=norm, feature_map=feature_map, head=head, positional=positional)
    with torch.no_grad():  # trained-looking parameters, not LayerNorm's ones and zeros
        for name, t in model.named_parameters():
            if "norm" in name:
                t.add_(torch.randn_like(t) * 0.3)
    tokens, labels = torch.randint(0, 16, (batch, 30)), torch.randint(0, 3, (batch,))
    results = []
    with torch.no_grad():
        for config in (DecodeConfig(), DecodeConfig(fused=False)):
            params, state = model.prefill(tokens[:, :5], labels)
            outs = [params]
            for t in range(5, 29):
                params, state = model.step(tokens[:, t], state, config)
                outs.append(params)
            assert decode.built_step(model) is not None  # built by the fused pass (the eager pass ignores it)
            results.append((torch.stack(outs, 1), state))
    (fused_out, fused_state), (eager_out, eager_state) = results
    torch.testing.assert_close(fused_out, eager_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_state.layers, eager_state.layers, strict=True):
        torch.testing.assert_close(a.S, b.S, atol=1e-5, rtol=1e-5)
        assert a.n_tokens == b.n_tokens


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
@pytest.mark.parametrize("batch", [1, 6, 7])  # the C step works in tiles of 4 rows: full, 2 and 3 left over
@pytest.mark.parametrize(("positional", "head"), [("sinusoidal", "mol"), ("learned", "categorical"), ("none", "mol")])
def test_fused_cpu_step_equals_the_pytorch_step(norm, feature_map, batch, positional, head):
    check_fused_step_equals_pytorch(norm, feature_map, batch, positional, head)


def test_fused_step_with_bfloat16_weights_stays_close():
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=0)
    tokens = torch.randint(0, 16, (2, 30))
    with torch.no_grad():
        parallel = model(tokens)
        config = DecodeConfig(weights=torch.bfloat16)
        params, state = model.prefill(tokens[:, :0])
        outs = [params]
        for t in range(29):
            params, state = model.step(tokens[:, t], state, config)
            outs.append(params)
    assert decode.built_step(model).weights == torch.bfloat16
    err = (torch.stack(outs, 1) - parallel).abs().max() / parallel.abs().max()
    assert 0 < err < 2e-2  # bfloat16 projections: close, not equal


@pytest.mark.parametrize("batch", [3, 25])  # (25: past where float32/bfloat16 take the batched layout)
def test_fused_step_with_int8_weights_equals_the_model_with_those_weights(batch):
    """int8 projections (one scale per output row) against the PyTorch step of the model holding the
    dequantised weights: equal to float32 rounding; against the float32 model, close."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    from linear_transformers.decode import llama

    model = _model(n_classes=0)
    reference = _model(n_classes=0)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for block in reference.blocks:
            for lin in (block.attn.qkv, block.attn.out, block.ff_in, block.ff_out):
                lin.weight.copy_(llama.dequantize_int8(llama.quantize_int8(lin.weight), *lin.weight.shape))
    tokens = torch.randint(0, 16, (batch, 20))
    config = DecodeConfig(weights=torch.int8)
    with torch.no_grad():
        _, state = reference.prefill(tokens[:, :0])  # (the start token runs in the prefill: the same weights)
        _, ref_state = reference.prefill(tokens[:, :0])
        for t in range(20):
            got, state = model.step(tokens[:, t], state, config)
            want, ref_state = reference.step_pytorch(tokens[:, t], ref_state)
            assert (got - want).abs().max() / want.abs().max() < 1e-5
    assert decode.built_step(model).weights == torch.int8
    for s, r in zip(state.layers, ref_state.layers, strict=True):
        assert (s.S - r.S).abs().max() / r.S.abs().max() < 1e-5


@torch.no_grad()
def fused_and_emulated(model, emulated, config, tokens) -> list[torch.Tensor]:
    """The outputs [B, T - 4, ...] of `model`'s fused step in `config` and of `emulated`'s PyTorch
    step, fed the same tokens after the same parallel prefill of the first 4 (float32 for both)."""
    outs = []
    start_params, start_state = model.prefill(tokens[:, :4])
    for m, cfg in ((model, config), (emulated, DecodeConfig(fused=False))):
        params, state = start_params, start_state.clone()
        seq = [params]
        for t in range(4, tokens.shape[1] - 1):
            params, state = m.step(tokens[:, t], state, cfg)
            seq.append(params)
        outs.append(torch.stack(seq, 1))
    return outs


def check_bfloat16_dots(norm, batch):
    """dot=bfloat16 computes exactly this: projection weights and their inputs rounded to bfloat16,
    products and sums in float32. Emulated in PyTorch (rounded weights, inputs rounded by a hook),
    the eager step agrees with the fused one to float32 summation-order error (but for the rare
    rounding that such an error flips)."""
    import copy

    if not (fused.available() and fused.has_bf16_dot()):
        pytest.skip("needs the CPU kernel on a CPU with AVX512-BF16")
    model = _model(n_classes=0, norm=norm)
    emulated = copy.deepcopy(model)
    with torch.no_grad():
        for block in emulated.blocks:
            for lin in (block.attn.qkv, block.attn.out, block.ff_in, block.ff_out):
                lin.weight.copy_(lin.weight.bfloat16().float())
                lin.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    tokens = torch.randint(0, 16, (batch, 30))
    outs = fused_and_emulated(model, emulated, DecodeConfig.precision("bf16"), tokens)
    assert decode.built_step(model).dot == torch.bfloat16
    # A float32 difference of an ulp (vectorised sums, exp) in a value about to be rounded to bfloat16
    # can flip its rounding, which moves what follows by ~1e-3: rare, so nearly every output agrees.
    diff = (outs[0] - outs[1]).abs()
    assert (diff <= 2e-4 + 2e-4 * outs[1].abs()).float().mean() > 0.99, diff.max()
    assert diff.max() < 5e-3
    assert (outs[0] - model(tokens)[:, 4:]).abs().max() > 1e-4  # and it is not the float32 model


@pytest.mark.parametrize("batch", [1, 21])  # (21: past where float32 takes the batched layout)
def test_fused_step_with_int8_dots_equals_rounding_weights_and_inputs(batch):
    """dot=torch.int8: int8 weights times inputs rounded to int8 per block of 32, emulated in PyTorch
    (dequantised weights, inputs rounded by a hook): equal but for the rare input that a float32
    difference moves across a rounding boundary of its int8 grid."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    import copy

    from linear_transformers.decode import llama

    from helpers import round_input_to_int8

    model = _model(n_classes=0)
    emulated = copy.deepcopy(model)
    with torch.no_grad():
        for block in emulated.blocks:
            for lin in (block.attn.qkv, block.attn.out, block.ff_in, block.ff_out):
                lin.weight.copy_(llama.dequantize_int8(llama.quantize_int8(lin.weight), *lin.weight.shape))
                lin.register_forward_pre_hook(round_input_to_int8)
    tokens = torch.randint(0, 16, (batch, 24))
    outs = fused_and_emulated(model, emulated, DecodeConfig.precision("int8-dot"), tokens)
    assert decode.built_step(model).dot == torch.int8
    diff = (outs[0] - outs[1]).abs()
    assert (diff <= 1e-5 + 1e-5 * outs[1].abs()).float().mean() > 0.95, diff.max()
    assert diff.max() < 2e-2 * outs[1].abs().max()
    assert (outs[0] - model(tokens)[:, 4:]).abs().max() > 1e-4  # and it is not the float32 model


@pytest.mark.parametrize("batch", [7, 37])  # 37: the batched layout (on AMX tiles where fused.has_amx())
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_fused_step_with_bfloat16_dots_equals_rounding_then_float32(norm, batch):
    check_bfloat16_dots(norm, batch)


def test_dots_are_refused_where_they_cannot_run():
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=0)
    step = fused.from_model(model)
    layers, io = step.layers, step.io
    kw = dict(n_heads=4, dk=8, dv=8, pre_norm=True, feature_map="elu", ln_eps=1e-5, norm_eps=1e-5, attn_eps=1e-6)
    with pytest.raises(ValueError, match="needs weights=torch.bfloat16"):
        fused.FusedModelStep(layers, io, **kw, dot=torch.bfloat16)
    with pytest.raises(ValueError, match="dot must be"):
        fused.FusedModelStep(layers, io, **kw, weights=torch.bfloat16, dot=torch.float16)
    with pytest.raises(ValueError, match="io must map"):
        fused.FusedModelStep(layers, {**io, "embed": None}, **kw)
    with pytest.raises(ValueError, match="dot=torch.int8 needs weights=torch.int8"):
        fused.FusedModelStep(layers, io, **kw, weights=torch.bfloat16, dot=torch.int8)
    narrow = CausalTransformer(ModelConfig(vocab_size=16, d_model=24, n_layers=1, n_heads=4, d_ff=64))
    with pytest.raises(ValueError, match="dot=torch.int8 needs input widths divisible by 32"):
        fused.from_model(narrow, torch.int8, torch.int8)
    if fused.has_bf16_dot():
        with pytest.raises(ValueError, match="divisible by 32"):
            fused.from_model(narrow, torch.bfloat16, torch.bfloat16)


@pytest.mark.parametrize("dot", ["float32", "bfloat16"])
@pytest.mark.parametrize(("batch", "rows"), [(7, [5]), (45, list(range(3, 26)))])
def test_fused_step_rows_do_not_depend_on_the_batch(dot, batch, rows):
    """The C step tiles rows of the batch; a row's result is bit for bit the same alone or in a batch
    of any size in the same layout (below 20 rows: rows as tiles; from 20: rows as vector lanes)."""
    if not fused.available() or (dot == "bfloat16" and not fused.has_bf16_dot()):
        pytest.skip("needs the CPU kernel (and AVX512-BF16 for bfloat16 dots)")
    model = _model(n_classes=0)
    config = DecodeConfig(weights=getattr(torch, dot), dot=getattr(torch, dot))
    tokens = torch.randint(0, 16, (batch, 12))
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :2])
        outs = []
        for part, st in ((tokens, state.clone()), (tokens[rows], state.index_select(torch.tensor(rows)))):
            seq = [model.step(part[:, t], st, config)[0] for t in range(2, 12)]
            outs.append(torch.stack(seq, 1))
    assert torch.equal(outs[0][rows], outs[1])


def check_batched_layout(norm, n_heads, batch, weights):
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=0, norm=norm, n_heads=n_heads)
    if weights == "bfloat16":  # the eager reference gets the same rounded weights
        with torch.no_grad():
            for block in model.blocks:
                for lin in (block.attn.qkv, block.attn.out, block.ff_in, block.ff_out):
                    lin.weight.copy_(lin.weight.bfloat16().float())
    tokens = torch.randint(0, 16, (batch, 24))
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :3])
        results = []
        for config in (DecodeConfig(max_batch=128, weights=getattr(torch, weights)), DecodeConfig(fused=False)):
            st = state.clone()
            results.append((torch.stack([model.step(tokens[:, t], st, config)[0] for t in range(3, 24)], 1), st))
    assert decode.built_step(model) is not None and decode.built_step(model).weights == getattr(torch, weights)
    (fused_out, fused_state), (eager_out, eager_state) = results
    torch.testing.assert_close(fused_out, eager_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_state.layers, eager_state.layers, strict=True):
        torch.testing.assert_close(a.S, b.S, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.z, b.z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("n_heads", [2, 4])  # heads of 16 (attention 16 lanes at a time) and of 8
@pytest.mark.parametrize("batch", [19, 20, 37, 70])  # 19: rows as tiles; then 2, 3 and 4 + 1 vectors of rows
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_fused_step_in_the_batched_layout_equals_the_pytorch_step(norm, n_heads, batch, weights):
    check_batched_layout(norm, n_heads, batch, weights)


def check_feed_forward_remainder(d_ff):
    """The C step applies GELU 16 outputs at a time; widths whose share is not a multiple of 16 go
    through the remainder path, and the feed-forward layers' own tails with them."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    cfg = ModelConfig(vocab_size=16, max_len=48, d_model=40, n_layers=2, n_heads=4, d_ff=d_ff, head="mol")
    model = CausalTransformer(cfg).eval()
    tokens = torch.randint(0, 16, (3, 20))
    with torch.no_grad():
        parallel = model(tokens)
        _, state = model.prefill(tokens[:, :0])
        outs = [model.step(tokens[:, t], state)[0] for t in range(19)]
    assert decode.built_step(model) is not None
    torch.testing.assert_close(torch.stack(outs, 1), parallel[:, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_ff", [36, 100])
def test_fused_step_with_feed_forward_widths_that_leave_a_remainder(d_ff):
    check_feed_forward_remainder(d_ff)


def check_generation_loop_in_c(monkeypatch, batch, n_classes, prompt_len, precision, chunk):
    """With a mixture-of-logistics head at temperature 1, generate() runs its tokens in C calls
    (FusedModelStep.sample_mol: the steps and the head sampled in C, a parallel region per call);
    token for token it equals stepping the model and sampling the head, under the same generator,
    in float32 and with bfloat16 dots (batch 21: the batched layout, on AMX tiles where available),
    in one call or in calls of 7 tokens."""
    if not fused.available() or (precision == "bfloat16" and not fused.has_bf16_dot()):
        pytest.skip("needs the CPU kernel (and AVX512-BF16 for bfloat16 dots)")
    calls = []
    original = fused.FusedModelStep.sample_mol
    monkeypatch.setattr(fused.FusedModelStep, "sample_mol", lambda *a, **k: calls.append(1) or original(*a, **k))
    model = _model(n_classes=n_classes, head="mol")
    config = DecodeConfig(weights=getattr(torch, precision), dot=getattr(torch, precision))
    monkeypatch.setattr(fused.FusedModelStep, "GENERATE_CHUNK", chunk)
    prompt = torch.randint(0, 16, (batch, prompt_len))
    labels = torch.randint(0, 3, (batch,)) if n_classes else None
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        fast = model.generate(prompt=prompt, labels=labels, max_new_tokens=40, generator=gen, config=config)
        assert len(calls) == -(-39 // chunk)  # the 39 tokens after the first, in calls of `chunk`
        gen.manual_seed(7)
        params, state = model.prefill(prompt, labels)
        slow = [prompt]
        for t in range(40):
            slow.append(model.head.sample(params, generator=gen)[:, None])
            if t < 39:
                params, state = model.step(slow[-1][:, 0], state, config)
    assert torch.equal(fast, torch.cat(slow, 1))
    assert len(calls) == -(-39 // chunk)  # the reference loop did not use it


@pytest.mark.parametrize(("precision", "chunk"), [("float32", 64), ("float32", 7), ("bfloat16", 7)])
@pytest.mark.parametrize(("batch", "n_classes", "prompt_len"), [(2, 0, 0), (3, 3, 5), (21, 0, 4)])
def test_generation_loop_in_c_draws_the_same_tokens_as_stepping(
    monkeypatch, batch, n_classes, prompt_len, precision, chunk
):
    check_generation_loop_in_c(monkeypatch, batch, n_classes, prompt_len, precision, chunk)


def test_a_token_batch_that_does_not_match_the_state_is_refused():
    """A batch larger than the state's used to be written past the state's buffers by the C step
    (heap corruption); smaller, silently wrong. Both paths now refuse it, naming both batches."""
    for config in (DecodeConfig(), DecodeConfig(fused=False)):
        model = _model(n_classes=0)
        with torch.no_grad():
            _, state = model.prefill(torch.zeros(2, 0, dtype=torch.long))
            before = [s.S.clone() for s in state.layers]
            for tokens in (torch.ones(64, dtype=torch.long), torch.ones(1, dtype=torch.long), torch.ones(2, 1)):
                with pytest.raises(ValueError, match=r"token must be \[B\], B the state's batch \{2\}"):
                    model.step(tokens, state, config)
            assert all(torch.equal(a, s.S) for a, s in zip(before, state.layers, strict=True))
            model.step(torch.ones(2, dtype=torch.long), state, config)  # the right batch still works


def test_the_fused_step_checks_every_state_tensor_it_writes():
    """Replaced state tensors (another shape, dtype, a view that is not contiguous, too few layers)
    are refused before the C step writes into them."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=0)
    with torch.no_grad():
        _, state = model.prefill(torch.zeros(3, 0, dtype=torch.long))
        step = fused.from_model(model)
        S, z = [s.S for s in state.layers], [s.z for s in state.layers]
        token = torch.ones(3, dtype=torch.long)
        cases = [
            (S[:1], z, "one state per layer"),
            ([S[0][:, :1], *S[1:]], z, r"layer 0's state S must be .* \[3, 4, 8, 8\] .* got .* \[3, 1, 8, 8\]"),
            ([S[0].double(), *S[1:]], z, "layer 0's state S must be a contiguous float32"),
            (S, [z[0], z[1].transpose(1, 2).contiguous().transpose(1, 2)], "layer 1's state z .* not contiguous"),
            ([S[0], S[1].transpose(2, 3)], z, "not contiguous"),
        ]
        for bad_S, bad_z, message in cases:
            with pytest.raises(ValueError, match=message):
                step(token, 0, bad_S, bad_z)
        with pytest.raises(ValueError, match="tokens must be"):
            step(token[:, None], 0, S, z)
        with pytest.raises(ValueError, match="at least one token"):
            step(token[:0], 0, [s[:0] for s in S], [t[:0] for t in z])


def test_fused_step_refuses_bad_tokens_and_positions_without_touching_the_state():
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=0, max_len=8, positional="learned")  # (learned positions end at max_len)
    with torch.no_grad():
        _, state = model.prefill(torch.randint(0, 16, (2, 3)))
        before = state.clone()
        step = fused.from_model(model)
        for bad in (torch.tensor([3, 16]), torch.tensor([-1, 0])):
            with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=16\)"):
                model.step(bad, state)  # refused by the model before any step
            with pytest.raises(ValueError, match=r"tokens must lie in \[0, 16\)"):  # and by the C step itself
                step(bad, state.position, [s.S for s in state.layers], [s.z for s in state.layers])
        assert state.position == before.position == 4  # start token + 3
        for a, b in zip(state.layers, before.layers, strict=True):
            assert torch.equal(a.S, b.S) and torch.equal(a.z, b.z) and a.n_tokens == b.n_tokens
        for _ in range(4):
            model.step(torch.tensor([1, 2]), state)
        with pytest.raises(ValueError, match=r"position 8 is past the learned position table \(max_len=8\)"):
            model.step(torch.tensor([1, 2]), state)


def test_generation_loop_in_c_refuses_bad_requests_and_non_finite_parameters():
    """FusedModelStep.sample_mol runs its tokens in C calls: a request past max_len or with
    more levels than the vocabulary is refused before anything moves; parameters that are not
    finite stop it with the token where they appeared."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=0, head="mol", max_len=12)
    with torch.no_grad():
        _, state = model.prefill(torch.randint(0, 16, (2, 3)))
        step = decode.fused_step_for(model, 2, state)
        S, z = [s.S for s in state.layers], [s.z for s in state.layers]
        before = [t.clone() for t in S + z]
        first = torch.tensor([1, 2])

        def draws(n):
            return torch.rand(n, 2, 10) + 0.1, torch.rand(n, 2) * 0.98 + 0.01

        with pytest.raises(ValueError, match=r"position \+ n <= 12"):
            step.sample_mol(first, state.position, S, z, *draws(12 - state.position + 1), 16)
        with pytest.raises(ValueError, match="levels <= 16"):
            step.sample_mol(first, state.position, S, z, *draws(2), 17)
        with pytest.raises(ValueError, match=r"tokens must lie in \[0, 16\)"):
            step.sample_mol(torch.tensor([1, 16]), state.position, S, z, *draws(2), 16)
        race, u = draws(2)
        for bad_race, bad_u, name in (
            (race[:, :1], u, "race"),
            (race, u.double(), "u"),
            (race.mT.mT[:, :, :5], u, "race"),
        ):
            with pytest.raises(ValueError, match=f"{name} must be a contiguous float32 CPU tensor"):
                step.sample_mol(first, state.position, S, z, bad_race, bad_u, 16)
        assert all(torch.equal(a, b) for a, b in zip(S + z, before, strict=True))
        assert step.sample_mol(first, state.position, S, z, *draws(12 - state.position), 16).shape == (8, 2)
        model.head.proj.bias[0] = float("nan")
        with pytest.raises(ValueError, match=r"not finite \(NaN or inf\) \(token 1 of 3\)"):
            step.sample_mol(first, 0, S, z, *draws(3), 16)


def test_fused_step_falls_back_where_it_does_not_apply():
    tokens = torch.randint(0, 16, (1, 12))
    for kwargs in (dict(feature_map="favor"), dict(attention="causal-softmax")):
        model = _model(n_classes=0, **kwargs)
        model.generate(n=1, max_new_tokens=5)
        assert decode.built_step(model) is None
    model = _model(n_classes=0)
    model.generate(n=1, max_new_tokens=5)
    assert decode.built_step(model) is not None
    model.double()  # moving or casting the parameters drops the fused step; float64 then runs in PyTorch
    assert decode.built_step(model) is None
    with torch.no_grad():
        _, state = model.prefill(tokens)
        model.step(tokens[:, 0], state)
    assert decode.built_step(model) is None
    model.float()
    _, state = model.prefill(tokens)  # autograd on: the differentiable PyTorch path
    model.step(tokens[:, 0], state)
    assert decode.built_step(model) is None


@pytest.mark.parametrize("winner", ["fused", "pytorch"])
def test_the_fused_step_runs_only_where_it_measured_faster(monkeypatch, tmp_path, winner):
    """By default the model takes the fused step only where its build measured faster than the
    PyTorch step on this machine (native.verdict, kept beside the library); either way the outputs agree."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    monkeypatch.setenv("LINEAR_TRANSFORMERS_AUTO_KERNELS", "measure")
    monkeypatch.setenv("LINEAR_TRANSFORMERS_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_warned", set())
    monkeypatch.setattr(native, "_verdicts", {})
    times = (1e-4, 2e-4) if winner == "fused" else (2e-4, 1e-4)
    monkeypatch.setattr(CausalTransformer, "measure_fused_step", staticmethod(lambda: times))
    monkeypatch.setattr(cpu, "_measure_attention", lambda: (1.0, 2.0))
    model = _model(n_classes=0, head="mol")
    tokens = torch.randint(0, 16, (2, 10))
    with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _, state = model.prefill(tokens[:, :0])
        outs = [model.step(tokens[:, t], state)[0] for t in range(9)]
    assert (decode.built_step(model) is not None) == (winner == "fused")
    assert any("fused_step kernel" in str(w.message) for w in seen) == (winner == "pytorch")
    torch.testing.assert_close(torch.stack(outs, 1), model(tokens)[:, 1:], atol=1e-5, rtol=1e-5)


def check_mixture_sampling_in_c(monkeypatch):
    """On the CPU the mixture is sampled in C from PyTorch's random numbers: the same generator
    gives the same levels as the PyTorch arithmetic (a level may differ by one where the two
    roundings straddle a bin edge)."""
    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    head = MixtureOfLogisticsHead(8, 256, 10)
    params = torch.randn(20_000, 30) * torch.tensor([3.0] * 10 + [1.0] * 10 + [2.0] * 10) - torch.tensor(
        [0.0] * 20 + [3.0] * 10
    )
    fast = head.sample(params, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(fused, "available", lambda: False)
    slow = head.sample(params, generator=torch.Generator().manual_seed(1))
    monkeypatch.undo()
    differ = fast != slow
    assert differ.sum() <= 3 and ((fast - slow).abs() <= 1).all()
    assert len(set(fast.tolist())) > 200  # the draws cover the levels, including both ends
    assert fast.min() == 0 and fast.max() == 255
    with pytest.raises(ValueError, match="not finite"):
        head.sample(torch.cat([params[:2], torch.full((1, 30), float("nan"))]))


def test_mixture_sampling_in_c_equals_the_pytorch_arithmetic(monkeypatch):
    check_mixture_sampling_in_c(monkeypatch)


def test_mixture_sampling_shortcut_draws_the_discretised_distribution():
    """Sampling the mixture directly (component, logistic value, bin) must give the level
    probabilities that log_probs states."""
    head = MixtureOfLogisticsHead(8, 16, 3)
    params = torch.tensor([[0.5, -0.2, 0.1, -0.6, 0.1, 0.7, -2.5, -1.5, -3.0]]).expand(200_000, 9)
    draws = head.sample(params, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=16).double() / len(draws)
    expected = head.log_probs(params[:1])[0].exp().double()
    assert (freq - expected).abs().max() < 4e-3
    assert head.sample(params[:3], temperature=0).tolist() == [int(expected.argmax())] * 3


def test_decode_config_refuses_what_the_step_cannot_do():
    with pytest.raises(ValueError, match="dot=torch.bfloat16 needs weights=torch.bfloat16"):
        DecodeConfig(dot=torch.bfloat16)
    with pytest.raises(
        ValueError, match="weights must be torch.float32, torch.bfloat16 or torch.int8, got torch.float16"
    ):
        DecodeConfig(weights=torch.float16)
    with pytest.raises(ValueError, match="dot must be torch.float32, torch.bfloat16 or torch.int8, got torch.float16"):
        DecodeConfig(dot=torch.float16)
    with pytest.raises(ValueError, match="dot=torch.int8 needs weights=torch.int8, got torch.bfloat16"):
        DecodeConfig(weights=torch.bfloat16, dot=torch.int8)
    with pytest.raises(ValueError, match="max_batch must be >= 0, got -1"):
        DecodeConfig(max_batch=-1)
    with pytest.raises(
        ValueError, match="cpu precision must be one of float32, bf16-weights, bf16, int8, int8-dot, got 'fp16'"
    ):
        DecodeConfig.precision("fp16")
    assert DecodeConfig.precision("bf16-weights") == DecodeConfig(weights=torch.bfloat16)
    assert DecodeConfig.precision("int8") == DecodeConfig(weights=torch.int8)
    assert DecodeConfig.precision("int8-dot") == DecodeConfig(weights=torch.int8, dot=torch.int8)


@pytest.mark.parametrize("head", ["mol", "categorical"])
@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.8, top_k=5), dict(temperature=0)])
def test_every_stepper_gives_the_same_tokens(head, sampling):
    """generate() is one loop over the stepper decode.stepper picks: the fused step (or the fused
    mixture loop), the PyTorch step and recomputing the prefix draw the same tokens from one seed."""
    model = _model(n_classes=0, head=head)
    prompt = torch.randint(0, 16, (3, 4))
    runs = []
    for mode, config in (("rnn", DecodeConfig()), ("rnn", DecodeConfig(fused=False)), ("recompute", DecodeConfig())):
        gen = torch.Generator().manual_seed(11)
        runs.append(
            model.generate(prompt=prompt, max_new_tokens=30, generator=gen, mode=mode, config=config, **sampling)
        )
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def test_a_config_that_is_not_a_decode_config_is_refused():
    model = _model(n_classes=0)
    with pytest.raises(TypeError, match="generate: config must be a linear_transformers.decode.DecodeConfig, got dict"):
        model.generate(n=1, max_new_tokens=2, config={"fused": False})
    with torch.no_grad():
        _, state = model.prefill(torch.zeros(1, 0, dtype=torch.long))
        with pytest.raises(TypeError, match="CausalTransformer.step: config must be .*DecodeConfig, got str"):
            model.step(torch.zeros(1, dtype=torch.long), state, "bf16")


def test_fused_step_survives_unrelated_module_registrations_without_rebuilding():
    """A module built elsewhere in the process bumps the registration count; the model's own fused
    step is kept (its tensors are the same) and the cheap check holds again afterwards."""
    from linear_transformers.decode import fused_step_for

    if not fused.available():
        pytest.skip(f"no CPU kernel: {fused.unavailable_reason()}")
    model = _model(n_classes=0, max_len=8)
    with torch.no_grad():
        _, state = model.prefill(torch.randint(0, 16, (1, 2)))
        step = fused_step_for(model, 1, state)
        if step is None:
            pytest.skip("the fused step is not taken here")
        torch.nn.Linear(2, 2)  # registers parameters: an unrelated module
        assert not step.current()
        assert fused_step_for(model, 1, state) is step and step.current()
        model.blocks[0].norm1.weight = torch.nn.Parameter(torch.ones_like(model.blocks[0].norm1.weight))
        assert fused_step_for(model, 1, state) is not step


# ---- every ISA level this machine runs, with gcc and clang (the each_build fixture, conftest.py) ----


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("batch", [1, 7])
def test_every_build_steps_like_pytorch(each_build, norm, batch):
    check_fused_step_equals_pytorch(norm=norm, feature_map="elu", batch=batch, positional="sinusoidal", head="mol")


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_every_build_in_the_batched_layout(each_build, norm):
    # 37 rows: whole and partial vectors of rows; heads of 8 (attention one value at a time)
    check_batched_layout(norm=norm, n_heads=4, batch=37, weights="float32")
    check_feed_forward_remainder(d_ff=36)


def test_every_build_generates_in_c_like_stepping(each_build, monkeypatch):
    check_generation_loop_in_c(monkeypatch, batch=21, n_classes=0, prompt_len=4, precision="float32", chunk=7)
    check_mixture_sampling_in_c(monkeypatch)


def test_every_build_has_bfloat16_dots_where_its_level_has_them(each_build, monkeypatch):
    level, _ = each_build
    assert fused.has_bf16_dot() == (level in ("x86-64-v4-amx", "x86-64-v4-bf16"))
    assert not fused.has_amx() or level == "x86-64-v4-amx"  # AMX tiles only where built for them
    if not fused.has_bf16_dot():
        with pytest.raises(ValueError, match=f"needs a CPU with AVX512-BF16 .* this one is built for {level}"):
            fused.from_model(_model(n_classes=0), torch.bfloat16, torch.bfloat16)
        return
    check_bfloat16_dots(norm="pre", batch=37)
    check_generation_loop_in_c(monkeypatch, batch=3, n_classes=3, prompt_len=5, precision="bfloat16", chunk=7)
