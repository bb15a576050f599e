"""Left padding in a linearised Llama: each padded row computes what it computes alone. The parallel
form (outputs, gradients), the prefilled state (S, z, ring, sinks, tokens seen), the forward's
logits and generate() (PyTorch layers and the fused C step, whose rows then hold different counts)
all equal the unpadded row's; padding the state cannot hold is a one-line error, not a wrong answer.
(Before this was handled, a padded row's greedy tokens differed from its own: the keys of its
padding entered the linear state and the window.)"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from linear_transformers.decode import DecodeConfig, llama
from linear_transformers.linearize import LinearizeConfig, LinearizedCache, generate, hybrid_attention, linearize
from linear_transformers.linearize.attention import step_attention

from helpers import linear_llama, tiny_llama

STATE = ("S", "z", "ring_k", "ring_v", "sink_k", "sink_v")


@pytest.mark.parametrize("mode", ["hybrid", "window"])
@pytest.mark.parametrize(
    ("T", "window", "sinks", "starts"),
    [(13, 4, 2, [0, 5, 12]), (20, 3, 5, [2, 17, 0]), (9, 1, 0, [8, 3, 9]), (16, 8, 3, [1, 15, 6])],
)
def test_hybrid_form_of_a_padded_row_is_the_row_alone(mode, T, window, sinks, starts):
    torch.manual_seed(T + window)
    B, H, D, F = len(starts), 2, 8, 6
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    fk_w = torch.randn(H, D, F, dtype=torch.float64)
    fmap = lambda x: torch.softmax(torch.einsum("bthd,hdf->bthf", x, fk_w), -1)  # noqa: E731
    feats = (lambda x: fmap(x)) if mode == "hybrid" else (lambda x: None)
    start = torch.tensor(starts)
    y = hybrid_attention(q, k, v, feats(q), feats(k), window, sinks, 1e-6, start)
    y.sum().backward()
    for b, s in enumerate(starts):
        assert (y[b, :s] == 0).all()  # padding outputs nothing ...
        assert (q.grad[b, :s] == 0).all() and (k.grad[b, :s] == 0).all() and (v.grad[b, :s] == 0).all()
        if s == T:
            continue
        qa, ka, va = (x.detach()[b : b + 1, s:].requires_grad_() for x in (q, k, v))
        alone = hybrid_attention(qa, ka, va, feats(qa), feats(ka), window, sinks, 1e-6)
        alone.sum().backward()
        torch.testing.assert_close(y[b, s:], alone[0], rtol=1e-10, atol=1e-12)  # ... the rest is the row's own
        for g, ga in ((q.grad, qa.grad), (k.grad, ka.grad), (v.grad, va.grad)):
            torch.testing.assert_close(g[b, s:], ga[0], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("mode", ["hybrid", "linear", "window"])
def test_prefilled_state_and_steps_of_padded_rows_are_the_rows_alone(mode):
    model = linear_llama(mode, "hedgehog", window=4, sinks=3)
    attn = model.model.layers[0].self_attn
    torch.manual_seed(0)
    T, starts = 11, [0, 4, 9, 10]
    q, k, v = (torch.randn(len(starts), T, attn.n_heads, attn.head_dim) for _ in range(3))
    state = attn.prefill_state(q, k, v, torch.tensor(starts))
    assert state.seen.tolist() == [T - s for s in starts]
    alone = [attn.prefill_state(q[b : b + 1, s:], k[b : b + 1, s:], v[b : b + 1, s:]) for b, s in enumerate(starts)]
    for b, a in enumerate(alone):
        for name in STATE:
            x, y = getattr(state, name), getattr(a, name)
            if y is not None:
                torch.testing.assert_close(x[b : b + 1], y, rtol=1e-5, atol=1e-6)
    # three steps of the batch: each row advances from its own count, as it does alone
    for _ in range(3):
        qn, kn, vn = (torch.randn(len(starts), attn.n_heads, attn.head_dim) for _ in range(3))
        fq = attn.feature_map_q(qn) if mode != "window" else None
        cfg = attn.cfg
        groups = attn.n_heads // attn.n_kv_heads
        y = step_attention(qn, kn, vn, fq, attn.feature_map_k, state, mode, cfg.window, cfg.sinks, cfg.eps, groups)
        for b, a in enumerate(alone):
            fqb = None if fq is None else fq[b : b + 1]
            yb = step_attention(
                qn[b : b + 1],
                kn[b : b + 1],
                vn[b : b + 1],
                fqb,
                attn.feature_map_k,
                a,
                mode,
                cfg.window,
                cfg.sinks,
                cfg.eps,
                groups,
            )
            torch.testing.assert_close(y[b : b + 1], yb, rtol=1e-5, atol=1e-6)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, 1
    return ids, mask


@pytest.mark.parametrize("mode", ["hybrid", "linear", "window"])
@pytest.mark.parametrize("fused", [True, False])
def test_generate_on_a_left_padded_batch_gives_each_row_its_own_tokens(mode, fused):
    if fused and not llama.available():
        pytest.skip(f"the fused Llama step is not built here: {llama.unavailable_reason()}")
    model = linear_llama(mode, "hedgehog", window=5, sinks=2)
    model.decode_config = DecodeConfig(fused=fused)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (12, 7, 1, 10)]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        logits = model(ids, attention_mask=mask).logits
        for b, r in enumerate(rows):
            alone = model.generate(r[None], max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert torch.equal(out[b, ids.shape[1] :], alone[0, len(r) :]), b
            want = model(r[None]).logits[0]
            torch.testing.assert_close(logits[b, -len(r) :], want, rtol=1e-4, atol=1e-4)


def test_cache_of_a_padded_prompt_holds_each_rows_own_state():
    model = linear_llama("hybrid", "hedgehog", window=3, sinks=2)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (9, 2)]
    ids, mask = left_padded(rows)
    cache = LinearizedCache()
    with torch.no_grad():
        model(ids, attention_mask=mask, cache=cache)
        for b, r in enumerate(rows):
            own = LinearizedCache()
            model(r[None], cache=own)
            for layer, s in own.states.items():
                assert cache.states[layer].seen[b] == len(r)
                for name in STATE:
                    torch.testing.assert_close(getattr(cache.states[layer], name)[b : b + 1], getattr(s, name))


def test_right_padding_without_a_state_is_causal_and_with_one_is_refused():
    model = linear_llama("hybrid", "hedgehog", window=3, sinks=2)
    r = torch.randint(1, 97, (6,), generator=torch.Generator().manual_seed(6))
    ids = torch.cat([r, torch.zeros(3, dtype=torch.long)])[None]
    mask = torch.tensor([[1] * 6 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[0, :6], model(r[None]).logits[0])
        with pytest.raises(ValueError, match="row 0 is padded on the right"):
            model(ids, attention_mask=mask, cache=LinearizedCache())


def test_padding_the_state_cannot_hold_is_a_one_line_error():
    model = linear_llama("hybrid", "hedgehog", window=3, sinks=2)
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), pytest.raises(ValueError, match="row 1 has padding inside it"):
        model(ids, attention_mask=torch.tensor([[1] * 6, [0, 1, 1, 0, 1, 1]]))
    with torch.no_grad(), pytest.raises(ValueError, match=r"attention_mask must be \[B, past \+ T\] \(B = 2"):
        model(ids, attention_mask=torch.tensor([[0] + [1] * 5] * 3))  # (three rows for two)
    cache = LinearizedCache()
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(ValueError, match="padding after the prompt"):
            model(ids[:, :1], attention_mask=torch.tensor([[1] * 7, [1] * 6 + [0]]), cache=cache)
    # a Llama converted in place reads transformers' 4-D mask, which it cannot take padding from
    plain = linearize(tiny_llama(), LinearizeConfig(mode="hybrid", window=3, sinks=2))
    plain.config._attn_implementation = "eager"  # (a 4-D mask always; sdpa may pass none)
    with torch.no_grad():
        plain(ids, attention_mask=torch.ones(2, 6, dtype=torch.long))  # no padding: fine
        with pytest.raises(ValueError, match="the attention mask hides keys"):
            plain(ids, attention_mask=torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]))


@pytest.mark.parametrize("fused", [True, False])
def test_our_own_loop_on_a_left_padded_batch_gives_each_row_its_own_tokens(fused):
    if fused and not llama.available():
        pytest.skip(f"the fused Llama step is not built here: {llama.unavailable_reason()}")
    model = linear_llama("hybrid", "hedgehog", window=4, sinks=2)
    config = DecodeConfig(fused=fused)
    g = torch.Generator().manual_seed(8)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in (3, 9, 6)]
    ids, mask = left_padded(rows)
    out = generate(model, ids, 12, temperature=0.0, config=config, attention_mask=mask)
    for b, r in enumerate(rows):
        alone = generate(model, r[None], 12, temperature=0.0, config=config)
        assert torch.equal(out[b, ids.shape[1] :], alone[0, len(r) :]), b
    with pytest.raises(ValueError, match="attention_mask must be input_ids' shape"):
        generate(model, ids, 2, attention_mask=mask[:, 1:])


@pytest.mark.parametrize("mode", ["hybrid", "linear", "window"])
def test_packed_documents_are_each_computed_alone(mode):
    """Documents packed in rows, position_ids restarting at each (transformers' convention, which
    also gives the teacher its block-diagonal mask): every document's logits and gradients are
    those it has alone."""
    model = linear_llama(mode, "hedgehog", window=4, sinks=2)
    g = torch.Generator().manual_seed(9)
    lengths = [[5, 1, 11, 7], [24]]  # (row 0: four documents, one of a single token)
    ids = torch.randint(1, 97, (2, 24), generator=g)
    pos = torch.cat([torch.cat([torch.arange(n) for n in row])[None] for row in lengths])
    out = model(ids, position_ids=pos).logits
    out.square().sum().backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    at, total = 0, 0.0
    for b, row in enumerate(lengths):
        at = 0
        for n in row:
            alone = model(ids[b : b + 1, at : at + n]).logits
            torch.testing.assert_close(out[b, at : at + n], alone[0], rtol=1e-4, atol=1e-5)
            total = total + alone.square().sum()
            at += n
    total.backward()
    torch.testing.assert_close(packed_grad, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad(), pytest.raises(ValueError, match="packed documents .* cannot fill one recurrent state"):
        model(ids, position_ids=pos, cache=LinearizedCache())


def test_the_teacher_reads_packed_documents_the_same_way():
    """(What packing relies on for attention transfer: transformers gives the softmax teacher a
    block-diagonal mask for the same position_ids, when no key/value cache is made.)"""
    teacher = tiny_llama()
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(10))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        out = teacher(ids, position_ids=pos, use_cache=False).logits
        torch.testing.assert_close(out[0, 5:], teacher(ids[:, 5:]).logits[0], rtol=1e-4, atol=1e-5)


def test_packed_windows_restart_positions_and_predict_nothing_across_a_boundary():
    from linear_transformers.linearize.transfer import packed

    w = torch.tensor([[5, 6, 2, 7, 2, 2, 8, 9]])
    pos, labels = packed(w, eos=2)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    assert labels.tolist() == [[-100, 6, 2, -100, 2, -100, -100, 9]]


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_packed_perplexity_is_each_documents_own(which):
    """perplexity(..., eos): every document of a window scored alone (its first token unscored), for
    the softmax teacher (transformers' packed mask) and a linearised student (documents_of)."""
    from linear_transformers.linearize.transfer import perplexity

    model = tiny_llama() if which == "teacher" else linear_llama("hybrid", "hedgehog", d=48, heads=6)
    g = torch.Generator().manual_seed(11)
    docs = [torch.cat([torch.randint(3, 97, (n,), generator=g), torch.tensor([2])]) for n in (6, 0, 9, 4)]
    window = torch.cat(docs)[None]
    total, count = 0.0, 0
    with torch.no_grad():
        for d in docs:
            if len(d) > 1:
                logits = model(d[None]).logits[0, :-1]
                total += torch.nn.functional.cross_entropy(logits, d[1:], reduction="sum").item()
                count += len(d) - 1
    assert perplexity(model, window, eos=2) == pytest.approx(math.exp(total / count), rel=1e-5)
    assert perplexity(model, window) != pytest.approx(math.exp(total / count), rel=1e-3)  # (unpacked differs)


def test_attention_transfer_and_lora_train_packed_and_resume_only_as_packed(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    import json
    import types

    from linear_transformers import commands
    from linear_transformers.linearize import transfer

    g = torch.Generator().manual_seed(12)
    data = {k: torch.randint(3, 97, (6, 24), generator=g) for k in ("train", "held_out", "second_domain")}
    for w in data.values():
        w[:, 7], w[:, 15] = 2, 2  # (three documents per window)
    (tmp_path / "run").mkdir()
    torch.save(data, tmp_path / "run" / "data.pt")
    monkeypatch.setattr(transfer, "load_teacher", lambda: (types.SimpleNamespace(eos_token_id=2), tiny_llama()))
    seen_documents = []  # (the hooks' students attend within each document)

    def spy(position_ids, B, T, real=transfer.documents_of):
        seen_documents.append(real(position_ids, B, T))
        return seen_documents[-1]

    monkeypatch.setattr(transfer, "documents_of", spy)
    argv = ["linearize", "--out", str(tmp_path / "run"), "--window", "4", "--sinks", "2", "--seq-len", "24"]
    argv += ["--eval-windows", "2", "--curve-windows", "1", "--eval-every", "2", "--threads", "1", "--no-save-model"]
    assert commands.dispatch("linear-transformers", [*argv, "--pack", "--steps", "2"]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["settings"]["pack"] and result["steps"] == 2 and result["hybrid_ppl"] > 1
    assert seen_documents and all(d.tolist() == [0, 8, 16, 24] for d in seen_documents)
    with pytest.raises(ValueError, match="other settings: --pack False"):
        commands.dispatch("linear-transformers", [*argv, "--steps", "3"])
    assert commands.dispatch("linear-transformers", [*argv, "--pack", "--steps", "3"]) == 0  # resumes

    from linear_transformers.linearize import save_linearized

    save_linearized(linear_llama("hybrid", "hedgehog", d=48, heads=6), tmp_path / "run" / "model")
    ft = ["finetune", "--student", str(tmp_path / "run" / "model"), "--out", str(tmp_path / "lora"), "--pack"]
    assert commands.dispatch("linear-transformers", [*ft, "--steps", "2", "--eval-windows", "2", "--threads", "1"]) == 0
    result = json.loads((tmp_path / "lora" / "result.json").read_text())
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")
    assert result["settings"]["pack"]
    assert result["hybrid_ppl"] == pytest.approx(transfer.perplexity(merged, data["held_out"][:2], eos=2), rel=1e-5)
