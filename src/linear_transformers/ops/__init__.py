"""Functional attention ops: no modules, no parameters.

Dimension legend (one layout everywhere, no head-first switch):

    B   batch
    T   query positions (time)
    S   key/value positions (S == T for causal attention)
    H   heads
    Dk  query/key feature dimension (after the feature map for linear attention)
    Dv  value dimension

    q [B, T, H, Dk]   k [B, S, H, Dk]   v [B, S, H, Dv]   ->   out [B, T, H, Dv]
    one-token step:  q, k [B, H, Dk], v [B, H, Dv]  ->  out [B, H, Dv]
    LinearState:     S [B, H, Dk, Dv], z [B, H, Dk]  (float32; float64 for float64 inputs)
    key_padding_mask [B, S] bool, True where the key is padding (as in torch.nn.MultiheadAttention)

Linear attention takes queries and keys that are already feature-mapped (phi(x) >= 0, see
`linear_transformers.feature_maps`). Inputs may be float16, bfloat16, float32 or float64; outputs
come back in the input dtype, while states and normalisers are kept in float32 (float64 for
float64 inputs).

Implementations of causal linear attention live in one table keyed by backend name (BACKENDS,
backends.py: each a Backend record of its forward and backward, passing typed records):

    "naive"    naive.py    quadratic masked form, the reference
    "chunked"  chunked.py  chunkwise-parallel PyTorch with a memory-efficient backward (any device)
    "cpu"      cpu/        the same algorithm as a compiled C kernel (CPU tensors; built on first use)
    "triton"   triton/     Triton GPU kernels, normaliser fused (CUDA tensors; float16/bfloat16/float32)

"auto" takes "cpu" for CPU tensors when its kernel builds and measured faster than "chunked" on this
machine (cpu/__init__.py: under a second on first use, the verdict kept beside the compiled
library), and "triton" for CUDA tensors when Triton imports (float64 always goes to "chunked");
otherwise "chunked", with one warning naming the reason.

The baselines: `softmax_attention` (SDPA, with a growable KV cache for generation) and
`lsh_attention` (Reformer's LSH attention, lsh.py; queries and keys shared, qk [B, T, H, D]).
"""

from __future__ import annotations

import warnings
from functools import partial

import torch

from . import chunked, cpu, library, naive, packed, parallel, softmax, triton  # noqa: F401 (ops.chunked, ops.triton...)
from .backends import BACKENDS, Backend
from .lsh import lsh_attention
from .state import KVCache, LinearState
from .step import step as _linear_step
from .validation import (
    accumulation_dtype,
    check_chunk_size,
    check_eps,
    check_key_padding_mask,
    check_qkv,
    check_same_dtype_device,
    check_tensor,
)

__all__ = [
    "BACKENDS",
    "KVCache",
    "LinearState",
    "causal_linear_attention",
    "context_parallel_causal_linear_attention",
    "linear_attention",
    "linear_attention_step",
    "lsh_attention",
    "softmax_attention",
    "softmax_attention_step",
    "softmax_attention_with_cache",
]


def _run(backend: Backend, q, k, v, initial_state: LinearState | None, eps: float, chunk_size: int):
    """Causal linear attention by `backend` -> (out, final LinearState). A kernel backend runs under
    torch.compile through the registered operator pair in library.py (one opaque node), in eager
    mode through its forward and backward called directly (library.EagerCausalLinearAttention).
    Autocast is off inside: every backend takes its inputs' dtype and accumulates in float32 itself
    (under a bfloat16 autocast, "chunked" would otherwise get bfloat16 products into its float32
    accumulators)."""
    with torch.autocast(q.device.type, enabled=False):
        return _run_backend(backend, q, k, v, initial_state, eps, chunk_size)


