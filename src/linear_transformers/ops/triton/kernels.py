"""Triton kernels for causal linear attention with the normaliser fused.

Inputs keep the public layout [B, T, H, D] (strides passed in); a program handles one chunk of
BT tokens of one (batch, head) and one block of the key or value dimension. Loads are upcast to
float32, sums, states and normalisers are float32 whatever the input dtype; the dot products run
at the precision PREC ("ieee": float32 on the CUDA cores; "tf32": tensor cores, each operand's
mantissa rounded to 10 bits, which is exact for float16 and bfloat16 inputs and rounds only the
float32 intermediates; "tf32x3": three tensor-core passes, about float32's accuracy; see
`dot_precision` in __init__.py for the choice). Naming as in flash-linear-attention: b_ block
values, p_ pointers, m_ masks, i_ program ids, r the chunk's slot counted from the end.

Forward:   kv_n = K_n^T V_n, ks_n = K_n^T 1                       chunk_state_fwd_kernel
           C, c = inclusive prefix sums of kv, ks over chunks        (torch.cumsum)
           S_n = S_0 + C_n - kv_n (state entering chunk n), z_n likewise, and
           out_n = (tril(Q K^T) V + Q S_n) / (tril(Q K^T) 1 + Q z_n + eps)
                                                                     chunk_out_fwd_kernel
           (writes S_n over C_n and z_n for the backward, and the final state)
Backward:  dden = -(dout . out) / den, dnum = dout / den,
           qd_n = Q_n^T dnum_n, qg_n = Q_n^T dden_n, stored in reverse chunk order
                                                                     chunk_state_bwd_kernel
           their inclusive prefix sums (torch.cumsum) give G_n, g_n, the gradient of the state
           leaving chunk n: dS_final + sum over later chunks
           dQ, dK of the chunk, a key block per program                chunk_dqk_bwd_kernel
           dV of the chunk, a value block per program, and dS_0        chunk_dv_bwd_kernel
Decode:    S += k v^T, z += k, out = q S / (q z + eps)               step_kernel
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_state_fwd_kernel(
    k,
    v,
    kv,
    ks,
    T,
    H,
    DK,
    DV,
    s_kb,
    s_kt,
    s_kh,
    s_vb,
    s_vt,
    s_vh,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
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
    b_kv = tl.dot(tl.trans(b_k), b_v, input_precision=PREC)  # [BK, BV]
    base = (i_bh * NT + i_n) * DK
    tl.store(kv + (base + o_k[:, None]) * DV + o_v[None, :], b_kv, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(ks + base + o_k, tl.sum(b_k, axis=0), mask=m_k)


@triton.jit
def chunk_out_fwd_kernel(
    q,
    k,
    v,
    C,
    kv,
    c,
    ks,
    S0,
    z0,
    o,
    den,
    z_ex,
    S_fin,
    z_fin,
    T,
    H,
    DK,
    DV,
    eps,
    s_qb,
    s_qt,
    s_qh,
    s_vb,
    s_vt,
    s_vh,
    s_ob,
    s_ot,
    s_oh,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
    SAVE: tl.constexpr,
):
    """Outputs of chunk n for one value block (grid: NT, B*H, NV). C, c: inclusive prefix sums of
    kv, ks over the chunks; the state entering chunk n is S_0 + C_n - kv_n. With SAVE that state is
    written over C_n (each program reads and writes only its own value block of it) and z_n into
    z_ex; the last chunk writes the final state. The normaliser den [B, H, T] (eps included) is
    written by the first value block."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    last = i_n == NT - 1
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
        m_kv = m_k[:, None] & m_v[None, :]
        b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_q, b_k = b_q.to(tl.float32), b_k.to(tl.float32)
        p_S = (state + o_k[:, None]) * DV + o_v[None, :]
        p_S0 = (i_bh * DK + o_k[:, None]) * DV + o_v[None, :]
        b_C = tl.load(C + p_S, mask=m_kv, other=0.0)
        b_S0 = tl.load(S0 + p_S0, mask=m_kv, other=0.0)
        b_S = b_S0 + (b_C - tl.load(kv + p_S, mask=m_kv, other=0.0))
        b_c = tl.load(c + state + o_k, mask=m_k, other=0.0)
        b_z0 = tl.load(z0 + i_bh * DK + o_k, mask=m_k, other=0.0)
        b_z = b_z0 + (b_c - tl.load(ks + state + o_k, mask=m_k, other=0.0))
        if SAVE:
            tl.store(C + p_S, b_S, mask=m_kv)
            if i_v == 0:
                tl.store(z_ex + state + o_k, b_z, mask=m_k)
        if last:
            tl.store(S_fin + p_S0, b_S0 + b_C, mask=m_kv)
            if i_v == 0:
                tl.store(z_fin + i_bh * DK + o_k, b_z0 + b_c, mask=m_k)
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_num += tl.dot(b_q, b_S, input_precision=PREC)
        b_den += tl.sum(b_q * b_z[None, :], axis=1)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    b_A = tl.where(causal, b_A, 0.0)
    b_v = tl.load(
        v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0
    ).to(tl.float32)
    b_num += tl.dot(b_A, b_v, input_precision=PREC)
    b_den += tl.sum(b_A, axis=1) + eps
    b_o = b_num / b_den[:, None]
    p_o = o + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(den + i_bh * T + o_t, b_den, mask=m_t)


