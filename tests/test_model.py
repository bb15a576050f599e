"""The causal model: the RNN path (prefill + step) computes the parallel path's logits for every
attention kind, head and norm placement; greedy RNN generation equals greedy recomputation;
batches equal one-by-one; the mixture of logistics is a distribution over the 256 levels."""

from __future__ import annotations

import math

import pytest
import torch

from linear_transformers.decode import DecodeConfig
from linear_transformers.heads import MixtureOfLogisticsHead
from linear_transformers.model import CausalTransformer, ModelConfig, sample

from helpers import small_model as _model

KINDS = [
    dict(attention="causal-linear", head="categorical", norm="pre", positional="sinusoidal"),
    dict(attention="causal-linear", head="mol", norm="post", positional="learned"),
    dict(attention="causal-linear", head="categorical", norm="pre", positional="none", feature_map="favor"),
    dict(attention="causal-softmax", head="categorical", norm="pre", positional="sinusoidal"),
    dict(attention="causal-softmax", head="mol", norm="post", positional="learned"),
]
IDS = ["linear-cat-pre-sin", "linear-mol-post-learned", "linear-favor-nopos", "softmax-cat-pre", "softmax-mol-post"]


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_step_logits_equal_parallel_logits(kind):
    model = _model(**kind)
    tokens, labels = torch.randint(0, 16, (3, 40)), torch.tensor([0, 2, 1])
    with torch.no_grad():
        parallel = model(tokens, labels)
        params, state = model.prefill(tokens[:, :0], labels)
        steps = [params]
        for t in range(39):
            params, state = model.step(tokens[:, t], state)
            steps.append(params)
    torch.testing.assert_close(torch.stack(steps, 1), parallel, atol=1e-4, rtol=0)
    # a longer prompt handed over by prefill continues the same way
    with torch.no_grad():
        params, state = model.prefill(tokens[:, :25], labels)
        torch.testing.assert_close(params, parallel[:, 25], atol=1e-4, rtol=0)
        params, state = model.step(tokens[:, 25], state)
    torch.testing.assert_close(params, parallel[:, 26], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_greedy_rnn_generation_equals_recomputing(kind):
    model = _model(**kind)
    labels = torch.tensor([2, 0])
    prompt = torch.randint(0, 16, (2, 5))
    rnn = model.generate(prompt=prompt, labels=labels, max_new_tokens=30, temperature=0)
    recompute = model.generate(prompt=prompt, labels=labels, max_new_tokens=30, temperature=0, mode="recompute")
    assert rnn.shape == (2, 35) and torch.equal(rnn[:, :5], prompt)
    assert torch.equal(rnn, recompute)


def test_batch_generation_equals_one_by_one():
    model = _model(attention="causal-linear", head="mol")
    labels = torch.tensor([0, 1, 2, 1])
    batch = model.generate(labels=labels, max_new_tokens=20, temperature=0)
    for i in range(4):
        assert torch.equal(model.generate(labels=labels[i : i + 1], max_new_tokens=20, temperature=0), batch[i : i + 1])


def test_sampling_is_seeded_and_follows_the_distribution():
    model = _model(n_classes=0)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a, b = model.generate(n=4, max_new_tokens=10, generator=g()), model.generate(n=4, max_new_tokens=10, generator=g())
    assert torch.equal(a, b)
    log_probs = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]).clamp_min(1e-30)).expand(20000, 4)
    counts = torch.bincount(sample(log_probs, generator=torch.Generator().manual_seed(0)), minlength=4) / 20000
    torch.testing.assert_close(counts, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.02, rtol=0)
    assert (sample(log_probs, top_k=1) == 0).all()
    assert set(sample(log_probs, top_p=0.8, generator=torch.Generator().manual_seed(0)).tolist()) <= {0, 1}


def test_mixture_of_logistics_is_a_distribution_over_the_levels():
    head = MixtureOfLogisticsHead(8, 256, 10)
    params = torch.randn(50, 30) * torch.tensor([3.0] * 10 + [1.0] * 10 + [2.0] * 10)  # some scales tiny, some wide
    params[:, 20:] -= 3
    log_p = head.log_probs(params)
    assert log_p.shape == (50, 256)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(50), atol=1e-4, rtol=0)
    # training's nll (the float32 PixelCNN++ formula, with a density fallback for bins under 1e-5) agrees
    # with sampling's float64 CDF differences to float32 precision
    targets = torch.randint(0, 256, (50,))
    torch.testing.assert_close(
        head.nll(params, targets), -log_p.gather(1, targets[:, None])[:, 0], atol=1e-3, rtol=1e-4
    )


