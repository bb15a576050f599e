"""Triton kernels for causal linear attention with the normaliser fused.

Inputs keep the public layout [B, T, H, D] (strides passed in); a program handles one chunk of
BT tokens of one (batch, head) and, where it helps, one block of the value dimension. All
arithmetic is float32 (loads are upcast; dots use IEEE float32), whatever the input dtype, so every
dtype gets float32 states and normalisers as the library promises. Naming as in
flash-linear-attention: b_ block values, p_ pointers, m_ masks, i_ program ids.

Forward (one state per chunk):  kv_n = K_n^T V_n, ks_n = K_n^T 1            chunk_state_fwd_kernel
                                S_n, z_n = S_0, z_0 + exclusive prefix sums      (torch.cumsum)
                                out_n = (tril(Q K^T) V + Q S_n) / (tril(Q K^T) 1 + Q z_n + eps)
                                                                                  chunk_out_fwd_kernel
Backward:                       qd_n = Q_n^T dnum_n, qg_n = Q_n^T dden_n         chunk_state_bwd_kernel
                                G, g = reverse prefix sums + final-state grads    (torch.cumsum)
                                dQ, dK, dV of the chunk                           chunk_dqkv_bwd_kernel
Decode:                         S += k v^T, z += k, out = q S / (q z + eps)       step_kernel
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_state_fwd_kernel(
    k, v, kv, ks,
    T, H, DK, DV,
    s_kb, s_kt, s_kh, s_vb, s_vt, s_vh,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """kv[b, h, n] = K_n^T V_n [DK, DV] and ks[b, h, n] = K_n^T 1 [DK], for chunk n (grid: NT, B*H, NK*NV)."""
    i_n, i_bh, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NV = tl.cdiv(DV, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    NT = tl.cdiv(T, BT)
    o_t = i_n * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < T, o_k < DK, o_v < DV
    p_k = k + i_b * s_kb + i_h * s_kh + o_t[:, None] * s_kt + o_k[None, :]
    p_v = v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :]
    b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)
    b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_kv = tl.dot(tl.trans(b_k), b_v, input_precision="ieee")  # [BK, BV]
    base = (i_bh * NT + i_n) * DK
    tl.store(kv + (base + o_k[:, None]) * DV + o_v[None, :], b_kv, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(ks + base + o_k, tl.sum(b_k, axis=0), mask=m_k)


@triton.jit
def chunk_out_fwd_kernel(
    q, k, v, S, z, o, den,
    T, H, DK, DV, eps,
    s_qb, s_qt, s_qh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Outputs of chunk n for one value block (grid: NT, B*H, NV); S, z: the state entering each chunk.
    The normaliser den [B, H, T] (eps included) is written by the first value block."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    o_t = i_n * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < T, o_v < DV
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_num = tl.zeros([BT, BV], dtype=tl.float32)
    b_den = tl.zeros([BT], dtype=tl.float32)
    state = (i_bh * NT + i_n) * DK
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < DK
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_q, b_k = b_q.to(tl.float32), b_k.to(tl.float32)
        b_S = tl.load(S + (state + o_k[:, None]) * DV + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
        b_z = tl.load(z + state + o_k, mask=m_k, other=0.0)
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision="ieee")
        b_num += tl.dot(b_q, b_S, input_precision="ieee")
        b_den += tl.sum(b_q * b_z[None, :], axis=1)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    b_A = tl.where(causal, b_A, 0.0)
    b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :], mask=m_t[:, None] & m_v[None, :],
                  other=0.0).to(tl.float32)  # fmt: skip
    b_num += tl.dot(b_A, b_v, input_precision="ieee")
    b_den += tl.sum(b_A, axis=1) + eps
    b_o = b_num / b_den[:, None]
    p_o = o + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(den + i_bh * T + o_t, b_den, mask=m_t)


@triton.jit
def chunk_state_bwd_kernel(
    q, do, den, dden, qd, qg,
    T, H, DK, DV,
    s_qb, s_qt, s_qh, s_ob, s_ot, s_oh,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """qd[b, h, n] = Q_n^T dnum_n [DK, DV] with dnum = dout / den, and qg[b, h, n] = Q_n^T dden_n [DK]
    (grid: NT, B*H, NK*NV)."""
    i_n, i_bh, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NV = tl.cdiv(DV, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    NT = tl.cdiv(T, BT)
    o_t = i_n * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < T, o_k < DK, o_v < DV
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                  other=0.0).to(tl.float32)  # fmt: skip
    b_do = tl.load(do + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :],
                   mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # fmt: skip
    b_den = tl.load(den + i_bh * T + o_t, mask=m_t, other=1.0)
    b_dnum = b_do / b_den[:, None]
    base = (i_bh * NT + i_n) * DK
    tl.store(qd + (base + o_k[:, None]) * DV + o_v[None, :], tl.dot(tl.trans(b_q), b_dnum, input_precision="ieee"),
             mask=m_k[:, None] & m_v[None, :])  # fmt: skip
    if i_v == 0:
        b_dden = tl.load(dden + i_bh * T + o_t, mask=m_t, other=0.0)
        tl.store(qg + base + o_k, tl.sum(b_q * b_dden[:, None], axis=0), mask=m_k)


@triton.jit
def chunk_dqkv_bwd_kernel(
    q, k, v, do, den, dden, S, z, G, g, dq, dk, dv,
    T, H, DK, DV,
    s_qb, s_qt, s_qh, s_vb, s_vt, s_vh, s_ob, s_ot, s_oh,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """dQ, dK, dV of chunk n (grid: NT, B*H). S, z: state entering chunk n; G, g: gradient of the state
    leaving it. dq, dk, dv are float32 [B, T, H, D] (contiguous)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    o_t = i_n * BT + tl.arange(0, BT)
    m_t = o_t < T
    state = (i_bh * NT + i_n) * DK
    b_den = tl.load(den + i_bh * T + o_t, mask=m_t, other=1.0)
    b_dden = tl.load(dden + i_bh * T + o_t, mask=m_t, other=0.0)
    # A = Q K^T and dA = dnum V^T + dden 1^T, both masked causally
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < DK)[None, :]
        b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_A += tl.dot(b_q.to(tl.float32), tl.trans(b_k.to(tl.float32)), input_precision="ieee")
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < DV)[None, :]
        b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(do + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :], mask=m_tv, other=0.0)
        b_dnum = b_do.to(tl.float32) / b_den[:, None]
        b_dA += tl.dot(b_dnum, tl.trans(b_v.to(tl.float32)), input_precision="ieee")
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    b_A = tl.where(causal, b_A, 0.0)
    b_dA = tl.where(causal, b_dA + b_dden[:, None], 0.0)
    # dQ = dA K + dnum S^T + dden z^T  and  dK = dA^T Q + V G^T + 1 g^T, a key block at a time
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < DK
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_q, b_k = b_q.to(tl.float32), b_k.to(tl.float32)
        b_dq = tl.dot(b_dA, b_k, input_precision="ieee")
        b_dk = tl.dot(tl.trans(b_dA), b_q, input_precision="ieee")
        for i_v in range(tl.cdiv(DV, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < DV
            m_tv = m_t[:, None] & m_v[None, :]
            b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :], mask=m_tv, other=0.0)
            b_do = tl.load(do + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :], mask=m_tv, other=0.0)
            b_dnum = b_do.to(tl.float32) / b_den[:, None]
            m_kv = m_k[:, None] & m_v[None, :]
            b_S = tl.load(S + (state + o_k[:, None]) * DV + o_v[None, :], mask=m_kv, other=0.0)
            b_G = tl.load(G + (state + o_k[:, None]) * DV + o_v[None, :], mask=m_kv, other=0.0)
            b_dq += tl.dot(b_dnum, tl.trans(b_S), input_precision="ieee")
            b_dk += tl.dot(b_v.to(tl.float32), tl.trans(b_G), input_precision="ieee")
        b_z = tl.load(z + state + o_k, mask=m_k, other=0.0)
        b_g = tl.load(g + state + o_k, mask=m_k, other=0.0)
        b_dq += b_dden[:, None] * b_z[None, :]
        b_dk += b_g[None, :]
        p = (i_b * T + o_t[:, None]) * H * DK + i_h * DK + o_k[None, :]
        tl.store(dq + p, b_dq, mask=m_tk)
        tl.store(dk + p, b_dk, mask=m_tk)
    # dV = A^T dnum + K G, a value block at a time
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        m_tv = m_t[:, None] & m_v[None, :]
        b_do = tl.load(do + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :], mask=m_tv, other=0.0)
        b_dnum = b_do.to(tl.float32) / b_den[:, None]
        b_dv = tl.dot(tl.trans(b_A), b_dnum, input_precision="ieee")
        for i_k in range(tl.cdiv(DK, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < DK
            b_k = tl.load(k + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :],
                          mask=m_t[:, None] & m_k[None, :], other=0.0).to(tl.float32)  # fmt: skip
            b_G = tl.load(G + (state + o_k[:, None]) * DV + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0)
            b_dv += tl.dot(b_k, b_G, input_precision="ieee")
        tl.store(dv + (i_b * T + o_t[:, None]) * H * DV + i_h * DV + o_v[None, :], b_dv, mask=m_tv)


@triton.jit
def step_kernel(
    q, k, v, S, z, o,
    H, DK, DV, eps,
    BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """One token, in place (grid: B*H): S += k v^T, z += k, o = q S / (q . z + eps), a value block at a
    time inside the program (so z is read before it is written). q, k [B, H, DK], v and o [B, H, DV],
    S [B, H, DK, DV] and z [B, H, DK] float32, all contiguous. Allocates nothing."""
    i_bh = tl.program_id(0)
    o_k = tl.arange(0, BK)
    m_k = o_k < DK
    b_q = tl.load(q + i_bh * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_bh * DK + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_z = tl.load(z + i_bh * DK + o_k, mask=m_k, other=0.0) + b_k
    tl.store(z + i_bh * DK + o_k, b_z, mask=m_k)
    b_den = tl.sum(b_q * b_z, axis=0) + eps
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        b_v = tl.load(v + i_bh * DV + o_v, mask=m_v, other=0.0).to(tl.float32)
        p_S = S + (i_bh * DK + o_k[:, None]) * DV + o_v[None, :]
        m_S = m_k[:, None] & m_v[None, :]
        b_S = tl.load(p_S, mask=m_S, other=0.0) + b_k[:, None] * b_v[None, :]
        tl.store(p_S, b_S, mask=m_S)
        b_o = tl.sum(b_q[:, None] * b_S, axis=0) / b_den
        tl.store(o + i_bh * DV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
