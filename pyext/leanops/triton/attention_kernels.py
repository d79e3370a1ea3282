"""Fused attention in Triton: the flash-attention-2 algorithm, forward and backward.

Definitions (scores, masks, layouts) are leanops.ops.attention's; this file only computes them.
The configs, keep() rules and launchers are in leanops.triton.attention; the jit helpers shared
with the decode kernel (leanops.triton.attention_decode) are the public names here: `scores`,
`online_softmax_update` and `finalize`.

Forward (`fwd_kernel`, one program per [BLOCK_M queries] x (batch, q head)): Q tile in registers,
loop over BLOCK_N-key tiles of K and V: S = Q K^T, online softmax in fp32 with the base-2
exponent (scores pre-multiplied by log2(e), exp2 is one MUFU instruction), running max m and sum
l, O = O * exp2(m_old - m_new) + P V with P rounded to V's dtype; at the end O / l and
lse = (m + log2 l) * ln 2 (natural log, the op's lse). No Sq x Sk matrix ever exists in memory.

Masks without per-element work where possible: the key loop runs in three ranges computed per
query block, [lo, full_lo) and [full_hi, hi) with the mask (left window edge; causal diagonal /
right window edge / ragged end of K) and [full_lo, full_hi) without any mask, and key blocks no
query of the block can see are never visited (causal skips the upper triangle, a sliding window
everything outside its band).

Backward (FA2): a preprocess kernel delta = rowsum(dO * O); `bwd_dkdv_kernel`, one program per
[BLOCK_N keys] x (batch, kv head), loops over the q heads of its GQA group and the query blocks
that can see its keys, recomputing P = exp2(S - lse) and accumulating dV += P^T dO,
dK += dS^T Q with dS = P * (dP - delta), dP = dO V^T; `bwd_dq_kernel`, one program per
[BLOCK_M queries] x (batch, q head), recomputes P and dS and accumulates dQ += dS K. Every output
is written once by one program: deterministic, no atomics, and GQA never materialises repeated
K/V (dK/dV of a kv head sum over its q heads inside one program). The price against
flash-attention's atomic dQ is recomputing Q K^T and dO V^T once more (7 matmuls instead of 5).

GQA: q head h reads kv head h // GROUP. Varlen: `IS_VARLEN` reads each sequence's start and
length from cu_seqlens and the batch stride is 0. Head dims that are not powers of two (80, 96,
112, ...) run with BLOCK_D = next power of two and masked loads (`EVEN_D` drops the masks).
The value head dim Dv may differ from the query/key one D (DeepSeek's 192/128): V, O, dO and dV
tiles are [*, BLOCK_DV] with their own `head_dim_v` and `EVEN_DV`; Q, K, dQ and dK keep D.
All offsets that scale with batch, head or sequence are int64.

int8 Q K^T (SageAttention-style, `attention_int8`): the same forward kernel with QK_INT8: Q and K
arrive as int8 codes with one fp32 scale per QK_BLOCK rows (`quantize_blocks_kernel`), the
product accumulates in int32 and is scaled once per score; P V stays 16-bit.
"""

from __future__ import annotations

import warnings