def test_bits_per_dim_is_nats_over_ln2():
    model = _model(n_classes=0, head="mol", vocab=256)
    tokens = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert math.isclose(
            model.bits_per_dim(tokens).item(), model.nll(tokens).mean().item() / math.log(2), rel_tol=1e-6
        )
    # an untrained model is close to uniform over 256 levels: about 8 bits
    assert 5 < model.bits_per_dim(tokens).item() < 11


def test_class_label_conditions_the_output():
    model = _model()
    tokens = torch.randint(0, 16, (1, 10))
    with torch.no_grad():
        assert not torch.allclose(model(tokens, torch.tensor([0])), model(tokens, torch.tensor([1])))


def test_lsh_model_trains_and_generates_by_recomputing():
    model = _model(attention="causal-lsh", lsh_hashes=2, lsh_buckets=4).train()
    tokens, labels = torch.randint(0, 16, (3, 40)), torch.tensor([0, 2, 1])
    model.bits_per_dim(tokens, labels).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with pytest.raises(ValueError, match="causal-lsh attention has no recurrent state"):
        model.prefill(tokens, labels)
    # generation recomputes the prefix, drawing fresh rotations each time: seeded, it reproduces
    torch.manual_seed(3)
    a = model.generate(labels=labels, max_new_tokens=12, temperature=0)
    torch.manual_seed(3)
    b = model.generate(labels=labels, max_new_tokens=12, temperature=0, mode="recompute")
    assert a.shape == (3, 12) and torch.equal(a, b)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="attention='linear' is not one of 'causal-linear', 'causal-softmax'"):
        ModelConfig(attention="linear")
    with pytest.raises(ValueError, match="d_model=30 is not divisible by n_heads=4"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="lsh_buckets must be even"):
        ModelConfig(attention="causal-lsh", lsh_buckets=7)
    model = _model(positional="learned")  # (learned positions end at max_len; the others go on)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=16\), got values in \[0, 16\]"):
        model(torch.tensor([[0, 16]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="class-conditional .* pass labels"):
        model(torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"position 48 is past the learned position table \(max_len=48\)"):
        model(torch.zeros(1, 49, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"exceed the learned positions \(max_len=48\)"):
        model.generate(labels=torch.tensor([0]), max_new_tokens=49)
    with pytest.raises(TypeError, match="tokens must be an integer tensor"):
        model(torch.zeros(1, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match=r"the prompt's 60 tokens exceed the learned positions \(max_len=48\)"):
        model.generate(prompt=torch.zeros(1, 60, dtype=torch.long), labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="must agree on the batch, got n 3, the prompt's batch 2, the labels 2"):
        model.generate(n=3, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"bits_per_dim: tokens must be \[B, T\] with T >= 1"):
        model.bits_per_dim(torch.zeros(1, 0, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError, match="mol_components must be >= 1"):
        ModelConfig(head="mol", mol_components=0)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        ModelConfig(eps=float("nan"))


@pytest.mark.parametrize("attention", ["causal-linear", "causal-softmax"])
@pytest.mark.parametrize("positional", ["sinusoidal", "learned"])
def test_left_padding_leaves_every_real_token_as_it_is_alone(attention, positional):
    """Prompts of different lengths in one batch: with padding, each row's outputs, states and
    generated tokens are those of the row alone (padding enters no attention; positions start at
    the first real token)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=13,
        max_len=32,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=48,
        attention=attention,
        positional=positional,
    )
    m = CausalTransformer(cfg).eval()
    rows = [torch.randint(0, 13, (n,)) for n in (7, 3, 5)]
    T = 7
    tokens = torch.stack([torch.cat([torch.full((T - len(r),), 4), r]) for r in rows])
    padding = torch.stack([torch.arange(T) < T - len(r) for r in rows])
    with torch.no_grad():
        out = m(tokens, padding=padding)
        for b, r in enumerate(rows):
            torch.testing.assert_close(out[b, T - len(r) :], m(r[None])[0], atol=2e-5, rtol=2e-5)
        greedy = m.generate(prompt=tokens, padding=padding, max_new_tokens=6, temperature=0)
        for b, r in enumerate(rows):
            alone = m.generate(prompt=r[None], max_new_tokens=6, temperature=0)
            assert greedy[b, T:].tolist() == alone[0, len(r) :].tolist()
        if attention == "causal-linear":
            params, state = m.prefill(tokens, padding=padding)
            assert state.offsets.tolist() == [0, 4, 2]
            for b, r in enumerate(rows):
                p_alone, s_alone = m.prefill(r[None])
                torch.testing.assert_close(params[b], p_alone[0], atol=2e-5, rtol=2e-5)
                for layer, layer_alone in zip(state.layers, s_alone.layers, strict=True):
                    torch.testing.assert_close(layer.S[b], layer_alone.S[0], atol=2e-5, rtol=2e-5)
            picked = state.index_select(torch.tensor([2, 1]))
            assert picked.offsets.tolist() == [2, 4]


def test_padding_must_be_on_the_left_and_boolean():
    m = CausalTransformer(ModelConfig(vocab_size=5, max_len=8, d_model=8, n_layers=1, n_heads=2, d_ff=8)).eval()
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="padding must be on the left"):
        m(tokens, padding=torch.tensor([[False, True, False, False], [False] * 4]))
    with pytest.raises(ValueError, match=r"padding must be bool \[2, 4\] like the tokens"):
        m(tokens, padding=torch.zeros(2, 4, dtype=torch.long))
    with torch.no_grad():
        assert torch.equal(m(tokens, padding=torch.zeros(2, 4, dtype=torch.bool)), m(tokens))  # no padding at all


@pytest.mark.parametrize("positional", ["sinusoidal", "none"])
def test_generation_goes_on_past_max_len_where_positions_can_be_computed(positional):
    """An RNN's only length limit is its position encoding: sinusoidal positions are computed for any
    position and "none" has none, so generation runs to 10x max_len with a state of constant size;
    the recurrent tokens equal recomputing the whole prefix, with the fused step and without."""
    model = _model(n_classes=0, max_len=16, positional=positional, head="categorical")
    prompt = torch.randint(0, 16, (2, 4))
    with torch.no_grad():
        fused_rnn = model.generate(prompt=prompt, max_new_tokens=156, temperature=0)
        pytorch_rnn = model.generate(prompt=prompt, max_new_tokens=156, temperature=0, config=DecodeConfig(fused=False))
        recompute = model.generate(prompt=prompt, max_new_tokens=156, temperature=0, mode="recompute")
        _, state = model.prefill(prompt)
        shapes = [tuple(s.S.shape) for s in state.layers]
        for t in range(150):
            _, state = model.step(fused_rnn[:, 4 + t], state)
    assert fused_rnn.shape == (2, 160)
    assert torch.equal(fused_rnn, pytorch_rnn) and torch.equal(fused_rnn, recompute)
    # constant size; position 5 after the start token and the 4-token prompt, then 150 steps
    assert [tuple(s.S.shape) for s in state.layers] == shapes and state.position == 155


def test_learned_positions_say_where_they_end():
    model = _model(n_classes=0, max_len=16, positional="learned")
    with pytest.raises(ValueError, match=r"exceed the learned positions \(max_len=16\).*sinusoidal or none"):
        model.generate(prompt=torch.zeros(1, 4, dtype=torch.long), max_new_tokens=20)
    _, state = model.prefill(torch.zeros(1, 14, dtype=torch.long))  # positions 0-14: the start token and 14
    with torch.no_grad():
        _, state = model.step(torch.zeros(1, dtype=torch.long), state)  # position 15: the last one
        with pytest.raises(ValueError, match="position 16 is past the learned position table"):
            model.step(torch.zeros(1, dtype=torch.long), state)


@pytest.mark.parametrize("kind", KINDS[:3], ids=IDS[:3])
def test_packed_documents_are_modelled_as_if_alone(kind):
    """Packed documents (cu_seqlens): each its own start token, label and positions; the log-likelihoods
    and their gradients equal those of every document run alone."""
    model = _model(**kind).double()
    lengths = [5, 1, 30, 7]
    docs = [torch.randint(0, 16, (1, n)) for n in lengths]
    labels = torch.tensor([0, 2, 1, 1])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    torch.manual_seed(3)  # (dropout is off in eval mode; the RNG is for favor's features)
    model.eval()
    packed = model.nll(torch.cat(docs, 1), labels, cu_seqlens=cu)
    alone = torch.cat([model.nll(d, labels[i : i + 1]) for i, d in enumerate(docs)], 1)
    # (the heads' log-likelihoods are float32 whatever the model's dtype)
    torch.testing.assert_close(packed, alone, atol=1e-6, rtol=1e-6)
    g_packed = torch.autograd.grad(packed.sum(), list(model.parameters()), allow_unused=True)
    g_alone = torch.autograd.grad(alone.sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g_packed, g_alone, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_packing_errors():
    tokens, cu = torch.randint(0, 16, (1, 9)), torch.tensor([0, 4, 9])
    with pytest.raises(ValueError, match="packed documents \\(cu_seqlens\\) need linear attention"):
        _model(attention="causal-softmax")(tokens, torch.tensor([0, 1]), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"labels must have shape \[B\]=\[2\]"):
        _model()(tokens, torch.tensor([0]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="each go alone"):
        _model()(tokens, torch.tensor([0, 1]), cu_seqlens=cu, include_next=True)
    with pytest.raises(ValueError, match="end at the packed length T=9"):
        _model()(tokens, torch.tensor([0, 1]), cu_seqlens=torch.tensor([0, 4, 8]))