def _run_backend(backend: Backend, q, k, v, initial_state: LinearState | None, eps: float, chunk_size: int):
    if initial_state is None:
        B, _, H, Dk = q.shape
        initial_state = LinearState.zeros(B, H, Dk, v.shape[-1], dtype=q.dtype, device=q.device)
    n_tokens = initial_state.n_tokens + q.shape[1]
    if q.numel() == 0 or v.numel() == 0:  # no tokens, heads or features: nothing for a kernel to do
        return v.new_zeros(v.shape), LinearState(initial_state.S, initial_state.z, n_tokens)
    S0, z0 = initial_state.S, initial_state.z
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, S0, z0))
    if backend.backward is None:  # differentiated by PyTorch itself
        y, S, z, *_ = backend.forward(q, k, v, S0, z0, eps, chunk_size, False)
    elif torch.compiler.is_compiling():  # one opaque node for the compiler
        y, S, z, *_ = torch.ops.linear_transformers.causal_linear_attention_fwd(
            q, k, v, S0, z0, eps, chunk_size, backend.name, save
        )
    elif save:  # the same computation without the operator dispatch
        y, S, z = library.EagerCausalLinearAttention.apply(q, k, v, S0, z0, eps, chunk_size, backend.name)
    else:
        y, S, z, *_ = backend.forward(q, k, v, S0, z0, eps, chunk_size, False)
    return y, LinearState(S, z, n_tokens)


_warned_fallback: set[str] = set()


def _fallback(fn: str, name: str, reason: str) -> Backend:
    if name not in _warned_fallback:
        _warned_fallback.add(name)
        warnings.warn(
            f"{fn}: backend {name!r} is unavailable ({reason}); using 'chunked'", RuntimeWarning, stacklevel=4
        )
    return BACKENDS["chunked"]


def _causal_backend(fn: str, backend: str, q: torch.Tensor, v: torch.Tensor) -> Backend:
    """The backend named (or "auto"'s choice) for inputs q, v, after its own checks: one loop over the
    table, each record saying what it supports (backends.Backend)."""
    if backend == "auto":
        for b in BACKENDS.values():
            if b.auto_candidate is None or not b.auto_candidate(q, v):
                continue
            reason = b.why_unavailable(q.device)
            if reason is not None:
                return _fallback(fn, b.name, reason)
            return b if b.auto_faster() else BACKENDS["chunked"]
        return BACKENDS["chunked"]
    if backend not in BACKENDS:
        choices = ", ".join(repr(b) for b in ["auto", *BACKENDS])
        raise ValueError(f"{fn}: unknown backend {backend!r}; choose one of {choices}")
    b = BACKENDS[backend]
    if b.device_type is not None and q.device.type != b.device_type:
        raise ValueError(f"{fn}: backend {b.name!r} runs on {b.device_type.upper()} tensors, got tensors on {q.device}")
    reason = b.why_unavailable(q.device)
    if reason is not None:
        raise RuntimeError(f"{fn}: backend {b.name!r} is unavailable: {reason}")
    if b.check_shapes is not None:
        b.check_shapes(fn, q, v)
    return b


