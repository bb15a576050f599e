"""Packed variable-length batches: documents concatenated along time (B = 1), described by
`cu_seqlens` [n + 1] (document d is tokens cu_seqlens[d]:cu_seqlens[d + 1], as in flash-attn and fla),
each attending only within itself and starting from its own initial state.

The documents are cut into *pieces* of P tokens (the last piece of each document padded with zero
keys), and the pieces become the batch of an ordinary call of any backend. A piece needs the state of
its document's earlier pieces; that is a sum, so it is computed first, with no attention at all:

    U_m     = [sum_{j in piece m} phi(k_j) v_j^T | sum_j phi(k_j)]      one GEMM per piece   [Dk, Dv + 1]
    U^in_m  = U_0[doc] + sum_{m' < m, same doc} U_m'                      a segmented scan over pieces
    out     = backend(pieces, initial_state = U^in)                       any backend, batch = pieces

This is context parallelism (parallel.py) done inside one process: the pieces play the ranks. No
kernel needs to know about documents, so every backend (naive, chunked, cpu, triton) packs, forward
and backward, and the gradients reach the local sums through ordinary autograd. The scan adds states
of one document only (Hillis-Steele in log2(pieces per document) steps): no long-sequence total is
ever subtracted, so a document's result does not depend on what was packed before it.

P is chosen per call to minimise the work: the padding of each document's last piece against the
states of more, shorter pieces (`piece_length`). One document per piece is the padded batch, so the
choice is never worse than padding by this count.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from .state import LinearState
from .validation import accumulation_dtype

__all__ = ["Layout", "causal", "check_cu_seqlens", "layout", "non_causal", "piece_length"]

MIN_PIECE = 16  # shorter pieces make every kernel call a sliver


def check_cu_seqlens(fn: str, cu_seqlens: object, total: int, batch: int) -> list[int]:
    """cu_seqlens: 1-D integer tensor [n + 1], 0 first, `total` last, non-decreasing; the packed
    inputs must have B == 1. Returns the n document lengths."""
    if not isinstance(cu_seqlens, torch.Tensor):
        got = type(cu_seqlens).__name__
        raise TypeError(f"{fn}: cu_seqlens must be an integer tensor [n_documents + 1], got {got}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"{fn}: cu_seqlens must be a 1-D int32/int64 tensor [n_documents + 1] (at least 2 "
            f"entries), got {cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(
            f"{fn}: with cu_seqlens the documents are packed along time in one row, so B must be 1, got B={batch}"
        )
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"{fn}: cu_seqlens must start at 0 and end at the packed length T={total}, got {bounds[0]} ... {bounds[-1]}"
        )
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    bad = next((d for d, n in enumerate(lengths) if n < 0), None)
    if bad is not None:
        raise ValueError(
            f"{fn}: cu_seqlens must be non-decreasing; it falls from {bounds[bad]} to "
            f"{bounds[bad + 1]} at document {bad}"
        )
    return lengths


def piece_length(lengths: list[int], Dk: int, Dv: int) -> int:
    """The piece length P that minimises (padded tokens) x (2 Dk + Dv) + (pieces) x Dk (Dv + 1) x (3 + scan
    depth): what the inputs cost to gather and attend against what the pieces' states cost to sum,
    scan and hand over. Candidates: powers of two from MIN_PIECE, and the longest document itself."""
    longest = max(lengths, default=0)
    if longest <= MIN_PIECE:
        return max(longest, 1)
    candidates = {longest} | {1 << i for i in range(MIN_PIECE.bit_length() - 1, math.ceil(math.log2(longest)) + 1)}

    def cost(P: int) -> float:
        pieces = [-(-n // P) for n in lengths]
        depth = max(pieces)
        return sum(pieces) * (P * (2 * Dk + Dv) + Dk * (Dv + 1) * (3 + math.log2(max(depth, 1))))

    return min(sorted(candidates), key=cost)


@dataclass(frozen=True)
class Layout:
    """Where each token goes among the pieces."""

    P: int  # tokens per piece
    index: torch.Tensor  # [M * P] the token of every slot (0 in padding slots)
    valid: torch.Tensor  # [M * P] bool: the slot holds a token
    doc: torch.Tensor  # [M] the document of every piece
    last: torch.Tensor  # [n] the index of every document's last piece (-1: an empty document)
    depth: int  # the most pieces of one document

    @property
    def pieces(self) -> int:
        return self.doc.shape[0]


def layout(lengths: list[int], P: int, device: torch.device) -> Layout:
    """Documents of `lengths` cut into pieces of P tokens, in order."""
    counts = torch.tensor([-(-n // P) for n in lengths], dtype=torch.long)
    lens = torch.tensor(lengths, dtype=torch.long)
    starts = torch.cumsum(lens, 0) - lens
    doc = torch.repeat_interleave(torch.arange(len(lengths)), counts)  # [M]
    first_piece = torch.cumsum(counts, 0) - counts
    within = torch.arange(doc.shape[0]) - first_piece[doc]  # piece number inside its document
    offset = within[:, None] * P + torch.arange(P)[None]  # [M, P] token offset inside the document
    valid = offset < lens[doc][:, None]
    index = torch.where(valid, starts[doc][:, None] + offset, 0)
    last = torch.where(counts > 0, first_piece + counts - 1, -1)
    return Layout(
        P,
        index.reshape(-1).to(device),
        valid.reshape(-1).to(device),
        doc.to(device),
        last.to(device),
        int(counts.max()) if len(lengths) else 0,
    )


def gather(x: torch.Tensor, lay: Layout, zero_padding: bool) -> torch.Tensor:
    """x [1, T, H, D] -> pieces [M, P, H, D] (padding slots zero where `zero_padding`)."""
    out = x[0].index_select(0, lay.index)
    if zero_padding:
        out = out.masked_fill(~lay.valid[:, None, None], 0)
    return out.view(lay.pieces, lay.P, *x.shape[2:])


def scatter(pieces: torch.Tensor, lay: Layout) -> torch.Tensor:
    """pieces [M, P, H, D] -> [1, T, H, D], the padding dropped."""
    return pieces.reshape(-1, *pieces.shape[2:])[lay.valid][None]


class LocalSums(torch.autograd.Function):
    """k [M, P, H, Dk], v [M, P, H, Dv] -> U = [sum_p k v^T | sum_p k] [M, H, Dk, Dv + 1] in the
    accumulation dtype, with the backward written out: dk = v dS^T + dz, dv = k dS (two GEMMs over
    the tokens; autograd's own would expand dz into a [M, P, H, Dk] tensor and add it separately)."""

    @staticmethod
    def forward(ctx, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(k.dtype)
        kf, vf = k.to(acc), v.to(acc)
        ctx.save_for_backward(k, v)
        return torch.cat([torch.einsum("mphd,mphe->mhde", kf, vf), kf.sum(1).unsqueeze(-1)], dim=-1)

    @staticmethod
    def backward(ctx, dU: torch.Tensor):
        k, v = ctx.saved_tensors
        dS, dz = dU[..., :-1], dU[..., -1]
        dk = dv = None
        if ctx.needs_input_grad[0]:
            dk = torch.einsum("mphe,mhde->mphd", v.to(dU.dtype), dS).add_(dz.unsqueeze(1)).to(k.dtype)
        if ctx.needs_input_grad[1]:
            dv = torch.einsum("mphd,mhde->mphe", k.to(dU.dtype), dS).to(v.dtype)
        return dk, dv


def local_sums(kp: torch.Tensor, vp: torch.Tensor) -> torch.Tensor:
    """[sum phi(k) v^T | sum phi(k)] of every piece (or sequence), [M, H, Dk, Dv + 1] in the accumulation dtype."""
    return LocalSums.apply(kp, vp)


def exclusive_scan(U: torch.Tensor, lay: Layout) -> torch.Tensor:
    """For every piece, the sum of U over the earlier pieces of its document (Hillis-Steele, out of
    place so that autograd differentiates it)."""
    inclusive, d = U, 1
    while d < lay.depth:
        same = (lay.doc[d:] == lay.doc[:-d]).to(U.dtype).view(-1, 1, 1, 1)
        inclusive = torch.cat([inclusive[:d], inclusive[d:] + same * inclusive[:-d]])
        d *= 2
    same = (lay.doc[1:] == lay.doc[:-1]).to(U.dtype).view(-1, 1, 1, 1)
    return torch.cat([torch.zeros_like(U[:1]), same * inclusive[:-1]])


def _initial(initial_state: LinearState | None, n: int, H: int, Dk: int, Dv: int, acc, device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(n, H, Dk, Dv + 1, dtype=acc, device=device)
    return torch.cat([initial_state.S, initial_state.z.unsqueeze(-1)], dim=-1)


def causal(q, k, v, lengths: list[int], initial_state: LinearState | None, eps: float, chunk_size: int, run):
    """Causal linear attention of packed documents -> (out [1, T, H, Dv], final LinearState [n, ...]).
    `run(q, k, v, initial_state, eps, chunk_size)` is the chosen backend on an ordinary batch."""
    _, T, H, Dk = q.shape
    Dv, n = v.shape[-1], len(lengths)
    acc = accumulation_dtype(q.dtype)
    U0 = _initial(initial_state, n, H, Dk, Dv, acc, q.device)
    n_tokens = (initial_state.n_tokens if initial_state is not None else 0) + max(lengths, default=0)
    if T == 0:
        return v.new_zeros(v.shape), LinearState(U0[..., :-1], U0[..., -1], n_tokens)
    lay = layout(lengths, piece_length(lengths, Dk, Dv), q.device)
    qp, kp, vp = gather(q, lay, False), gather(k, lay, True), gather(v, lay, False)
    U_in = exclusive_scan(local_sums(kp, vp), lay) + U0[lay.doc]
    start = LinearState(U_in[..., :-1].contiguous(), U_in[..., -1].contiguous())
    out, end = run(qp, kp, vp, start, eps, min(chunk_size, lay.P))
    has = lay.last >= 0
    last = lay.last.clamp(min=0)
    S = torch.where(has.view(-1, 1, 1, 1), end.S[last], U0[..., :-1])
    z = torch.where(has.view(-1, 1, 1), end.z[last], U0[..., -1])
    return scatter(out, lay), LinearState(S, z, n_tokens)


def non_causal(q, k, v, lengths: list[int], eps: float) -> torch.Tensor:
    """Non-causal linear attention within each packed document: [1, T, H, Dv]."""
    _, T, _H, Dk = q.shape
    Dv, n = v.shape[-1], len(lengths)
    if T == 0:
        return v.new_zeros(v.shape)
    lay = layout(lengths, piece_length(lengths, Dk, Dv), q.device)
    kp, vp = gather(k, lay, True), gather(v, lay, False)
    U = local_sums(kp, vp)
    per_doc = torch.zeros(n, *U.shape[1:], dtype=U.dtype, device=U.device).index_add(0, lay.doc, U)
    qp = gather(q, lay, False).to(U.dtype)
    num = torch.einsum("mphd,mhde->mphe", qp, per_doc[lay.doc])
    out = num[..., :Dv] / (num[..., Dv:] + eps)
    return scatter(out, lay).to(q.dtype)
