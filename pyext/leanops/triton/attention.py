"""Fused attention in Triton: the flash-attention-2 algorithm, forward and backward.

Definitions (scores, masks, layouts) are leanops.ops.attention's; this file only computes them.

Forward (`_fwd_kernel`, one program per [BLOCK_M queries] x (batch, q head)): Q tile in registers,
loop over BLOCK_N-key tiles of K and V: S = Q K^T, online softmax in fp32 with the base-2
exponent (scores pre-multiplied by log2(e), exp2 is one MUFU instruction), running max m and sum
l, O = O * exp2(m_old - m_new) + P V with P rounded to V's dtype; at the end O / l and
lse = (m + log2 l) * ln 2 (natural log, the op's lse). No Sq x Sk matrix ever exists in memory.

Masks without per-element work where possible: the key loop runs in three ranges computed per
query block, [lo, full_lo) and [full_hi, hi) with the mask (left window edge; causal diagonal /
right window edge / ragged end of K) and [full_lo, full_hi) without any mask, and key blocks no
query of the block can see are never visited (causal skips the upper triangle, a sliding window
everything outside its band).

Backward (FA2): a preprocess kernel delta = rowsum(dO * O); `_bwd_dkdv_kernel`, one program per
[BLOCK_N keys] x (batch, kv head), loops over the q heads of its GQA group and the query blocks
that can see its keys, recomputing P = exp2(S - lse) and accumulating dV += P^T dO,
dK += dS^T Q with dS = P * (dP - delta), dP = dO V^T; `_bwd_dq_kernel`, one program per
[BLOCK_M queries] x (batch, q head), recomputes P and dS and accumulates dQ += dS K. Every output
is written once by one program: deterministic, no atomics, and GQA never materialises repeated
K/V (dK/dV of a kv head sum over its q heads inside one program). The price against
flash-attention's atomic dQ is recomputing Q K^T and dO V^T once more (7 matmuls instead of 5).

GQA: q head h reads kv head h // GROUP. Varlen: `IS_VARLEN` reads each sequence's start and
length from cu_seqlens and the batch stride is 0. Head dims that are not powers of two (80, 96,
112, ...) run with BLOCK_D = next power of two and masked loads (`EVEN_D` drops the masks).
All offsets that scale with batch, head or sequence are int64.

int8 Q K^T (SageAttention-style, `attention_int8`): the same forward kernel with QK_INT8: Q and K
arrive as int8 codes with one fp32 scale per QK_BLOCK rows (`_quantize_blocks_kernel`), the
product accumulates in int32 and is scaled once per score; P V stays 16-bit.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import triton
import triton.language as tl

from leanops.triton import _common as C
from leanops.triton.quantize import _codes, _scale_of

# Block pointers are deliberate: they exist in every Triton we support (3.6 on GPUs) and keep
# the streamed K/V addresses out of the loop-carried registers (see _fwd_inner). Triton >= 3.8
# deprecates them in favour of tensor descriptors (TMA), the planned next step for Hopper; until
# then its warning at each compile says nothing a user can act on.
warnings.filterwarnings("ignore", message="tl.make_block_ptr is deprecated", category=UserWarning)

# ---------------------------------------------------------------------------------------------
# Shared jit helpers


@triton.jit
def _tanh(x):
    # No tanh in tl.math across the Triton versions we support (3.6 on GPUs, 3.8 here) and
    # libdevice is not reachable from the interpreter. 1 - 2 / (e^{2x} + 1) saturates to +-1
    # exactly at large |x| (e^{2x} -> inf or 0); near 0 it loses ~1e-7 absolute to cancellation,
    # which softcap (~30-50) scales to ~5e-6 on a logit: far below fp16/bf16 rounding.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores(qk, bias, rows, cols, q_len, k_len, diag, sm_scale, softcap, window_left,
            window_right, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            MASKED: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
            CHECK_ROWS: tl.constexpr):
    """Scores in the base-2 domain (log2(e) * the op's scores) and tanh(s0 / softcap) for the
    softcap backward. rows / cols: query / key indices broadcastable to qk's shape (so the same
    helper serves S [M, N] and S^T [N, M]). The visibility test is ops.attention.visible's:
    key j visible to query i iff i + diag - left <= j <= i + diag + right (diag = Sk - Sq) and
    j < Sk. CHECK_ROWS also masks query rows >= Sq (the backward, where a padded row must not
    contribute to dK/dV; the forward just never stores them)."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (sm_scale / softcap))
        s = t * (softcap * 1.4426950408889634)
    else:
        t = qk
        s = qk * (sm_scale * 1.4426950408889634)
    if HAS_BIAS:
        s = s + bias * 1.4426950408889634
    if MASKED:
        # Per-row bounds first (1-D), then one or two broadcast compares: fewer [M, N]
        # temporaries in registers than forming cols - rows - diag.
        last = tl.minimum(rows + diag + window_right, k_len - 1) if WINDOW_RIGHT else k_len - 1
        ok = cols <= last
        if WINDOW_LEFT:
            ok = ok & (cols >= rows + diag - window_left)
        if CHECK_ROWS:
            ok = ok & (rows < q_len)
        s = tl.where(ok, s, float("-inf"))
    return s, t


@triton.jit
def _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of sequence b: rows of the packed tensors (varlen) or
    the whole [S] axis of a dense batch entry."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + b)
        q_len = tl.load(CuQ + b + 1) - q_start
        k_start = tl.load(CuK + b)
        k_len = tl.load(CuK + b + 1) - k_start
    else:
        q_start = seqlen_q * 0
        q_len = seqlen_q + 0
        k_start = seqlen_k * 0
        k_len = seqlen_k + 0
    return q_start, q_len, k_start, k_len


