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

int8 (`attention_int8`, leanops.ops.int8_attention has the definition): the same kernels with
QK_INT8. Q and K arrive as int8 codes with one fp32 scale per QK_BLOCK rows of each sequence
(`quantize_blocks_kernel`; slots per sequence for varlen, `_block_slot`); Q K^T accumulates in
int32 and is scaled once per score; P V stays in V's dtype. The backward recomputes S from the
same codes, keeps dP = dO V^T in 16 bits, and runs dV = P^T dO, dK = dS^T Q and dQ = dS K as
int8 dots: P and dS are quantised per row over their QK_BLOCK-wide tile of the reduced axis
(`_row_tile_codes`), dO arrives as codes per QK_BLOCK rows, and dQ / dK are rescaled by the
per-channel balance of the Q/K format at the end.
"""

from __future__ import annotations

import warnings

import triton
import triton.language as tl

from leanops.triton.quantize import FLT_MIN, QMAX, RNE_MAGIC, _codes, _scale_of

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
def _block_slot(start, b, IS_VARLEN: tl.constexpr, QK_BLOCK: tl.constexpr):
    """Scale slot of the first QK_BLOCK-row block of sequence b (leanops.quant.int8.block_slot):
    0 in a dense batch entry (its scales have their own batch stride), start // QK_BLOCK + b in
    a varlen batch. int64."""
    if IS_VARLEN:
        return tl.cast(start // QK_BLOCK + b, tl.int64)
    return tl.cast(start * 0, tl.int64)


@triton.jit
def _qk_scales(QScale, KScale, b, b64, h64, hk64, stride_qsb, stride_qsh, stride_ksb, stride_ksh,
               q_start, k_start, rows, row_ok, IS_VARLEN: tl.constexpr, QK_BLOCK: tl.constexpr):
    """int8 Q K^T's scales for the query rows `rows` of sequence b, q head h64: Q's, one per row
    (its block's), and the base of kv head hk64's K block scales (indexed by key // QK_BLOCK)."""
    q_scale = tl.load(QScale + b64 * stride_qsb + h64 * stride_qsh
                      + _block_slot(q_start, b, IS_VARLEN, QK_BLOCK) + rows // QK_BLOCK,
                      mask=row_ok, other=0.0)
    ks_base = (KScale + b64 * stride_ksb + hk64 * stride_ksh
               + _block_slot(k_start, b, IS_VARLEN, QK_BLOCK))
    return q_scale, ks_base


@triton.jit
def _row_tile_codes(x):
    """int8 codes and fp32 scales [rows] of a tile x [rows, QK_BLOCK] of P or dS, one scale per
    row (leanops.quant.int8.fake_quantize_row_tiles). The scale is the reference's (IEEE
    division); codes multiply by its reciprocal instead of dividing: two tiles per step of the
    backward's inner loops, and P and dS already differ from the reference by fp32 rounding, so
    bit-exactness is not on offer here anyway."""
    scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(x), 1), QMAX), FLT_MIN)
    r = (x * (1.0 / scale)[:, None] + RNE_MAGIC) - RNE_MAGIC
    return tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8), scale


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
        q_scale, ks_base = _qk_scales(QScale, KScale, b, b64, h64, hk64, stride_qsb, stride_qsh,
                                      stride_ksb, stride_ksh, q_start, k_start, rows, row_ok,
                                      IS_VARLEN, QK_BLOCK)
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
    dk, dv, k, v, k_scale, q_base, do_base, lse_base, delta_base, bias_base, qs_base, doc_base,
    dos_base, cols, offs_m, offs_d, offs_dv, start, end, q_len, k_len, diag, head_dim,
    head_dim_v, stride_qs, stride_dos, stride_ls, stride_bm, stride_bn,
    sm_scale, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_INT8: tl.constexpr,
    QK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Works on transposed tiles (S^T [BLOCK_N, BLOCK_M]) so that dV += P^T dO and dK += dS^T Q
    # are plain dots with no register transpose of P or dS.
    # QK_INT8: q_base holds Q's int8 codes, k is K's (k_scale: one scale per key); the query
    # tile is exactly one QK_BLOCK-row block (BLOCK_M == QK_BLOCK, enforced by the launcher), so
    # Q's and dO's block scales are scalars here, and the rows of P^T and dS^T quantise over it.
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
        if QK_INT8:
            q_scale = tl.load(qs_base + m0 // QK_BLOCK)
            qkT = tl.dot(k, qT, out_dtype=tl.int32).to(tl.float32) * q_scale * k_scale[:, None]
        else:
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
        if QK_INT8:  # dV += P^T dO in int8 (dO's codes: same layout as dO)
            doc = tl.load(doc_base + r64[:, None] * stride_dos + offs_dv[None, :],
                          mask=(rows < q_len)[:, None] & dv_ok[None, :], other=0)
            pc, ps = _row_tile_codes(pT)
            dv += (tl.dot(pc, doc, out_dtype=tl.int32).to(tl.float32)
                   * (ps[:, None] * tl.load(dos_base + m0 // QK_BLOCK)))
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        if QK_INT8:  # dK += dS^T Q in int8
            dc, dsc = _row_tile_codes(dsT)
            dk += (tl.dot(dc, tl.trans(qT), out_dtype=tl.int32).to(tl.float32)
                   * (dsc[:, None] * q_scale))
        else:
            dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DK, DV, CuQ, CuK, QScale, KScale, DOCodes, DOScale, Balance,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_bab, stride_bah,
    H_KV, GROUP, seqlen_q, seqlen_k, head_dim, head_dim_v,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_INT8: tl.constexpr,
    QK_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # QK_INT8 (attention_int8): Q and K are int8 codes with their block scales (QScale, KScale;
    # dO's codes DOCodes / DOScale share DO's and QScale's layouts) and dK is rescaled by the
    # per-channel Balance at the end; see leanops.ops.int8_attention for which products are int8.
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
    k_scale = cols  # placeholder when not QK_INT8 (never read)
    q_slot = q_start64 * 0
    if QK_INT8:
        k_scale = tl.load(KScale + b64 * stride_ksb + hk64 * stride_ksh
                          + _block_slot(k_start, b, IS_VARLEN, QK_BLOCK) + cols // QK_BLOCK,
                          mask=cols < k_len, other=0.0)
        q_slot = _block_slot(q_start, b, IS_VARLEN, QK_BLOCK)
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
        doc_base = DOCodes + b64 * stride_dob + h64 * stride_doh + q_start64 * stride_dos
        lse_base = Lse + b64 * stride_lb + h64 * stride_lh + q_start64 * stride_ls
        delta_base = Delta + b64 * stride_lb + h64 * stride_lh + q_start64 * stride_ls
        qs_base = QScale + b64 * stride_qsb + h64 * stride_qsh + q_slot
        dos_base = DOScale + b64 * stride_qsb + h64 * stride_qsh + q_slot
        bias_base = Bias
        if HAS_BIAS:
            bias_base = Bias + b64 * stride_bb + h64 * stride_bh
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, k_scale, q_base, do_base, lse_base, delta_base, bias_base, qs_base,
            doc_base, dos_base, cols, offs_m, offs_d, offs_dv, lo, full_lo, q_len, k_len, diag,
            head_dim, head_dim_v, stride_qs, stride_dos, stride_ls, stride_bm, stride_bn,
            sm_scale, softcap, window_left, window_right, True, HAS_BIAS, HAS_SOFTCAP,
            WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, QK_INT8, QK_BLOCK, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, k_scale, q_base, do_base, lse_base, delta_base, bias_base, qs_base,
            doc_base, dos_base, cols, offs_m, offs_d, offs_dv, full_lo, full_hi, q_len, k_len, diag,
            head_dim, head_dim_v, stride_qs, stride_dos, stride_ls, stride_bm, stride_bn,
            sm_scale, softcap, window_left, window_right, False, HAS_BIAS, HAS_SOFTCAP,
            WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, QK_INT8, QK_BLOCK, BLOCK_M)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, k_scale, q_base, do_base, lse_base, delta_base, bias_base, qs_base,
            doc_base, dos_base, cols, offs_m, offs_d, offs_dv, full_hi, hi, q_len, k_len, diag,
            head_dim, head_dim_v, stride_qs, stride_dos, stride_ls, stride_bm, stride_bn,
            sm_scale, softcap, window_left, window_right, True, HAS_BIAS, HAS_SOFTCAP,
            WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, QK_INT8, QK_BLOCK, BLOCK_M)
    dk = dk * sm_scale
    if QK_INT8:  # dK of the balanced k * b is b times dK of k's codes (b a power of two: exact)
        dk = dk * tl.load(Balance + b64 * stride_bab + hk64 * stride_bah + offs_d,
                          mask=offs_d < head_dim, other=1.0)[None, :]
    tl.store(DK + b64 * stride_dkb + hk64 * stride_dkh + c64[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + b64 * stride_dvb + hk64 * stride_dvh + c64[:, None] * stride_dvs
             + offs_dv[None, :], dv.to(DV.dtype.element_ty), mask=v_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, q_scale, do, lse2, delta, k_base, v_base, bias_base, ks_base,
    rows, offs_n, offs_d, offs_dv, start, end, q_len, k_len, diag, head_dim, head_dim_v,
    stride_ks, stride_vs, stride_bm, stride_bn,
    sm_scale, softcap, window_left, window_right,
    MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_INT8: tl.constexpr,
    QK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # QK_INT8: q and the K tiles are int8 codes (q_scale: one scale per query row); the key
    # tile is exactly one QK_BLOCK-row block of K (BLOCK_N == QK_BLOCK, enforced by the
    # launcher), so K's block scale is a scalar here and the rows of dS quantise over it.
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
        if QK_INT8:
            k_scale = tl.load(ks_base + n0 // QK_BLOCK)
            qk = tl.dot(q, kT, out_dtype=tl.int32).to(tl.float32) * q_scale[:, None] * k_scale
        else:
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
        if QK_INT8:  # dQ += dS K in int8
            dc, dsc = _row_tile_codes(ds)
            dq += (tl.dot(dc, tl.trans(kT), out_dtype=tl.int32).to(tl.float32)
                   * (dsc[:, None] * k_scale))
        else:
            dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def bwd_dq_kernel(
    Q, K, V, Bias, DO, Lse, Delta, DQ, CuQ, CuK, QScale, KScale, Balance,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_dqb, stride_dqh, stride_dqs,
    stride_lb, stride_lh, stride_ls,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_qsb, stride_qsh, stride_ksb, stride_ksh, stride_bab, stride_bah,
    H, GROUP, seqlen_q, seqlen_k, head_dim, head_dim_v,
    SQ_BUCKET, SK_BUCKET,
    IS_VARLEN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_DV: tl.constexpr, DOT_PRECISION: tl.constexpr, QK_INT8: tl.constexpr,
    QK_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    q_scale = lse  # placeholder when not QK_INT8 (never read)
    ks_base = KScale
    if QK_INT8:
        q_scale, ks_base = _qk_scales(QScale, KScale, b, b64, h64, hk64, stride_qsb, stride_qsh,
                                      stride_ksb, stride_ksh, q_start, k_start, rows, row_ok,
                                      IS_VARLEN, QK_BLOCK)
    bias_base = Bias
    if HAS_BIAS:
        bias_base = Bias + b64 * stride_bb + h64 * stride_bh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = k_len - q_len
    lo, full_lo, full_hi, hi = _key_ranges(m0, q_len, k_len, window_left, window_right,
                                           BLOCK_M, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
    dq = _bwd_dq_inner(
        dq, q, q_scale, do, lse2, delta, k_base, v_base, bias_base, ks_base, rows, offs_n,
        offs_d, offs_dv, lo, full_lo, q_len, k_len, diag, head_dim, head_dim_v, stride_ks, stride_vs,
        stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, True, HAS_BIAS,
        HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, QK_INT8, QK_BLOCK,
        BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, q_scale, do, lse2, delta, k_base, v_base, bias_base, ks_base, rows, offs_n,
        offs_d, offs_dv, full_lo, full_hi, q_len, k_len, diag, head_dim, head_dim_v, stride_ks, stride_vs,
        stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, False, HAS_BIAS,
        HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, QK_INT8, QK_BLOCK,
        BLOCK_N)
    dq = _bwd_dq_inner(
        dq, q, q_scale, do, lse2, delta, k_base, v_base, bias_base, ks_base, rows, offs_n,
        offs_d, offs_dv, full_hi, hi, q_len, k_len, diag, head_dim, head_dim_v, stride_ks, stride_vs,
        stride_bm, stride_bn, sm_scale, softcap, window_left, window_right, True, HAS_BIAS,
        HAS_SOFTCAP, WINDOW_LEFT, WINDOW_RIGHT, EVEN_D, EVEN_DV, DOT_PRECISION, QK_INT8, QK_BLOCK,
        BLOCK_N)
    dq = dq * sm_scale
    if QK_INT8:  # dQ of the balanced q / b is dQ of q's codes over b (a power of two: exact)
        dq = dq / tl.load(Balance + b64 * stride_bab + hk64 * stride_bah + offs_d,
                          mask=offs_d < head_dim, other=1.0)[None, :]
    tl.store(DQ + b64 * stride_dqb + h64 * stride_dqh + r64[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# int8 blocks of Q, K and dO (the format of leanops.quant.int8.quantize_qk / quantize_blocks,
# bit-exact)


@triton.jit
def quantize_blocks_kernel(
    X, Mean, Mul, Codes, Scale, CuSeq,
    stride_xb, stride_xh, stride_xs, stride_mb, stride_mh,
    stride_cb, stride_ch, stride_cs, stride_sb, stride_sh,
    H, GROUP, S, head_dim,
    HAS_MEAN: tl.constexpr, HAS_MUL: tl.constexpr, IS_VARLEN: tl.constexpr,
    QK_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per QK_BLOCK rows of one (sequence, head): x becomes (x - Mean) * Mul (the
    # statistics of the head's kv head h // GROUP, [B, Hkv, D]), then amax over the whole block,
    # one scale, stored in the block's slot (leanops.quant.int8.block_slot for varlen).
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, length, _, _ = _seq_bounds(CuSeq, CuSeq, b, S, S, IS_VARLEN)
    if blk * QK_BLOCK >= length:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    stat = b64 * stride_mb + (h // GROUP).to(tl.int64) * stride_mh + tl.arange(0, BLOCK_D)
    rows = blk * QK_BLOCK + tl.arange(0, QK_BLOCK)
    r64 = tl.cast(start, tl.int64) + rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    mask = (rows < length)[:, None] & d_ok[None, :]
    x = tl.load(X + b64 * stride_xb + h64 * stride_xh + r64[:, None] * stride_xs
                + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(mask, x - tl.load(Mean + stat, mask=d_ok, other=0.0)[None, :], 0.0)
    if HAS_MUL:  # powers of two: exact
        x = x * tl.load(Mul + stat, mask=d_ok, other=1.0)[None, :]
    amax = tl.max(tl.max(tl.abs(x), 1), 0)
    n_bad = amax * 0  # inputs are finite attention activations; no NaN row handling here
    scale = _scale_of(amax, n_bad)
    codes = _codes(x, scale, n_bad)
    tl.store(Codes + b64 * stride_cb + h64 * stride_ch + r64[:, None] * stride_cs
             + offs_d[None, :], codes, mask=mask)
    tl.store(Scale + b64 * stride_sb + h64 * stride_sh + _block_slot(start, b, IS_VARLEN, QK_BLOCK)
             + blk, scale)
