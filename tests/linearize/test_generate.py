"""linearize.generate: our own generation loop (the prompt through the model's forward, then the
fused C step and the C sampler per token) against transformers' generate() on the same model
(greedy: the same tokens), against the same loop run through the PyTorch layers and the PyTorch
sampler (sampling: the same tokens for the same seed), with and without the fused step."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from linear_transformers.decode import DecodeConfig, llama
from linear_transformers.linearize import RecurrentGenerator, generate

from helpers import linear_llama as student


@pytest.mark.parametrize("mode", ["hybrid", "linear", "window"])
@pytest.mark.parametrize("fused", [True, False])
def test_greedy_tokens_equal_transformers_generate(mode, fused):
    model = student(mode, "hedgehog")
    prompt = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(1))
    config = DecodeConfig(fused=fused)
    if fused and not llama.available():
        pytest.skip(f"the fused Llama step is not built here: {llama.unavailable_reason()}")
    ours = generate(model, prompt, 20, temperature=0.0, config=config)
    model.decode_config = config
    with torch.no_grad():
        theirs = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(ours, theirs)


def reference_loop(model, prompt, n, temperature, top_k, top_p, seed):
    """The same loop in PyTorch: the model's own layers per token, the reference sampler."""
    from linear_transformers.linearize import LinearizedCache

    g = torch.Generator().manual_seed(seed)
    cache = LinearizedCache()
    model.decode_config = DecodeConfig(fused=False)
    out = [prompt]
    with torch.no_grad():
        logits = model(prompt, cache=cache).logits[:, -1]
        for _ in range(n):
            u = torch.rand(prompt.shape[0], generator=g)
            token = llama.sample_tokens_reference(logits, temperature, top_k, top_p, u)
            out.append(token[:, None])
            logits = model(token[:, None], cache=cache).logits[:, -1]
    return torch.cat(out, 1)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.8, 10, 1.0), (1.2, 0, 0.9)])
def test_sampling_equals_the_pytorch_loop_for_a_seed(temperature, top_k, top_p):
    if not llama.available():
        pytest.skip(f"the fused Llama step is not built here: {llama.unavailable_reason()}")
    model = student("hybrid", "hedgehog")
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    ours = generate(model, prompt, 24, generator=torch.Generator().manual_seed(7), **kwargs)
    again = generate(model, prompt, 24, generator=torch.Generator().manual_seed(7), **kwargs)
    want = reference_loop(model, prompt, 24, temperature, top_k, top_p, seed=7)
    assert torch.equal(ours, again)
    assert torch.equal(ours, want)
    assert ours.shape == (2, 5 + 24)


def test_eos_ends_a_row_and_generation_stops_when_all_have():
    model = student("hybrid", "hedgehog")
    prompt = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, 12, temperature=0.0)
    eos = int(free[0, 4 + 2])  # the third token row 0 generates
    out = generate(model, prompt, 12, temperature=0.0, eos_token_id=eos)
    first = {r: next((i for i in range(4, out.shape[1]) if out[r, i] == eos), None) for r in range(2)}
    for r, at in first.items():
        if at is not None:
            assert (out[r, at:] == eos).all() and torch.equal(out[r, :at], free[r, :at])
    assert out.shape[1] == 12 + 4 or all(at is not None for at in first.values())


def test_generator_state_and_refusals():
    model = student("hybrid", "hedgehog")
    prompt = torch.randint(0, 97, (1, 3))
    gen = RecurrentGenerator(model, prompt, temperature=0.0)
    first = gen.next_tokens()
    assert gen.cache.seen == 4 and gen.logits.shape == (1, 97)
    assert torch.equal(first, generate(model, prompt, 1, temperature=0.0)[:, -1])
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        generate(model, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"token ids in \[0, 97\), got torch.int64 in \[0, 97\]"):
        generate(model, torch.tensor([[0, 97]]))
    with pytest.raises(ValueError, match="integer token ids"):
        generate(model, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        generate(model, prompt, -1)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, prompt, 3, top_p=2.0)
    assert torch.equal(generate(model, prompt, 0), prompt)