@triton.jit
def _key_ranges(m0, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """For the query rows [m0, m0 + BLOCK_M): (lo, full_lo, full_hi, hi), key tiles in
    [lo, full_lo) and [full_hi, hi) need the mask, tiles in [full_lo, full_hi) none, and no key
    outside [lo, hi) is visible. lo, full_lo and full_hi are multiples of BLOCK_N (full_lo may
    equal hi instead). All operands of // are >= 0: Triton's integer division truncates."""
    diag = k_len - q_len
    m_last = tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo = m0 * 0
    hi = k_len + 0
    if WINDOW_LEFT:
        lo = tl.maximum(m0 + diag - window_left, 0) // BLOCK_N * BLOCK_N
    if WINDOW_RIGHT:
        hi = tl.minimum(m_last + diag + window_right + 1, k_len)
    hi = tl.maximum(hi, lo)
    full_lo = lo
    if WINDOW_LEFT:
        # every row of the block sees key n0 once n0 >= (last row) + diag - left
        x = tl.maximum(m0 + BLOCK_M - 1 + diag - window_left, lo)
        full_lo = tl.minimum((x + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    y = k_len + 0
    if WINDOW_RIGHT:
        # ... and key n0 + BLOCK_N - 1 once it is <= (first row) + diag + right
        y = tl.minimum(y, m0 + diag + window_right + 1)
    full_hi = tl.maximum(tl.maximum(y, 0) // BLOCK_N * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def _query_ranges(n0, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """The mirror of _key_ranges for the key rows [n0, n0 + BLOCK_N) (backward dK/dV): query
    tiles in [lo, full_lo) and [full_hi, hi) need the mask, [full_lo, full_hi) none."""
    diag = k_len - q_len
    n_last = tl.minimum(n0 + BLOCK_N, k_len) - 1
    lo = n0 * 0
    hi = q_len + 0
    if WINDOW_RIGHT:  # query i sees key j only if j <= i + diag + right
        lo = tl.maximum(n0 - diag - window_right, 0) // BLOCK_M * BLOCK_M
    if WINDOW_LEFT:  # ... and j >= i + diag - left
        hi = tl.minimum(n_last - diag + window_left + 1, q_len)
    hi = tl.maximum(hi, lo)
    full_lo = lo
    if WINDOW_RIGHT:
        x = tl.maximum(n0 + BLOCK_N - 1 - diag - window_right, lo)
        full_lo = tl.minimum((x + BLOCK_M - 1) // BLOCK_M * BLOCK_M, hi)
    y = q_len + 0
    if WINDOW_LEFT:
        y = tl.minimum(y, n0 - diag + window_left + 1)
    full_hi = tl.maximum(tl.maximum(y, 0) // BLOCK_M * BLOCK_M, full_lo)
    # a ragged key tile needs the mask for every query tile
    full_hi = tl.where(n0 + BLOCK_N > k_len, full_lo, full_hi)
    return lo, full_lo, full_hi, hi


# ---------------------------------------------------------------------------------------------
# Forward


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, q_scale, k_block, v_block, bias_base, ks_base,
    rows, offs_n, start, end, q_len, k_len, diag,
    stride_bm, stride_bn, sm_scale, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, QK_INT8: tl.constexpr,
    QK_BLOCK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # K and V tiles come through block pointers: only a scalar offset is carried around the
    # loop. A loop-carried [BLOCK_D, BLOCK_N] tensor of 64-bit pointers (pointer increments)
    # costs 2 registers per element per thread and made every D = 128 config spill (ptxas).
    k_block = tl.advance(k_block, (0, start))
    v_block = tl.advance(v_block, (start, 0))
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        if MASKED:  # ragged K end (and D) zero-filled; scores masked below
            k = tl.load(k_block, boundary_check=(0, 1), padding_option="zero")
            v = tl.load(v_block, boundary_check=(0, 1), padding_option="zero")
        elif EVEN_D:
            k = tl.load(k_block)
            v = tl.load(v_block)
        else:
            k = tl.load(k_block, boundary_check=(0,), padding_option="zero")
            v = tl.load(v_block, boundary_check=(1,), padding_option="zero")
        if QK_INT8:
            k_scale = tl.load(ks_base + cols // QK_BLOCK, mask=cols < k_len, other=0.0)
            qk = tl.dot(q, k, out_dtype=tl.int32).to(tl.float32)
            qk = qk * q_scale[:, None] * k_scale[None, :]
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        bias = qk
        if HAS_BIAS:
            b_ptrs = (bias_base + rows.to(tl.int64)[:, None] * stride_bm
                      + cols.to(tl.int64)[None, :] * stride_bn)
            bias = tl.load(b_ptrs, mask=(rows < q_len)[:, None] & (cols < k_len)[None, :],
                           other=0.0).to(tl.float32)
        s, _t = _scores(qk, bias, rows[:, None], cols[None, :], q_len, k_len, diag, sm_scale,
                        softcap, window_left, window_right, HAS_BIAS, HAS_SOFTCAP, MASKED,
                        WINDOW_LEFT, WINDOW_RIGHT, False)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_BIAS:
            # A row with every score so far at -inf: subtract 0 instead of -inf (no NaN); its
            # p and l stay 0.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        k_block = tl.advance(k_block, (0, BLOCK_N))
        v_block = tl.advance(v_block, (BLOCK_N, 0))
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Bias, Out, Lse, CuQ, CuK, QScale, KScale,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh,
    H, GROUP, seqlen_q, seqlen_k, head_dim,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, QK_INT8: tl.constexpr,
    QK_BLOCK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Query blocks in reverse order: with a causal mask the last blocks see the most keys, and
    # starting them first shortens the tail of the launch.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_start64 = tl.cast(q_start, tl.int64)
    k_start64 = tl.cast(k_start, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rows = m0 + offs_m
    row_ok = rows < q_len

    q_block = tl.make_block_ptr(Q + b64 * stride_qb + h64 * stride_qh + q_start64 * stride_qs,
                                shape=(q_len, head_dim), strides=(stride_qs, 1),
                                offsets=(m0, 0), block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
    q = tl.load(q_block, boundary_check=(0, 1), padding_option="zero")
    q_scale = row_ok  # placeholder when not QK_INT8 (never read)
    ks_base = KScale
    if QK_INT8:
        q_scale = tl.load(QScale + b64 * stride_qsb + h64 * stride_qsh + rows // QK_BLOCK,
                          mask=row_ok, other=0.0)
        ks_base = KScale + b64 * stride_ksb + hk64 * stride_ksh
    # K read as the [BLOCK_D, BLOCK_N] operand of Q K^T, V as [BLOCK_N, BLOCK_D]
    k_block = tl.make_block_ptr(K + b64 * stride_kb + hk64 * stride_kh + k_start64 * stride_ks,
                                shape=(head_dim, k_len), strides=(1, stride_ks), offsets=(0, 0),
                                block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
    v_block = tl.make_block_ptr(V + b64 * stride_vb + hk64 * stride_vh + k_start64 * stride_vs,
                                shape=(k_len, head_dim), strides=(stride_vs, 1), offsets=(0, 0),
                                block_shape=(BLOCK_N, BLOCK_D), order=(1, 0))
    bias_base = Bias
    if HAS_BIAS:
        bias_base = Bias + b64 * stride_bb + h64 * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = k_len - q_len
    lo, full_lo, full_hi, hi = _key_ranges(m0, q_len, k_len, window_left, window_right,
                                           BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    # left edge of a sliding window (masked)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, q_scale, k_block, v_block, bias_base, ks_base, rows, offs_n, lo,
        full_lo, q_len, k_len, diag, stride_bm, stride_bn, sm_scale, softcap, window_left,
        window_right, True, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, QK_INT8,
        QK_BLOCK, EVEN_D, DOT_PRECISION, BLOCK_N)
    # interior: every row sees every key of these tiles (no mask)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, q_scale, k_block, v_block, bias_base, ks_base, rows, offs_n, full_lo,
        full_hi, q_len, k_len, diag, stride_bm, stride_bn, sm_scale, softcap, window_left,
        window_right, False, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, QK_INT8,
        QK_BLOCK, EVEN_D, DOT_PRECISION, BLOCK_N)
    # causal diagonal / right window edge / ragged end of K (masked)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, q_scale, k_block, v_block, bias_base, ks_base, rows, offs_n, full_hi,
        hi, q_len, k_len, diag, stride_bm, stride_bn, sm_scale, softcap, window_left,
        window_right, True, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, QK_INT8,
        QK_BLOCK, EVEN_D, DOT_PRECISION, BLOCK_N)

    # Rows that saw no key: l = 0, output 0 and lse -inf (the op's convention).
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_block = tl.make_block_ptr(Out + b64 * stride_ob + h64 * stride_oh + q_start64 * stride_os,
                                shape=(q_len, head_dim), strides=(stride_os, 1),
                                offsets=(m0, 0), block_shape=(BLOCK_M, BLOCK_D), order=(1, 0))
    tl.store(o_block, out.to(Out.dtype.element_ty), boundary_check=(0, 1))
    l_ptrs = Lse + b64 * stride_lb + h64 * stride_lh + (q_start64 + rows.to(tl.int64)) * stride_ls
    tl.store(l_ptrs, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _bwd_preprocess_kernel(
    Out, DO, Delta, CuQ, CuK,
    stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
    stride_lb, stride_lh, stride_ls,
    H, seqlen_q, seqlen_k, head_dim,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_d dO[i, d] * O[i, d] (= rowsum(P * dP), the softmax backward's row term)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len, k_start, k_len = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    rows = (tl.cast(q_start, tl.int64) + m0 + tl.arange(0, BLOCK_M))
    row_ok = m0 + tl.arange(0, BLOCK_M) < q_len
    offs_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    o = tl.load(Out + b64 * stride_ob + h64 * stride_oh + rows[:, None] * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * stride_db + h64 * stride_dh + rows[:, None] * stride_ds + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(Delta + b64 * stride_lb + h64 * stride_lh + rows * stride_ls, tl.sum(o * do, 1),
             mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base,
    cols, offs_m, offs_d, start, end, q_len, k_len, diag, head_dim,
    stride_qs, stride_dos, stride_ls, stride_bm, stride_bn,
    sm_scale, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Works on transposed tiles (S^T [BLOCK_N, BLOCK_M]) so that dV += P^T dO and dK += dS^T Q
    # are plain dots with no register transpose of P or dS.
    d_ok = offs_d < head_dim
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        r64 = rows.to(tl.int64)
        if MASKED:
            row_ok = rows < q_len
            qT = tl.load(q_base + r64[None, :] * stride_qs + offs_d[:, None],
                         mask=row_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_base + r64[:, None] * stride_dos + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + r64 * stride_ls, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + r64 * stride_ls, mask=row_ok, other=0.0)
        else:
            if EVEN_D:
                qT = tl.load(q_base + r64[None, :] * stride_qs + offs_d[:, None])
                do = tl.load(do_base + r64[:, None] * stride_dos + offs_d[None, :])
            else:
                qT = tl.load(q_base + r64[None, :] * stride_qs + offs_d[:, None],
                             mask=d_ok[:, None], other=0.0)
                do = tl.load(do_base + r64[:, None] * stride_dos + offs_d[None, :],
                             mask=d_ok[None, :], other=0.0)
            lse = tl.load(lse_base + r64 * stride_ls)
            delta = tl.load(delta_base + r64 * stride_ls)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
        bias = qkT
        if HAS_BIAS:
            b_ptrs = bias_base + r64[None, :] * stride_bm + cols.to(tl.int64)[:, None] * stride_bn
            bias = tl.load(b_ptrs, mask=(rows < q_len)[None, :] & (cols < k_len)[:, None],
                           other=0.0).to(tl.float32)
        sT, tT = _scores(qkT, bias, rows[None, :], cols[:, None], q_len, k_len, diag, sm_scale,
                         softcap, window_left, window_right, HAS_BIAS, HAS_SOFTCAP, MASKED,
                         WINDOW_LEFT, WINDOW_RIGHT, True)
        # lse = -inf only for rows that saw no key; all their scores are -inf too: use 0.
        lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
        pT = tl.math.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV, CuQ, CuK,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H_KV, GROUP, seqlen_q, seqlen_k, head_dim,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    q_start, q_len, k_start, k_len = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_start64 = tl.cast(q_start, tl.int64)
    k_start64 = tl.cast(k_start, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + tl.arange(0, BLOCK_N)
    c64 = k_start64 + cols.to(tl.int64)
    kv_mask = (cols < k_len)[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + c64[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + c64[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    diag = k_len - q_len
    lo, full_lo, full_hi, hi = _query_ranges(n0, q_len, k_len, window_left, window_right,
                                             BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    # The q heads of this kv head's GQA group, one after the other: dK and dV sum over them here
    # instead of through a [B, Hq, Sk, D] buffer or atomics.
    for g in range(GROUP):
        h64 = hk64 * GROUP + g
        q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start64 * stride_qs
        do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start64 * stride_dos
        lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start64 * stride_ls
        delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q_start64 * stride_ls
        bias_base = Bias
        if HAS_BIAS:
            bias_base = Bias + b64 * stride_bb + h64 * stride_bh
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, cols, offs_m, offs_d,
            lo, full_lo, q_len, k_len, diag, head_dim, stride_qs, stride_dos, stride_ls,
            stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, True, HAS_BIAS,
            HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, DOT_PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, cols, offs_m, offs_d,
            full_lo, full_hi, q_len, k_len, diag, head_dim, stride_qs, stride_dos, stride_ls,
            stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, False, HAS_BIAS,
            HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, DOT_PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, cols, offs_m, offs_d,
            full_hi, hi, q_len, k_len, diag, head_dim, stride_qs, stride_dos, stride_ls,
            stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, True, HAS_BIAS,
            HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, DOT_PRECISION, BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + c64[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + c64[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, bias_base,
    rows, offs_n, offs_d, start, end, q_len, k_len, diag, head_dim,
    stride_ks, stride_vs, stride_bm, stride_bn,
    sm_scale, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    d_ok = offs_d < head_dim
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        c64 = cols.to(tl.int64)
        if MASKED:
            mask = (cols < k_len)[None, :] & d_ok[:, None]
            kT = tl.load(k_base + c64[None, :] * stride_ks + offs_d[:, None], mask=mask, other=0.0)
            vT = tl.load(v_base + c64[None, :] * stride_vs + offs_d[:, None], mask=mask, other=0.0)
        else:
            if EVEN_D:
                kT = tl.load(k_base + c64[None, :] * stride_ks + offs_d[:, None])
                vT = tl.load(v_base + c64[None, :] * stride_vs + offs_d[:, None])
            else:
                kT = tl.load(k_base + c64[None, :] * stride_ks + offs_d[:, None],
                             mask=d_ok[:, None], other=0.0)
                vT = tl.load(v_base + c64[None, :] * stride_vs + offs_d[:, None],
                             mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        bias = qk
        if HAS_BIAS:
            b_ptrs = bias_base + rows.to(tl.int64)[:, None] * stride_bm + c64[None, :] * stride_bn
            bias = tl.load(b_ptrs, mask=(rows < q_len)[:, None] & (cols < k_len)[None, :],
                           other=0.0).to(tl.float32)
        s, t = _scores(qk, bias, rows[:, None], cols[None, :], q_len, k_len, diag, sm_scale,
                       softcap, window_left, window_right, HAS_BIAS, HAS_SOFTCAP, MASKED,
                       WINDOW_LEFT, WINDOW_RIGHT, False)
        p = tl.math.exp2(s - lse2[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, CuQ, CuK,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, seqlen_q, seqlen_k, head_dim,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(CuQ, CuK, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_start64 = tl.cast(q_start, tl.int64)
    k_start64 = tl.cast(k_start, tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    r64 = q_start64 + rows.to(tl.int64)
    row_ok = rows < q_len
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + r64[:, None] * stride_qs + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + r64[:, None] * stride_dos
                 + offs_d[None, :], mask=mask, other=0.0)
    lse = tl.load(Lse + b64 * stride_lb + h64 * stride_lh + r64 * stride_ls, mask=row_ok, other=0.0)
    delta = tl.load(Delta + b64 * stride_lb + h64 * stride_lh + r64 * stride_ls, mask=row_ok,
                    other=0.0)
    lse2 = tl.where(lse == float("-inf"), 0.0, lse * 1.4426950408889634)
    k_base = K + b64 * stride_kb + hk64 * stride_kh + k_start64 * stride_ks
    v_base = V + b64 * stride_vb + hk64 * stride_vh + k_start64 * stride_vs
    bias_base = Bias
    if HAS_BIAS:
        bias_base = Bias + b64 * stride_bb + h64 * stride_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = k_len - q_len
    lo, full_lo, full_hi, hi = _key_ranges(m0, q_len, k_len, window_left, window_right,
                                           BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, bias_base, rows, offs_n, offs_d, lo, full_lo,
        q_len, k_len, diag, head_dim, stride_ks, stride_vs, stride_bm, stride_bn, sm_scale,
        softcap, window_left, window_right, True, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT,
        WINDOW_RIGHT, EVEN_D, DOT_PRECISION, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, bias_base, rows, offs_n, offs_d, full_lo,
        full_hi, q_len, k_len, diag, head_dim, stride_ks, stride_vs, stride_bm, stride_bn,
        sm_scale, softcap, window_left, window_right, False, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT,
        WINDOW_RIGHT, EVEN_D, DOT_PRECISION, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, bias_base, rows, offs_n, offs_d, full_hi, hi,
        q_len, k_len, diag, head_dim, stride_ks, stride_vs, stride_bm, stride_bn, sm_scale,
        softcap, window_left, window_right, True, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT,
        WINDOW_RIGHT, EVEN_D, DOT_PRECISION, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + r64[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# int8 Q / K quantisation (the format of ops.attention.quantize_qk, bit-exact)


@triton.jit
def _quantize_blocks_kernel(
    X, Mean, Codes, Scale,
    stride_xb, stride_xh, stride_xs, stride_mb, stride_mh,
    stride_cb, stride_ch, stride_cs, stride_sb, stride_sh,
    H, S, head_dim,
    HAS_MEAN: tl.constexpr, QK_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per QK_BLOCK rows of one (batch, head): amax over the whole block, one scale.
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b64 = (pid_bh // H).to(tl.int64)
    h64 = (pid_bh % H).to(tl.int64)
    rows = blk * QK_BLOCK + tl.arange(0, QK_BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < S)[:, None] & (offs_d < head_dim)[None, :]
    x = tl.load(X + b64 * stride_xb + h64 * stride_xh + rows.to(tl.int64)[:, None] * stride_xs
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(Mean + b64 * stride_mb + h64 * stride_mh + offs_d, mask=offs_d < head_dim,
                       other=0.0)
        x = tl.where(mask, x - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    n_bad = amax * 0  # inputs are finite attention activations; no NaN row handling here
    scale = _scale_of(amax, n_bad)
    codes = _codes(x, scale, n_bad)
    tl.store(Codes + b64 * stride_cb + h64 * stride_ch + rows.to(tl.int64)[:, None] * stride_cs
             + offs_d[None, :], codes, mask=mask)
    tl.store(Scale + b64 * stride_sb + h64 * stride_sh + blk, scale)


def quantize_qk(q, k, smooth_k: bool, qk_block: int):
    """The Triton twin of ops.attention.quantize_qk (same codes and scales, bit for bit)."""
    def run(x, mean):
        b, h, s, d = x.shape
        nb = triton.cdiv(s, qk_block)
        codes = torch.empty((b, h, s, d), dtype=torch.int8, device=x.device)
        scale = torch.empty((b, h, nb), dtype=torch.float32, device=x.device)
        if s == 0:
            return codes, scale
        m = mean if mean is not None else scale
        _quantize_blocks_kernel[(nb, b * h)](
            x, m, codes, scale, x.stride(0), x.stride(1), x.stride(2),
            m.stride(0), m.stride(1) if m.dim() > 1 else 0,
            codes.stride(0), codes.stride(1), codes.stride(2), scale.stride(0), scale.stride(1),
            h, s, d, HAS_MEAN=mean is not None, QK_BLOCK=qk_block,
            BLOCK_D=max(16, C.next_power_of_2(d)), num_warps=4,
        )
        return codes, scale

    q = _last_dim_contiguous(q)
    k = _last_dim_contiguous(k)
    mean = k.float().mean(dim=2) if smooth_k else None  # [B, Hkv, D] fp32, as the reference
    qc, qs = run(q, None)
    kc, ks = run(k, mean.contiguous() if mean is not None else None)
    return qc, qs, kc, ks


# ---------------------------------------------------------------------------------------------
# Configs
#
# Forward: BLOCK_M x BLOCK_N tiles with the [BLOCK_M, BLOCK_D] fp32 accumulator and the Q tile
# in registers; K and V tiles pipelined through shared memory (num_stages copies). keep():
#   - shared memory: Q tile + num_stages x (K + V tiles) must fit the device;
#   - registers (`_regs_ok`): per-thread budgets for the fp32 accumulators and the 16-bit
#     operand tiles, fitted to ptxas: all 180 configs of the three kernels were compiled for
#     sm_90 with Triton 3.8 (no GPU needed; head dims 64/128/256, causal). The rules reject 55
#     of the 63 that spill (and 38 clean ones: they are estimates); the 8 kept spillers lose
#     8-264 bytes (dK/dV at 64 x 64, 4 warps, D=64 is the worst) and are left to the autotuner
#     to rank. sm_80 (mma.sync keeps more operands in registers) has not been swept;
#   - BLOCK_M no taller than the (bucketed) query length, except the 16-row minimum of tl.dot.
# Backward dK/dV: two [BLOCK_N, BLOCK_D] fp32 accumulators plus K and V held as operands; dQ:
# one [BLOCK_M, BLOCK_D] accumulator plus Q and dO. The tuned config is cached per (BLOCK_D,
# query/key length buckets, mask switches, dtype), on disk where Triton supports it.

SEQ_BUCKET_CAP = 16384


def seq_bucket(n: int) -> int:
    return min(C.next_power_of_2(max(int(n), 1)), SEQ_BUCKET_CAP)


def _cfg(num_warps, num_stages, **kw):
    return C.config(num_warps=num_warps, num_stages=num_stages, **kw)


FWD_CONFIGS = [
    _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn)
    for bm, w in ((16, 4), (32, 4), (64, 4), (128, 8))
    for bn in (32, 64, 128)
    for s in (2, 3)
]
DKDV_CONFIGS = [
    _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn)
    for bn, w in ((32, 4), (64, 4), (128, 8))
    for bm in (16, 32, 64)
    for s in (2, 3)
]
DQ_CONFIGS = [
    _cfg(w, s, BLOCK_M=bm, BLOCK_N=bn)
    for bm, w in ((32, 4), (64, 4), (128, 8))
    for bn in (16, 32, 64)
    for s in (2, 3)
]

# Interpreter: small, unequal tiles so odd lengths cover several ragged tiles and every
# masked/unmasked range (BLOCK_M != BLOCK_N catches code that assumes square tiles).
INTERPRETER_FWD = _cfg(4, 1, BLOCK_M=32, BLOCK_N=16)
INTERPRETER_DKDV = _cfg(4, 1, BLOCK_M=16, BLOCK_N=32)
INTERPRETER_DQ = _cfg(4, 1, BLOCK_M=32, BLOCK_N=16)


def _smem(cfg, kind, block_d, elem):
    kw = cfg.kwargs
    bm, bn, st = kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_stages
    if kind == "fwd":  # Q once, K and V per stage
        return elem * block_d * (bm + st * 2 * bn)
    if kind == "dkdv":  # K, V once; Q and dO per stage
        return elem * block_d * (2 * bn + st * 2 * bm)
    return elem * block_d * (2 * bm + st * 2 * bn)  # dq: Q, dO once; K, V per stage


def _regs_ok(kind, bm, bn, bd, w, stages) -> bool:
    """Register budget per thread (fp32 = 1 register, 16-bit = 1/2), fitted to ptxas on sm_90
    (see the comment above)."""
    threads = 32 * w
    if kind == "fwd":  # O accumulator <= 128 per thread; the streamed K/V tile <= 64
        return bm * bd <= 128 * threads and bn * bd <= 64 * threads
    if kind == "dq":  # dQ accumulator, Q and dO in registers
        return 2 * bm * bd <= 128 * threads and bn * bd <= 64 * threads
    # dK, dV accumulators (fp32), K and V as MMA operands (16-bit), the Q / dO tile, and the
    # [BLOCK_N, BLOCK_M] fp32 tiles S^T, dP^T, dS^T alive together; a third pipeline stage
    # needs headroom (its address and barrier registers)
    est = (2 * bn * bd + bn * bd + bm * bd + 3 * bn * bm) / threads
    return est <= (232 if stages <= 2 else 128)


def _soft_ok(cfg, kind, args) -> bool:
    kw = cfg.kwargs
    bm, bn, w = kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_warps
    bd = args["BLOCK_D"]
    if not _regs_ok(kind, bm, bn, bd, w, cfg.num_stages):
        return False
    _, smem = C.device_limits(args["Q"].device)
    if _smem(cfg, kind, bd, args["Q"].element_size()) > smem:
        return False
    sq, sk = args["SQ_BUCKET"], args["SK_BUCKET"]
    if bm > max(16, sq) or bn > max(16, sk):
        return False
    # Very small tiles only where the sequence is short: they halve the MMA efficiency.
    if kind == "fwd" and bm < 64 and sq >= 64:
        return False
    # The bias path loads a [BLOCK_M, BLOCK_N] tile of 64-bit addresses per step: 128 x 128
    # spilled kilobytes on sm_80 and sm_90.
    if args.get("HAS_BIAS") and bm * bn > 128 * 64:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _kept(kind, block_d, elem, sq, sk, device, has_bias=False):
    configs = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}[kind]
    fake = torch.empty(0, dtype={1: torch.int8, 2: torch.float16, 4: torch.float32}[elem],
                       device=device)
    args = {"BLOCK_D": block_d, "Q": fake, "SQ_BUCKET": sq, "SK_BUCKET": sk, "HAS_BIAS": has_bias}
    kept = [i for i, c in enumerate(configs) if _soft_ok(c, kind, args)]
    if not kept:  # an unusually small GPU: the config with the least shared memory
        kept = [min(range(len(configs)), key=lambda i: _smem(configs[i], kind, block_d, elem))]
    return frozenset(kept)


def _keep_for(kind):
    configs = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}[kind]

    def keep(cfg, args):
        if args.get("_hard_only"):
            return True
        kept = _kept(kind, args["BLOCK_D"], args["Q"].element_size(), args["SQ_BUCKET"],
                     args["SK_BUCKET"], args["Q"].device, bool(args["HAS_BIAS"]))
        return configs.index(cfg) in kept

    return keep


_KEY = ["BLOCK_D", "SQ_BUCKET", "SK_BUCKET", "IS_VARLEN", "HAS_BIAS", "HAS_SOFTCAP",
        "WINDOW_LEFT", "WINDOW_RIGHT"]
_fwd_tuned = C.autotune(FWD_CONFIGS, key=[*_KEY, "QK_INT8"], keep=_keep_for("fwd"))(_fwd_kernel)
_dkdv_tuned = C.autotune(DKDV_CONFIGS, key=_KEY, keep=_keep_for("dkdv"))(_bwd_dkdv_kernel)
_dq_tuned = C.autotune(DQ_CONFIGS, key=_KEY, keep=_keep_for("dq"))(_bwd_dq_kernel)

# Without autotuning (LEANOPS_TRITON_AUTOTUNE=0): the kept config closest to a middle-of-the-road
# tile (fwd 128 x 64, dK/dV 64 keys x 32 queries, dQ 64 x 32), 2 stages.
_TARGETS = {"fwd": (128, 64), "dkdv": (32, 64), "dq": (64, 32)}


def _default(kind, args):
    configs = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}[kind]
    kept = _kept(kind, args["BLOCK_D"], args["Q"].element_size(), args["SQ_BUCKET"],
                 args["SK_BUCKET"], args["Q"].device, bool(args["HAS_BIAS"]))
    tm, tn = _TARGETS[kind]

    def dist(i):
        c = configs[i]
        return (abs(math.log2(c.kwargs["BLOCK_M"] / tm)) + abs(math.log2(c.kwargs["BLOCK_N"] / tn))
                + (c.num_stages != 2), i)

    return configs[min(kept, key=dist)]


def _launch(kind, raw, tuned, grid, args: dict, cfg=None):
    """Run kernel `raw` (or its autotuned twin) with the named arguments `args`: a forced
    config, the fixed interpreter config, the default config, or the autotuner's pick."""
    if cfg is None and C.interpreter():
        cfg = {"fwd": INTERPRETER_FWD, "dkdv": INTERPRETER_DKDV, "dq": INTERPRETER_DQ}[kind]
    elif cfg is None and not C.autotune_enabled():
        cfg = _default(kind, args)
    # Fp contraction stays on here (unlike _common.LAUNCH_OPTIONS): these kernels are judged by
    # error bounds, not bit-exactness, and the softmax update s * c - m is one FMA per score.
    if cfg is not None:
        raw[grid](**args, **C.config_kwargs(cfg))
    else:
        tuned[grid](**args)


# ---------------------------------------------------------------------------------------------
# Launchers


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _layout(t, varlen):
    """(stride_b, stride_h, stride_s) of a dense [B, H, S, D] or varlen [T, H, D] tensor."""
    if varlen:
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_layout(lse, varlen):
    if varlen:  # [H, T]
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)


def _bias_layout(bias):
    if bias is None:
        return 0, 0, 0, 0
    # size-1 (broadcast) dims are read with stride 0
    return tuple(0 if bias.shape[i] == 1 else bias.stride(i) for i in range(4))


def _problem(q, k, cu_q, max_q, max_k):
    varlen = cu_q is not None
    if varlen:
        batch, hq, d = cu_q.shape[0] - 1, q.shape[1], q.shape[2]
        hkv = k.shape[1]
        sq, sk = int(max_q), int(max_k)
    else:
        batch, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
    return varlen, batch, hq, hkv, sq, sk, d


def _common_meta(q, d, sq, sk, varlen, bias, softcap, wl, wr):
    block_d = max(16, C.next_power_of_2(d))
    return dict(
        SQ_BUCKET=seq_bucket(sq), SK_BUCKET=seq_bucket(sk), IS_VARLEN=varlen,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, WINDOW_LEFT=wl >= 0,
        WINDOW_RIGHT=wr >= 0, EVEN_D=block_d == d, DOT_PRECISION=C.dot_precision(q.dtype),
        BLOCK_D=block_d,
    )


def _fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, cfg=None, path=None,
         int8=None):
    """Forward launcher. path: None (choose), "flash" or "decode" (tests force one). int8:
    None or (q_codes, q_scale, k_codes, k_scale, QK_BLOCK) for the int8 Q K^T variant."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    varlen, batch, hq, hkv, sq, sk, d = _problem(q, k, cu_q, max_q, max_k)
    out = torch.empty_like(q)
    lse = torch.empty((hq, q.shape[0]) if varlen else (batch, hq, sq), dtype=torch.float32,
                      device=q.device)
    if path is None:
        from leanops.triton import attention_decode

        path = "decode" if (int8 is None and attention_decode.use_decode_path(
            q, k, bias, varlen, sq, sk)) else "flash"
    if path == "decode":
        from leanops.triton import attention_decode

        attention_decode.decode_into(out, lse, q, k, v, None, None, scale, wl, wr, softcap)
        return out, lse

    group = hq // hkv
    if int8 is not None:
        qc, qs, kc, ks, qk_block = int8
        q_in, k_in = qc, kc
        scale_strides = (qs.stride(0), qs.stride(1), ks.stride(0), ks.stride(1))
    else:
        q_in, k_in, qs, ks, qk_block = q, k, lse, lse, 1
        scale_strides = (0, 0, 0, 0)
    meta = _common_meta(q, d, sq, sk, varlen, bias, softcap, wl, wr)
    if int8 is not None:
        meta["DOT_PRECISION"] = "tf32"  # unused by the int8 dot
    dummy = lse
    cu_q_, cu_k_ = (cu_q, cu_k) if varlen else (dummy, dummy)
    def grid(m):
        return (triton.cdiv(sq, m["BLOCK_M"]), batch * hq)

    args = dict(
        Q=q_in, K=k_in, V=v, Bias=bias if bias is not None else dummy, Out=out, Lse=lse,
        CuQ=cu_q_, CuK=cu_k_, QScale=qs, KScale=ks,
        sm_scale=float(scale), softcap=float(softcap) if softcap > 0 else 1.0,
        window_left=max(wl, 0), window_right=max(wr, 0),
        **dict(zip(("stride_qb", "stride_qh", "stride_qs"), _layout(q_in, varlen), strict=True)),
        **dict(zip(("stride_kb", "stride_kh", "stride_ks"), _layout(k_in, varlen), strict=True)),
        **dict(zip(("stride_vb", "stride_vh", "stride_vs"), _layout(v, varlen), strict=True)),
        **dict(zip(("stride_ob", "stride_oh", "stride_os"), _layout(out, varlen), strict=True)),
        **dict(zip(("stride_lb", "stride_lh", "stride_ls"), _lse_layout(lse, varlen), strict=True)),
        **dict(zip(("stride_bb", "stride_bh", "stride_bm", "stride_bn"), _bias_layout(bias),
                   strict=True)),
        **dict(zip(("stride_qsb", "stride_qsh", "stride_ksb", "stride_ksh"), scale_strides,
                   strict=True)),
        H=hq, GROUP=group, seqlen_q=sq, seqlen_k=sk, head_dim=d,
        QK_INT8=int8 is not None, QK_BLOCK=qk_block, **meta,
    )
    with C.device_guard(q):
        _launch("fwd", _fwd_kernel, _fwd_tuned, grid, args, cfg)
    return out, lse


def attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    """Triton kernel of leanops::attention_fwd (arguments validated by the op)."""
    return _fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)


def _bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap,
         cfg_dkdv=None, cfg_dq=None):
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    varlen, batch, hq, hkv, sq, sk, d = _problem(q, k, cu_q, max_q, max_k)
    group = hq // hkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    meta = _common_meta(q, d, sq, sk, varlen, bias, softcap, wl, wr)
    dummy = lse
    cu_q_, cu_k_ = (cu_q, cu_k) if varlen else (dummy, dummy)
    lse_strides = _lse_layout(lse, varlen)
    common = dict(
        Q=q, K=k, V=v, Bias=bias if bias is not None else dummy, DO=grad_out, Lse=lse,
        Delta=delta, CuQ=cu_q_, CuK=cu_k_,
        sm_scale=float(scale), softcap=float(softcap) if softcap > 0 else 1.0,
        window_left=max(wl, 0), window_right=max(wr, 0),
        **dict(zip(("stride_qb", "stride_qh", "stride_qs"), _layout(q, varlen), strict=True)),
        **dict(zip(("stride_kb", "stride_kh", "stride_ks"), _layout(k, varlen), strict=True)),
        **dict(zip(("stride_vb", "stride_vh", "stride_vs"), _layout(v, varlen), strict=True)),
        **dict(zip(("stride_dob", "stride_doh", "stride_dos"), _layout(grad_out, varlen),
                   strict=True)),
        **dict(zip(("stride_lb", "stride_lh", "stride_ls"), lse_strides, strict=True)),
        **dict(zip(("stride_bb", "stride_bh", "stride_bm", "stride_bn"), _bias_layout(bias),
                   strict=True)),
        GROUP=group, seqlen_q=sq, seqlen_k=sk, head_dim=d, **meta,
    )
    block_d = meta["BLOCK_D"]
    with C.device_guard(q):
        pre_m = 64
        _bwd_preprocess_kernel[(triton.cdiv(sq, pre_m), batch * hq)](
            out, grad_out, delta, cu_q_, cu_k_,
            *_layout(out, varlen), *_layout(grad_out, varlen), *lse_strides,
            hq, sq, sk, d, IS_VARLEN=varlen, BLOCK_M=pre_m, BLOCK_D=block_d, num_warps=4,
        )
        dkdv_args = dict(
            common, DK=dk, DV=dv, H_KV=hkv,
            **dict(zip(("stride_dkb", "stride_dkh", "stride_dks"), _layout(dk, varlen), strict=True)),
            **dict(zip(("stride_dvb", "stride_dvh", "stride_dvs"), _layout(dv, varlen), strict=True)),
        )
        _launch("dkdv", _bwd_dkdv_kernel, _dkdv_tuned,
                lambda m: (triton.cdiv(sk, m["BLOCK_N"]), batch * hkv), dkdv_args, cfg_dkdv)
        dq_args = dict(
            common, DQ=dq, H=hq,
            **dict(zip(("stride_dqb", "stride_dqh", "stride_dqs"), _layout(dq, varlen), strict=True)),
        )
        _launch("dq", _bwd_dq_kernel, _dq_tuned,
                lambda m: (triton.cdiv(sq, m["BLOCK_M"]), batch * hq), dq_args, cfg_dq)
    return dq, dk, dv


def attention_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                  softcap):
    """Triton kernels of leanops::attention_bwd (arguments validated by the op)."""
    return _bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)


QK_BLOCK = 64  # must equal leanops.ops.attention.QK_BLOCK (a test checks it)


def attention_int8(q, k, v, scale, wl, wr, softcap, smooth_k, cfg=None):
    """Triton kernels of leanops::attention_int8: quantise Q and K (per QK_BLOCK rows, K
    smoothed by its mean), then the forward kernel with an int8 Q K^T."""
    qc, qs, kc, ks = quantize_qk(q, k, smooth_k, QK_BLOCK)
    out, _ = _fwd(q, k, v, None, None, None, 0, 0, scale, wl, wr, softcap, cfg=cfg, path="flash",
                  int8=(qc, qs, kc, ks, QK_BLOCK))
    return out