def _check_state(fn: str, state: object, q: torch.Tensor, v: torch.Tensor, batch: int | None = None) -> LinearState:
    """`state` fits inputs q, v; `batch` (default q's B) is its number of rows: the documents when packed."""
    if not isinstance(state, LinearState):
        raise TypeError(f"{fn}: the state must be a LinearState, got {type(state).__name__}")
    state.check(f"{fn}: state")  # (its tensors may have been replaced since it was made)
    B, H, Dk = q.shape[0] if batch is None else batch, q.shape[-2], q.shape[-1]
    expected = [B, H, Dk, v.shape[-1]]
    if list(state.S.shape) != expected:
        rows = "B" if batch is None else "n_documents"
        raise ValueError(f"{fn}: state.S must have shape [{rows}, H, Dk, Dv] = {expected}, got {list(state.S.shape)}")
    if state.S.device != q.device:
        raise ValueError(f"{fn}: the state is on {state.S.device} but the inputs are on {q.device}")
    acc = accumulation_dtype(q.dtype)
    if state.S.dtype != acc:
        raise TypeError(
            f"{fn}: for {q.dtype} inputs the state must be {acc}, got {state.S.dtype} "
            f"(make it with LinearState.zeros(..., dtype={q.dtype}))"
        )
    return state


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    eps: float = 1e-6,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Non-causal linear attention (paper Eq. 5-6), O(T + S) time and memory.

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)

    Args:
        q: [B, T, H, Dk] feature-mapped queries.
        k: [B, S, H, Dk] feature-mapped keys (S may differ from T).
        v: [B, S, H, Dv] values.
        key_padding_mask: optional bool [B, S], True where the key is padding; padded keys enter
            neither the numerator nor the normaliser.
        eps: added to the normaliser (float >= 0).
        cu_seqlens: packed documents (see `causal_linear_attention`): B = 1, S = T, and every
            query attends to the keys of its own document only.

    Returns:
        [B, T, H, Dv] in the input dtype. The sums and the normaliser are float32 (float64 for float64).
    """
    fn = "linear_attention"
    check_qkv(fn, q, k, v, same_length=cu_seqlens is not None)
    eps = check_eps(fn, eps)
    with torch.autocast(q.device.type, enabled=False):  # (its sums are float32 under autocast too)
        return _linear_attention(fn, q, k, v, key_padding_mask, eps, cu_seqlens)


def _linear_attention(fn: str, q, k, v, key_padding_mask, eps: float, cu_seqlens):
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError(f"{fn}: pass cu_seqlens or key_padding_mask, not both (packed documents have no padding)")
        return packed.non_causal(q, k, v, packed.check_cu_seqlens(fn, cu_seqlens, q.shape[1], q.shape[0]), eps)
    acc = accumulation_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    if key_padding_mask is not None:
        check_key_padding_mask(fn, key_padding_mask, k.shape[0], k.shape[1], k.device)
        kf = kf.masked_fill(key_padding_mask[:, :, None, None], 0.0)
    qf = q.to(acc)
    kv = torch.einsum("bshd,bshe->bhde", kf, vf)  # [B, H, Dk, Dv]
    ksum = kf.sum(1)  # [B, H, Dk]
    num = torch.einsum("bthd,bhde->bthe", qf, kv)
    den = torch.einsum("bthd,bhd->bth", qf, ksum) + eps
    return (num / den.unsqueeze(-1)).to(q.dtype)


def causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, LinearState]:
    """Causal linear attention with its normaliser (paper Eq. 9-12), trained in parallel.

    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)
    S_i = S_0 + sum_{j<=i} phi(k_j) v_j^T,   z_i = z_0 + sum_{j<=i} phi(k_j)

    Args:
        q: [B, T, H, Dk] feature-mapped queries.
        k: [B, T, H, Dk] feature-mapped keys.
        v: [B, T, H, Dv] values.
        initial_state: state to continue from (e.g. returned by an earlier call); default empty.
            Gradients flow into its S and z when they require grad.
        return_state: also return the final LinearState (prefill for `linear_attention_step`).
        eps: added to the normaliser (float >= 0; the paper uses 1e-6).
        chunk_size: tokens per chunk of the "chunked" and "cpu" backends (int >= 1; any T works). It
            changes speed, not results. The "triton" backend's chunk is 64 (its tiles are built for
            it): asked for by name with another chunk_size it is an error; "auto" on CUDA takes it
            with its own chunk.
        backend: "auto" ("cpu" on CPU where it is available and measured faster than "chunked" here,
            "triton" on CUDA when available; else "chunked"), "cpu" (compiled C kernel), "triton" (GPU
            kernels), "chunked" (PyTorch, any device) or "naive" (the reference).
        key_padding_mask: optional bool [B, T], True where the key is padding; padded keys enter
            neither the numerator nor the normaliser (nor the returned state).
        cu_seqlens: packed variable-length documents, as in flash-attn and fla: q, k, v hold the
            documents one after another in one row (B = 1), document d being tokens
            cu_seqlens[d]:cu_seqlens[d + 1] (int32/int64 [n + 1], 0 first, T last; empty documents
            allowed). Each document attends only within itself, as if run alone; `initial_state` and
            the returned state then have one row per document (n_tokens counts the longest). Every
            backend packs (ops/packed.py), forward and backward.

    Returns:
        out [B, T, H, Dv] in the input dtype, and the final state if `return_state`.
    """
    fn = "causal_linear_attention"
    check_qkv(fn, q, k, v, same_length=True)
    eps = check_eps(fn, eps)
    # a chunk longer than the sequence computes the same as one of its length (and allocates no more)
    check_chunk_size(fn, chunk_size)
    fixed = BACKENDS[backend].chunk if backend in BACKENDS else None
    if fixed is not None and chunk_size != fixed:
        raise ValueError(
            f"{fn}: backend {backend!r} computes in chunks of {fixed}, not chunk_size={chunk_size}; "
            f"pass chunk_size={fixed} or another backend"
        )
    chunk_size = min(chunk_size, max(q.shape[1], 1))
    impl = _causal_backend(fn, backend, q, v)
    if cu_seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError(f"{fn}: pass cu_seqlens or key_padding_mask, not both (packed documents have no padding)")
        lengths = packed.check_cu_seqlens(fn, cu_seqlens, q.shape[1], q.shape[0])
        if initial_state is not None:
            _check_state(fn, initial_state, q, v, batch=len(lengths))
        out, state = packed.causal(q, k, v, lengths, initial_state, eps, chunk_size, partial(_run, impl))
        return (out, state) if return_state else out
    if initial_state is not None:
        _check_state(fn, initial_state, q, v)
    if key_padding_mask is not None:
        check_key_padding_mask(fn, key_padding_mask, k.shape[0], k.shape[1], k.device)
        k = k.masked_fill(key_padding_mask[:, :, None, None], 0.0)
    out, state = _run(impl, q, k, v, initial_state, eps, chunk_size)
    return (out, state) if return_state else out


def context_parallel_causal_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group=None,
    *,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    eps: float = 1e-6,
    chunk_size: int = 64,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, LinearState]:
    """Causal linear attention of sequences split along time over the ranks of a torch.distributed
    process group (context parallelism, ops/parallel.py); differentiable.

    Rank r of `group` passes tokens [t_r, t_{r+1}) of every sequence of the batch (ranks in order,
    segments of any lengths, `parallel.segment` splits evenly) and gets those tokens' outputs: the
    same as `causal_linear_attention` on the whole sequence. The ranks exchange one state per
    sequence and head, forward and backward (one all_gather each way), whatever the length.

    Args:
        q, k, v: this rank's segment, [B, T_r, H, Dk] / [B, T_r, H, Dv]; B, H, Dk, Dv and dtype the
            same on every rank.
        group: the process group whose ranks share the sequences (None: the default group). With
            data parallelism too, make one group per sequence (torch.distributed.new_group).
        initial_state: the state before the whole sequence; pass it on the group's first rank only.
        return_state: also return the state after this rank's segment (on the last rank: after the
            whole sequence, as `causal_linear_attention(..., return_state=True)`).
        eps, chunk_size, backend: as for `causal_linear_attention`, applied to each rank's segment.
    """
    import torch.distributed as dist

    fn = "context_parallel_causal_linear_attention"
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            f"{fn}: torch.distributed is not initialised (run under torchrun, or call "
            "torch.distributed.init_process_group first)"
        )
    check_qkv(fn, q, k, v, same_length=True)
    eps = check_eps(fn, eps)
    check_chunk_size(fn, chunk_size)
    group = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(group)
    if initial_state is not None:
        if rank != 0:
            raise ValueError(
                f"{fn}: initial_state is the state before the whole sequence; pass it on the group's "
                f"first rank only, not on rank {rank}"
            )
        _check_state(fn, initial_state, q, v)
    impl = _causal_backend(fn, backend, q, v)
    out, state = parallel.causal(
        q, k, v, group, initial_state, eps, max(1, min(chunk_size, q.shape[1])), partial(_run, impl)
    )
    if not return_state:
        return out
    # the tokens seen: those of the earlier ranks (the first counting its initial state's) and ours
    state.n_tokens = parallel.tokens_before(state.n_tokens, group, q.device) + state.n_tokens
    return out, state


def linear_attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LinearState | None = None, *, eps: float = 1e-6
) -> tuple[torch.Tensor, LinearState]:
    """One token of causal linear attention as an RNN (paper Eq. 18-20), O(1) in the tokens seen.

    Args:
        q, k: [B, H, Dk] feature-mapped query and key of the new token.
        v: [B, H, Dv] its value.
        state: the state after the previous tokens (None: empty). When no gradient is needed it is
            updated in place and returned (clone it first to branch); otherwise a new state is built.
        eps: added to the normaliser.

    Returns:
        (out [B, H, Dv] in the input dtype, the state including this token).
    """
    fn = "linear_attention_step"
    check_tensor(fn, "q", q, 3, "[B, H, Dk]")
    check_tensor(fn, "k", k, 3, "[B, H, Dk]")
    check_tensor(fn, "v", v, 3, "[B, H, Dv]")
    check_same_dtype_device(fn, q=q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"{fn}: k must have the shape of q [B, H, Dk] = {list(q.shape)}, got {list(k.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"{fn}: v must have shape [B, H, Dv] = [{q.shape[0]}, {q.shape[1]}, Dv], got {list(v.shape)}")
    eps = check_eps(fn, eps)
    if state is None:
        state = LinearState.zeros(q.shape[0], q.shape[1], q.shape[2], v.shape[2], dtype=q.dtype, device=q.device)
    else:
        _check_state(fn, state, q, v)
    return _linear_step(q, k, v, state, eps)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention softmax(q k^T * scale) v on torch's scaled_dot_product_attention. O(T S).

    Args:
        q: [B, T, H, Dk] (raw, not feature-mapped), k: [B, S, H, Dk], v: [B, S, H, Dv].
        causal: mask future keys; with S != T the queries are the last T positions.
        key_padding_mask: optional bool [B, S], True where the key is padding.
        scale: defaults to 1 / sqrt(Dk).
        dropout_p: dropout on the attention weights (pass 0 at evaluation).

    Returns:
        [B, T, H, Dv]; a query that can see no key (all padded) gets zeros.
    """
    fn = "softmax_attention"
    check_qkv(fn, q, k, v, same_length=False)
    if key_padding_mask is not None:
        check_key_padding_mask(fn, key_padding_mask, k.shape[0], k.shape[1], k.device)
    out = softmax.attend(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        causal=causal,
        key_padding_mask=key_padding_mask,
        scale=scale,
        dropout_p=dropout_p,
    )
    return out.transpose(1, 2)