import triton
import triton.language as tl

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
def scores(qk, bias, rows, cols, q_len, k_len, diag, sm_scale, softcap, window_left,
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
def online_softmax_update(acc, l_i, m_i, s, v, MASKED: tl.constexpr, HAS_BIAS: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax (flash-attention 2): s [M, N] base-2 scores of the
    tile, v [N, D] its values; the running max m_i, sum l_i and unnormalised output acc [M, D]
    are rescaled to the new max and the tile added, P rounded to v's dtype for the P V dot.
    Returns (acc, l_i, m_i)."""
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
    return acc, l_i, m_new


@triton.jit
def finalize(acc, l_i, m_i):
    """(out, lse) of rows after the last tile: out = acc / l and lse = (m + log2 l) * ln 2 (the
    op's natural-log lse). Rows that saw no key (l = 0) get out 0 and lse -inf, the op's
    convention."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"),
                   (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    return out, lse


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
    QK_BLOCK: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # K and V tiles come through block pointers: only a scalar offset is carried around the
    # loop. A loop-carried [BLOCK_D, BLOCK_N] tensor of 64-bit pointers (pointer increments)
    # costs 2 registers per element per thread and made every D = 128 config spill (ptxas).
    k_block = tl.advance(k_block, (0, start))
    v_block = tl.advance(v_block, (start, 0))
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        if MASKED:  # ragged K end (and D, Dv) zero-filled; scores masked below
            k = tl.load(k_block, boundary_check=(0, 1), padding_option="zero")
            v = tl.load(v_block, boundary_check=(0, 1), padding_option="zero")
        else:
            if EVEN_D:
                k = tl.load(k_block)
            else:
                k = tl.load(k_block, boundary_check=(0,), padding_option="zero")
            if EVEN_DV:
                v = tl.load(v_block)
            else:
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
        s, _t = scores(qk, bias, rows[:, None], cols[None, :], q_len, k_len, diag, sm_scale,
                       softcap, window_left, window_right, HAS_BIAS, HAS_SOFTCAP, MASKED,
                       WINDOW_LEFT, WINDOW_RIGHT, False)
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, s, v, MASKED, HAS_BIAS,
                                              DOT_PRECISION)
        k_block = tl.advance(k_block, (0, BLOCK_N))
        v_block = tl.advance(v_block, (BLOCK_N, 0))
    return acc, l_i, m_i


@triton.jit
def fwd_kernel(
    Q, K, V, Bias, Out, Lse, CuQ, CuK, QScale, KScale,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh,
    H, GROUP, seqlen_q, seqlen_k, head_dim, head_dim_v,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, QK_INT8: tl.constexpr,
    QK_BLOCK: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    # K read as the [BLOCK_D, BLOCK_N] operand of Q K^T, V as [BLOCK_N, BLOCK_DV]
    k_block = tl.make_block_ptr(K + b64 * stride_kb + hk64 * stride_kh + k_start64 * stride_ks,
                                shape=(head_dim, k_len), strides=(1, stride_ks), offsets=(0, 0),
                                block_shape=(BLOCK_D, BLOCK_N), order=(0, 1))
    v_block = tl.make_block_ptr(V + b64 * stride_vb + hk64 * stride_vh + k_start64 * stride_vs,
                                shape=(k_len, head_dim_v), strides=(stride_vs, 1), offsets=(0, 0),
                                block_shape=(BLOCK_N, BLOCK_DV), order=(1, 0))
    bias_base = Bias
    if HAS_BIAS:
        bias_base = Bias + b64 * stride_bb + h64 * stride_bh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    diag = k_len - q_len
    lo, full_lo, full_hi, hi = _key_ranges(m0, q_len, k_len, window_left, window_right,
                                           BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    # left edge of a sliding window (masked)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, q_scale, k_block, v_block, bias_base, ks_base, rows, offs_n, lo,
        full_lo, q_len, k_len, diag, stride_bm, stride_bn, sm_scale, softcap, window_left,
        window_right, True, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, QK_INT8,
        QK_BLOCK, EVEN_D, EVEN_DV, DOT_PRECISION, BLOCK_N)
    # interior: every row sees every key of these tiles (no mask)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, q_scale, k_block, v_block, bias_base, ks_base, rows, offs_n, full_lo,
        full_hi, q_len, k_len, diag, stride_bm, stride_bn, sm_scale, softcap, window_left,
        window_right, False, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, QK_INT8,
        QK_BLOCK, EVEN_D, EVEN_DV, DOT_PRECISION, BLOCK_N)
    # causal diagonal / right window edge / ragged end of K (masked)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, q_scale, k_block, v_block, bias_base, ks_base, rows, offs_n, full_hi,
        hi, q_len, k_len, diag, stride_bm, stride_bn, sm_scale, softcap, window_left,
        window_right, True, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, QK_INT8,
        QK_BLOCK, EVEN_D, EVEN_DV, DOT_PRECISION, BLOCK_N)

    out, lse = finalize(acc, l_i, m_i)
    o_block = tl.make_block_ptr(Out + b64 * stride_ob + h64 * stride_oh + q_start64 * stride_os,
                                shape=(q_len, head_dim_v), strides=(stride_os, 1),
                                offsets=(m0, 0), block_shape=(BLOCK_M, BLOCK_DV), order=(1, 0))
    tl.store(o_block, out.to(Out.dtype.element_ty), boundary_check=(0, 1))
    l_ptrs = Lse + b64 * stride_lb + h64 * stride_lh + (q_start64 + rows.to(tl.int64)) * stride_ls
    tl.store(l_ptrs, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# Backward


@triton.jit
def bwd_preprocess_kernel(
    Out, DO, Delta, CuQ, CuK,
    stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_ds,
    stride_lb, stride_lh, stride_ls,
    H, seqlen_q, seqlen_k, head_dim,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_d dO[i, d] * O[i, d] (= rowsum(P * dP), the softmax backward's row term);
    # head_dim / BLOCK_D here are the value head dim's (O and dO are [S, Dv])
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
    cols, offs_m, offs_d, offs_dv, start, end, q_len, k_len, diag, head_dim, head_dim_v,
    stride_qs, stride_dos, stride_ls, stride_bm, stride_bn,
    sm_scale, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Works on transposed tiles (S^T [BLOCK_N, BLOCK_M]) so that dV += P^T dO and dK += dS^T Q
    # are plain dots with no register transpose of P or dS.
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + offs_m
        r64 = rows.to(tl.int64)
        if MASKED:
            row_ok = rows < q_len
            qT = tl.load(q_base + r64[None, :] * stride_qs + offs_d[:, None],
                         mask=row_ok[None, :] & d_ok[:, None], other=0.0)
            do = tl.load(do_base + r64[:, None] * stride_dos + offs_dv[None, :],
                         mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
            lse = tl.load(lse_base + r64 * stride_ls, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + r64 * stride_ls, mask=row_ok, other=0.0)
        else:
            if EVEN_D:
                qT = tl.load(q_base + r64[None, :] * stride_qs + offs_d[:, None])
            else:
                qT = tl.load(q_base + r64[None, :] * stride_qs + offs_d[:, None],
                             mask=d_ok[:, None], other=0.0)
            if EVEN_DV:
                do = tl.load(do_base + r64[:, None] * stride_dos + offs_dv[None, :])
            else:
                do = tl.load(do_base + r64[:, None] * stride_dos + offs_dv[None, :],
                             mask=dv_ok[None, :], other=0.0)
            lse = tl.load(lse_base + r64 * stride_ls)
            delta = tl.load(delta_base + r64 * stride_ls)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
        bias = qkT
        if HAS_BIAS:
            b_ptrs = bias_base + r64[None, :] * stride_bm + cols.to(tl.int64)[:, None] * stride_bn
            bias = tl.load(b_ptrs, mask=(rows < q_len)[None, :] & (cols < k_len)[:, None],
                           other=0.0).to(tl.float32)
        sT, tT = scores(qkT, bias, rows[None, :], cols[:, None], q_len, k_len, diag, sm_scale,
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
def bwd_dkdv_kernel(
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
    H_KV, GROUP, seqlen_q, seqlen_k, head_dim, head_dim_v,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    offs_dv = tl.arange(0, BLOCK_DV)
    cols = n0 + tl.arange(0, BLOCK_N)
    c64 = k_start64 + cols.to(tl.int64)
    k_mask = (cols < k_len)[:, None] & (offs_d < head_dim)[None, :]
    v_mask = (cols < k_len)[:, None] & (offs_dv < head_dim_v)[None, :]
    k = tl.load(K + b64 * stride_kb + hk64 * stride_kh + c64[:, None] * stride_ks + offs_d[None, :],
                mask=k_mask, other=0.0)
    v = tl.load(V + b64 * stride_vb + hk64 * stride_vh + c64[:, None] * stride_vs
                + offs_dv[None, :], mask=v_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
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
            offs_dv, lo, full_lo, q_len, k_len, diag, head_dim, head_dim_v, stride_qs, stride_dos,
            stride_ls, stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, True,
            HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION,
            BLOCK_M)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, cols, offs_m, offs_d,
            offs_dv, full_lo, full_hi, q_len, k_len, diag, head_dim, head_dim_v, stride_qs,
            stride_dos, stride_ls, stride_bm, stride_bn, sm_scale, softcap, window_left,
            window_right, False, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV,
            DOT_PRECISION, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, bias_base, cols, offs_m, offs_d,
            offs_dv, full_hi, hi, q_len, k_len, diag, head_dim, head_dim_v, stride_qs, stride_dos,
            stride_ls, stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, True,
            HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION,
            BLOCK_M)
    dk = dk * sm_scale
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + c64[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + c64[:, None] * stride_dvs
             + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, bias_base,
    rows, offs_n, offs_d, offs_dv, start, end, q_len, k_len, diag, head_dim, head_dim_v,
    stride_ks, stride_vs, stride_bm, stride_bn,
    sm_scale, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    d_ok = offs_d < head_dim
    dv_ok = offs_dv < head_dim_v
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        c64 = cols.to(tl.int64)
        if MASKED:
            col_ok = (cols < k_len)[None, :]
            kT = tl.load(k_base + c64[None, :] * stride_ks + offs_d[:, None],
                         mask=col_ok & d_ok[:, None], other=0.0)
            vT = tl.load(v_base + c64[None, :] * stride_vs + offs_dv[:, None],
                         mask=col_ok & dv_ok[:, None], other=0.0)
        else:
            if EVEN_D:
                kT = tl.load(k_base + c64[None, :] * stride_ks + offs_d[:, None])
            else:
                kT = tl.load(k_base + c64[None, :] * stride_ks + offs_d[:, None],
                             mask=d_ok[:, None], other=0.0)
            if EVEN_DV:
                vT = tl.load(v_base + c64[None, :] * stride_vs + offs_dv[:, None])
            else:
                vT = tl.load(v_base + c64[None, :] * stride_vs + offs_dv[:, None],
                             mask=dv_ok[:, None], other=0.0)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)
        bias = qk
        if HAS_BIAS:
            b_ptrs = bias_base + rows.to(tl.int64)[:, None] * stride_bm + c64[None, :] * stride_bn
            bias = tl.load(b_ptrs, mask=(rows < q_len)[:, None] & (cols < k_len)[None, :],
                           other=0.0).to(tl.float32)
        s, t = scores(qk, bias, rows[:, None], cols[None, :], q_len, k_len, diag, sm_scale,
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
def bwd_dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, CuQ, CuK,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn,
    H, GROUP, seqlen_q, seqlen_k, head_dim, head_dim_v,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = m0 + offs_m
    r64 = q_start64 + rows.to(tl.int64)
    row_ok = rows < q_len
    mask = row_ok[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + r64[:, None] * stride_qs + offs_d[None, :],
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_dob + h64 * stride_doh + r64[:, None] * stride_dos
                 + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv < head_dim_v)[None, :],
                 other=0.0)
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
        dq, q, do, lse2, delta, k_base, v_base, bias_base, rows, offs_n, offs_d, offs_dv, lo,
        full_lo, q_len, k_len, diag, head_dim, head_dim_v, stride_ks, stride_vs, stride_bm,
        stride_bn, sm_scale, softcap, window_left, window_right, True, HAS_BIAS, HAS_SOFTCAP,
        WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, bias_base, rows, offs_n, offs_d, offs_dv, full_lo,
        full_hi, q_len, k_len, diag, head_dim, head_dim_v, stride_ks, stride_vs, stride_bm,
        stride_bn, sm_scale, softcap, window_left, window_right, False, HAS_BIAS, HAS_SOFTCAP,
        WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, bias_base, rows, offs_n, offs_d, offs_dv, full_hi,
        hi, q_len, k_len, diag, head_dim, head_dim_v, stride_ks, stride_vs, stride_bm, stride_bn,
        sm_scale, softcap, window_left, window_right, True, HAS_BIAS, HAS_SOFTCAP, WINDOW_LEFT,
        WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, BLOCK_N)
    dq = dq * sm_scale
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + r64[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# int8 Q / K quantisation (the format of leanops.quant.int8.quantize_qk, bit-exact)


@triton.jit
def quantize_blocks_kernel(
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