@triton.jit
def chunk_state_bwd_kernel(
    q,
    do,
    y,
    den,
    dden,
    qd,
    qg,
    T,
    H,
    DK,
    DV,
    s_qb,
    s_qt,
    s_qh,
    s_ob,
    s_ot,
    s_oh,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """qd[b, h, r] = Q_n^T dnum_n [DK, DV] with dnum = dout / den, and qg[b, h, r] = Q_n^T dden_n [DK]
    with dden = -(dout . out) / den, in slot r = NT - 1 - n (grid: NT, B*H, NK*NV). do and y (the
    forward's output) share strides; the first key and value block also writes dden [B, H, T]."""
    i_n, i_bh, i_kv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NV = tl.cdiv(DV, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    NT = tl.cdiv(T, BT)
    o_t = i_n * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_k, m_v = o_t < T, o_k < DK, o_v < DV
    b_q = tl.load(
        q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0
    ).to(tl.float32)
    p_o = i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot
    b_do = tl.load(do + p_o + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    b_den = tl.load(den + i_bh * T + o_t, mask=m_t, other=1.0)
    b_dnum = b_do / b_den[:, None]
    base = (i_bh * NT + NT - 1 - i_n) * DK
    tl.store(
        qd + (base + o_k[:, None]) * DV + o_v[None, :],
        tl.dot(tl.trans(b_q), b_dnum, input_precision=PREC),
        mask=m_k[:, None] & m_v[None, :],
    )
    if i_v == 0:
        b_dy = tl.zeros([BT], dtype=tl.float32)
        for j in range(NV):
            o_j = j * BV + tl.arange(0, BV)
            m_tj = m_t[:, None] & (o_j < DV)[None, :]
            b_doj = tl.load(do + p_o + o_j[None, :], mask=m_tj, other=0.0).to(tl.float32)
            b_yj = tl.load(y + p_o + o_j[None, :], mask=m_tj, other=0.0).to(tl.float32)
            b_dy += tl.sum(b_doj * b_yj, axis=1)
        b_dden = -b_dy / b_den
        tl.store(qg + base + o_k, tl.sum(b_q * b_dden[:, None], axis=0), mask=m_k)
        if i_k == 0:
            tl.store(dden + i_bh * T + o_t, b_dden, mask=m_t)


@triton.jit
def chunk_dqk_bwd_kernel(
    q,
    k,
    v,
    do,
    den,
    dden,
    S,
    z,
    qd,
    Gc,
    qg,
    gc,
    dS_fin,
    dz_fin,
    dq,
    dk,
    dz0,
    T,
    H,
    DK,
    DV,
    s_qb,
    s_qt,
    s_qh,
    s_vb,
    s_vt,
    s_vh,
    s_ob,
    s_ot,
    s_oh,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dQ and dK of chunk n for one key block (grid: NT, B*H, NK):
        dA = causal(dnum V^T + dden 1^T),  dQ = dA K + dnum S_n^T + dden z_n^T,  dK = dA^T Q + V G_n^T + 1 g_n^T
    S, z: states entering each chunk; G_n = dS_fin + Gc_r - qd_r (r = NT - 1 - n), the gradient of the
    state leaving chunk n, and g_n likewise. dq, dk [B, T, H, DK] contiguous, in the input dtype.
    The first chunk writes dz0 = dz_fin + gc_{NT-1}."""
    i_n, i_bh, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    o_t = i_n * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t, m_k = o_t < T, o_k < DK
    m_tk = m_t[:, None] & m_k[None, :]
    state = (i_bh * NT + i_n) * DK
    rev = (i_bh * NT + NT - 1 - i_n) * DK
    b_den = tl.load(den + i_bh * T + o_t, mask=m_t, other=1.0)
    b_dden = tl.load(dden + i_bh * T + o_t, mask=m_t, other=0.0)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    for i_v in range(tl.cdiv(DV, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < DV
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_v = tl.load(v + i_b * s_vb + i_h * s_vh + o_t[:, None] * s_vt + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(do + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :], mask=m_tv, other=0.0)
        b_v, b_dnum = b_v.to(tl.float32), b_do.to(tl.float32) / b_den[:, None]
        p_kv = o_k[:, None] * DV + o_v[None, :]
        b_S = tl.load(S + state * DV + p_kv, mask=m_kv, other=0.0)
        b_G = tl.load(dS_fin + i_bh * DK * DV + p_kv, mask=m_kv, other=0.0)
        b_G += tl.load(Gc + rev * DV + p_kv, mask=m_kv, other=0.0) - tl.load(qd + rev * DV + p_kv, mask=m_kv, other=0.0)
        b_dA += tl.dot(b_dnum, tl.trans(b_v), input_precision=PREC)
        b_dq += tl.dot(b_dnum, tl.trans(b_S), input_precision=PREC)
        b_dk += tl.dot(b_v, tl.trans(b_G), input_precision=PREC)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    b_dA = tl.where(causal, b_dA + b_dden[:, None], 0.0)
    b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
    b_dq += tl.dot(b_dA, b_k.to(tl.float32), input_precision=PREC)
    b_dk += tl.dot(tl.trans(b_dA), b_q.to(tl.float32), input_precision=PREC)
    b_z = tl.load(z + state + o_k, mask=m_k, other=0.0)
    b_gc = tl.load(gc + rev + o_k, mask=m_k, other=0.0)
    b_g = tl.load(dz_fin + i_bh * DK + o_k, mask=m_k, other=0.0) + b_gc
    b_dq += b_dden[:, None] * b_z[None, :]
    b_dk += (b_g - tl.load(qg + rev + o_k, mask=m_k, other=0.0))[None, :]
    p = (i_b * T + o_t[:, None]) * H * DK + i_h * DK + o_k[None, :]
    tl.store(dq + p, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if i_n == 0:
        tl.store(dz0 + i_bh * DK + o_k, b_g, mask=m_k)


@triton.jit
def chunk_dv_bwd_kernel(
    q,
    k,
    do,
    den,
    qd,
    Gc,
    dS_fin,
    dv,
    dS0,
    T,
    H,
    DK,
    DV,
    s_qb,
    s_qt,
    s_qh,
    s_ob,
    s_ot,
    s_oh,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """dV of chunk n for one value block (grid: NT, B*H, NV): dV = causal(Q K^T)^T dnum + K G_n, with
    G_n as in chunk_dqk_bwd_kernel. dv [B, T, H, DV] contiguous, in the input dtype. The first chunk
    writes dS0 = dS_fin + Gc_{NT-1}."""
    i_n, i_bh, i_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NT = tl.cdiv(T, BT)
    o_t = i_n * BT + tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t, m_v = o_t < T, o_v < DV
    m_tv = m_t[:, None] & m_v[None, :]
    rev = (i_bh * NT + NT - 1 - i_n) * DK
    b_A = tl.zeros([BT, BT], dtype=tl.float32)
    b_dv = tl.zeros([BT, BV], dtype=tl.float32)
    for i_k in range(tl.cdiv(DK, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < DK
        m_tk = m_t[:, None] & m_k[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        b_q = tl.load(q + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_k = tl.load(k + i_b * s_qb + i_h * s_qh + o_t[:, None] * s_qt + o_k[None, :], mask=m_tk, other=0.0)
        b_q, b_k = b_q.to(tl.float32), b_k.to(tl.float32)
        p_kv = o_k[:, None] * DV + o_v[None, :]
        b_Gc = tl.load(Gc + rev * DV + p_kv, mask=m_kv, other=0.0)
        b_Gf = tl.load(dS_fin + i_bh * DK * DV + p_kv, mask=m_kv, other=0.0)
        b_G = b_Gf + (b_Gc - tl.load(qd + rev * DV + p_kv, mask=m_kv, other=0.0))
        b_A += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        b_dv += tl.dot(b_k, b_G, input_precision=PREC)
        if i_n == 0:
            tl.store(dS0 + i_bh * DK * DV + p_kv, b_Gf + b_Gc, mask=m_kv)
    causal = tl.arange(0, BT)[:, None] >= tl.arange(0, BT)[None, :]
    b_A = tl.where(causal, b_A, 0.0)
    b_do = tl.load(do + i_b * s_ob + i_h * s_oh + o_t[:, None] * s_ot + o_v[None, :], mask=m_tv, other=0.0)
    b_den = tl.load(den + i_bh * T + o_t, mask=m_t, other=1.0)
    b_dv += tl.dot(tl.trans(b_A), b_do.to(tl.float32) / b_den[:, None], input_precision=PREC)
    tl.store(dv + (i_b * T + o_t[:, None]) * H * DV + i_h * DV + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)


@triton.jit
def step_kernel(
    q,
    k,
    v,
    S,
    z,
    o,
    H,
    DK,
    DV,
    eps,
    BK: tl.constexpr,
    BV: tl.constexpr,
):
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