def softmax_attention_with_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: KVCache | None = None,
    *,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, KVCache]:
    """Causal softmax attention of a block of new tokens against a key/value cache.

    Appends k [B, T, H, Dk] and v [B, T, H, Dv] to `cache` (a new one if None), then lets each
    query in q [B, T, H, Dk] attend to all cached tokens up to and including its own position.
    key_padding_mask: optional bool [B, T], True where a new token is padding: the cache remembers
    it, and no query, now or later, attends to it. Returns (out [B, T, H, Dv], cache). Prefill is
    this with an empty cache.
    """
    fn = "softmax_attention_with_cache"
    check_qkv(fn, q, k, v, same_length=True)
    B, T, H, Dk = q.shape
    if key_padding_mask is not None:
        check_key_padding_mask(fn, key_padding_mask, B, T, k.device)
    if cache is None:
        cache = KVCache.empty(B, H, Dk, v.shape[3], capacity=max(T, 256), dtype=q.dtype, device=q.device)
    elif not isinstance(cache, KVCache):
        raise TypeError(f"{fn}: cache must be a KVCache, got {type(cache).__name__}")
    elif cache.dtype != q.dtype or cache.device != q.device:
        raise TypeError(
            f"{fn}: the cache holds {cache.dtype} on {cache.device} but the inputs are {q.dtype} on {q.device}"
        )
    return softmax.attend_with_cache(q, k, v, cache, scale=scale, key_padding_mask=key_padding_mask), cache


def softmax_attention_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None = None, *, scale: float | None = None
) -> tuple[torch.Tensor, KVCache]:
    """One token of causal softmax attention with a growable, preallocated KV cache.

    q, k [B, H, Dk], v [B, H, Dv] -> (out [B, H, Dv], cache including this token). O(tokens seen).
    """
    fn = "softmax_attention_step"
    check_tensor(fn, "q", q, 3, "[B, H, Dk]")
    check_tensor(fn, "k", k, 3, "[B, H, Dk]")
    check_tensor(fn, "v", v, 3, "[B, H, Dv]")
    out, cache = softmax_attention_with_cache(q[:, None], k[:, None], v[:, None], cache, scale=scale)
    return out[:, 0], cache
