"""The Triton kernel behind ``backend="triton"``; imported lazily (it imports Triton).

Read :mod:`attn_lib.triton_kernel` first: it explains the algorithm and launches
this kernel. Triton decides at decoration time whether to interpret
(``TRITON_INTERPRET=1``), so this module records which mode it was built in.
"""

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def attention_fwd(
    Q, K, V, M, BIAS, OUT, LSE,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
    sm_b, sm_h, sm_t, sm_s, sb_b, sb_h, sb_t, sb_s,
    so_b, so_h, so_t, H, T, S, D, DV, scale,
    HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows (BLOCK_M,)
    d, dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_ptr = Q + b * sq_b + h * sq_h + i[:, None] * sq_t + d[None, :]
    q = tl.load(q_ptr, mask=(i[:, None] < T) & (d[None, :] < D), other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max
    total = tl.zeros((BLOCK_M,), tl.float32)  # running sum
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)  # running weighted values

    for j0 in range(0, S, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)  # key columns (BLOCK_N,)
        k_ptr = K + b * sk_b + h * sk_h + j[:, None] * sk_s + d[None, :]
        kb = tl.load(k_ptr, mask=(j[:, None] < S) & (d[None, :] < D), other=0.0)
        s = tl.dot(q, tl.trans(kb)).to(tl.float32) * scale  # (BLOCK_M, BLOCK_N)
        ok = (i[:, None] < T) & (j[None, :] < S)
        if CAUSAL:
            ok = ok & (j[None, :] <= i[:, None] + (S - T))
        tile = i[:, None] * sm_t + j[None, :] * sm_s
        if HAS_MASK:
            allowed = tl.load(M + b * sm_b + h * sm_h + tile, mask=ok, other=0)
            ok = ok & (allowed != 0)
        if HAS_BIAS:
            bias_tile = i[:, None] * sb_t + j[None, :] * sb_s
            bias_ptr = BIAS + b * sb_b + h * sb_h + bias_tile
            s += tl.load(bias_ptr, mask=ok, other=0.0).to(tl.float32)
        s = tl.where(ok, s, float("-inf"))

        m_new = tl.maximum(m, tl.max(s, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen: 0
        p = tl.exp(s - shift[:, None])
        alpha = tl.exp(m - shift)
        total = total * alpha + tl.sum(p, 1)
        v_ptr = V + b * sv_b + h * sv_h + j[:, None] * sv_s + dv[None, :]
        vb = tl.load(v_ptr, mask=(j[:, None] < S) & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb).to(tl.float32)
        m = m_new

    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # a row with no key stays 0
    o_ptr = OUT + b * so_b + h * so_h + i[:, None] * so_t + dv[None, :]
    tl.store(
        o_ptr, out.to(OUT.dtype.element_ty), mask=(i[:, None] < T) & (dv[None, :] < DV)
    )
    lse_ptr = LSE + pid_bh * T + i
    safe_total = tl.where(total == 0.0, 1.0, total)  # m is -inf there anyway
    tl.store(lse_ptr, m + tl.log(safe_total), mask=i < T)
