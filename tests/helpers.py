"""Shared test helpers: random feature-mapped inputs and error measures."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_transformers.ops import LinearState


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def qkv(B, T, H, Dk, Dv, dtype=torch.float64, requires_grad=False, S=None):
    """Feature-mapped queries/keys (elu + 1 of normal draws) and normal values, [B, T, H, D] layout."""
    S = T if S is None else S
    q = F.elu(torch.randn(B, T, H, Dk, dtype=torch.float64)) + 1
    k = F.elu(torch.randn(B, S, H, Dk, dtype=torch.float64)) + 1
    v = torch.randn(B, S, H, Dv, dtype=torch.float64)
    return [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v)]


def random_state(B, H, Dk, Dv, dtype=torch.float64, requires_grad=False, n_tokens=5):
    """A plausible non-empty state: sums of n_tokens positive keys times values."""
    k = F.elu(torch.randn(B, n_tokens, H, Dk, dtype=torch.float64)) + 1
    v = torch.randn(B, n_tokens, H, Dv, dtype=torch.float64)
    S = torch.einsum("bthd,bthe->bhde", k, v).to(dtype).requires_grad_(requires_grad)
    z = k.sum(1).to(dtype).requires_grad_(requires_grad)
    return LinearState(S, z, n_tokens)


def shape_id(**dims) -> str:
    return "-".join(f"{k}{v}" for k, v in dims.items())


def cli_error(capsys, argv: list[str], match: str) -> str:
    """Runs the command line expecting a user error: exit status 2 and one line on stderr,
    `linear-transformers <command>: error: ...` matching `match`; returns that line."""
    import re

    from linear_transformers.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"linear-transformers {argv[0]}: error: "), err
    assert re.search(match, err[0]), (match, err[0])
    return err[0]


def small_model(n_classes=3, vocab=16, max_len=48, n_heads=4, **kw):
    """A 2-block, 32-wide CausalTransformer in eval mode (tests of the model and of generation)."""
    from linear_transformers.model import CausalTransformer, ModelConfig

    cfg = ModelConfig(
        vocab_size=vocab,
        n_classes=n_classes,
        max_len=max_len,
        d_model=32,
        n_layers=2,
        n_heads=n_heads,
        d_ff=64,
        chunk_size=16,
        **kw,
    )
    return CausalTransformer(cfg).eval()


def tiny_llama(seed=0):
    """A tiny random Llama (softmax attention, grouped key/value heads, tied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def linear_llama(
    mode="hybrid", feature_map="hedgehog", window=5, sinks=2, heads=4, kv_heads=2, bias=False, d=64, seed=0
):
    """A small linearised Llama (linear_llama type), every weight perturbed so that no feature map is
    at its identity start."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from linear_transformers.linearize import LinearizeConfig, from_linearized, linearize

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=d,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        attention_bias=bias,
    )
    model = from_linearized(linearize(LlamaForCausalLM(cfg).eval(), LinearizeConfig(mode, feature_map, window, sinks)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def llama_with_weights_of(model, weights: torch.dtype, dot: torch.dtype = torch.float32):
    """The model with every projection (and the head) holding the values the fused step reads in
    that format: bfloat16-rounded, or int8-dequantized (per-row scales), and its Hedgehog maps in
    the same family (bfloat16, or int8 with per-column scales); with dot=torch.int8 their
    inputs are also rounded as int8 dot products round them (decode.llama.quantize_input)."""
    import copy

    from linear_transformers.decode import llama

    ref = copy.deepcopy(model)
    with torch.no_grad():
        names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        linears = [m for name, m in ref.named_modules() if name.rsplit(".", 1)[-1] in names]
        head = ref.lm_head
        if head.weight is ref.model.embed_tokens.weight:  # tied: the head's copy is rounded, the embedding is not
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        for m in [*linears, head]:
            w = m.weight
            if weights == torch.bfloat16:
                w.copy_(w.to(torch.bfloat16).float())
            else:
                w.copy_(llama.dequantize_int8(llama.quantize_int8(w), *w.shape))
            if dot == torch.int8:
                m.register_forward_pre_hook(round_input_to_int8)
        for name, m in ref.named_modules():  # the Hedgehog maps, in the same family (llama.convert)
            if name.rsplit(".", 1)[-1] in ("feature_map_q", "feature_map_k") and hasattr(m, "weight"):
                w = m.weight
                if weights == torch.bfloat16:
                    w.copy_(w.to(torch.bfloat16).float())
                else:
                    w.copy_(llama.dequantize_int8(llama.quantize_int8(w), *w.shape))
    return ref


def round_input_to_int8(module, args):
    from linear_transformers.decode import llama

    q, scale = llama.quantize_input(args[0])
    return ((q.unflatten(-1, (-1, llama.I8_BLOCK)) * scale[..., None]).flatten(-2),)


def random_sampling_cases(n: int, seed: int):
    """Sampler inputs: logits [B, V] (some with ties, some with -inf entries), temperature, top_k,
    top_p and u [B], cycling through the settings."""
    g = torch.Generator().manual_seed(seed)
    for trial in range(n):
        B = int(torch.randint(1, 4, (1,), generator=g))
        V = int(torch.randint(1, 3000, (1,), generator=g))
        logits = torch.randn(B, V, generator=g) * float(torch.rand(1, generator=g) * 8)
        if trial % 3 == 0:
            logits = logits.round()  # ties, at the top-k and top-p cuts too
        if trial % 5 == 0:
            logits[:, ::7] = -float("inf")
            logits[:, 0] = 1.0
        temperature = (0.0, 0.3, 1.0, 2.5)[trial % 4]
        top_k = (0, 1, 5, 50, 10**6)[trial % 5]
        top_p = (1.0, 0.9, 0.5, 0.01, 0.999)[(trial // 5) % 5]
        yield logits, temperature, top_k, top_p, torch.rand(B, generator=g)


def attention_with_grads(backend, dtype, acc, q, k, v, state, dy, dS, dz, chunk, n_tokens=0):
    """[out, S, z, dq, dk, dv, dS0, dz0] of causal_linear_attention on `backend` with q, k, v in
    `dtype` and the state in `acc`, the gradients those of <out, dy> + <S, dS> + <z, dz>."""
    from linear_transformers import ops
    from linear_transformers.ops import LinearState

    inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    S0, z0 = (x.detach().to(acc).requires_grad_() for x in (state.S, state.z))
    y, final = ops.causal_linear_attention(
        *inputs, initial_state=LinearState(S0, z0, n_tokens), return_state=True, backend=backend, chunk_size=chunk
    )
    grads = torch.autograd.grad([y, final.S, final.z], [*inputs, S0, z0], [dy.to(dtype), dS.to(acc), dz.to(acc)])
    return [y, final.S, final.z, *grads]


def projection_reference(x, w, weights, dot, bias=None):
    """What a projection in each (weights, dot) format of the fused Llama step computes, in float64."""
    from linear_transformers.decode import llama

    if dot == torch.int8:
        y = llama.int8_dot_reference(llama.quantize_int8(w), *w.shape, x)
    else:
        if weights == torch.bfloat16:
            w = w.to(torch.bfloat16).float()
        elif weights == torch.int8:
            w = llama.dequantize_int8(llama.quantize_int8(w), *w.shape)
        if dot == torch.bfloat16:
            x = x.to(torch.bfloat16).float()
        y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()
