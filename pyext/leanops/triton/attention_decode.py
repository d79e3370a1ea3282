"""Decode attention in Triton: a few new tokens (Sq <= 16) against a long KV cache.

Why a second kernel: at decode the work is reading the cache once (2 * Sk * Hkv * D elements per
sequence) and the math is nearly free, so what matters is (1) enough programs in flight to pull
HBM bandwidth and (2) reading each K/V byte once. The flash forward gives one program per
(query block, q head): with Sq = 1 that is B * Hq programs, each streaming a whole K/V head, and
with GQA every kv head is streamed GROUP times.

- GQA packing: one program holds the GROUP * Sq query rows that share a kv head (row r is q head
  hk * GROUP + r // Sq, query r % Sq), so K/V are read once per kv head, and the rows fill the
  16-row minimum of tl.dot that a single query would waste.
- Split-KV: the visible key range of a sequence is cut into `num_splits` contiguous chunks of
  whole BLOCK_N tiles, one program each; each writes its normalised partial output and its lse
  to an fp32 workspace, and `_reduce_kernel` combines them in a fixed order
  (out = sum_s exp(lse_s - max) out_s / sum_s exp(lse_s - max)): deterministic, no atomics.
  num_splits makes B * Hkv * num_splits >= 2 waves of the SMs while each chunk keeps >= 4 tiles.
- Paged KV: with a block table, key j of sequence b lives in page block_table[b, j // page]
  at row j % page; pages are looked up per key column, so any page size works (no need for the
  page to be a multiple of BLOCK_N).

Masks are ops.attention's (bottom-right aligned per sequence: the new tokens are the last Sq
positions of each cache). The decode path also serves leanops::attention_fwd for short queries
(`use_decode_path`), where it writes the same lse as the flash kernel, so the backward is shared.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from leanops._layout import empty_like_layout
from leanops.triton import _common as common
from leanops.triton._common import seq_bucket
from leanops.triton.attention_kernels import finalize, online_softmax_update, scores


@triton.jit
def _decode_kernel(
    Q, K, V, SeqLens, BlockTable, WsO, WsL,
    sm_scale, softcap, window_left, window_right,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_tb,
    H_KV, GROUP, SQ, seqlen_k, head_dim, head_dim_v, page_size, rows_total,
    SK_BUCKET,
    HAS_SEQLENS: tl.constexpr, PAGED: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    b64 = b.to(tl.int64)
    hk64 = hk.to(tl.int64)
    if HAS_SEQLENS:
        k_len = tl.load(SeqLens + b)
    else:
        k_len = seqlen_k + 0

    r = tl.arange(0, BLOCK_M)
    r_ok = r < rows_total
    i = r % SQ  # query index within the new tokens
    h64 = hk64 * GROUP + (r // SQ).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    offs_dv = tl.arange(0, BLOCK_DV)  # the value head dim (Dv may differ from D)
    dv_ok = offs_dv < head_dim_v
    q = tl.load(Q + b64 * stride_qb + h64[:, None] * stride_qh + i.to(tl.int64)[:, None] * stride_qs
                + offs_d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)

    diag = k_len - SQ
    lo = k_len * 0
    hi = k_len + 0
    if WINDOW_LEFT:
        lo = tl.maximum(diag - window_left, 0)  # query 0 has the leftmost window
    if WINDOW_RIGHT:
        hi = tl.minimum(SQ - 1 + diag + window_right + 1, k_len)  # query SQ-1 the rightmost
    hi = tl.maximum(hi, lo)
    per = tl.cdiv(tl.cdiv(hi - lo, BLOCK_N), n_splits) * BLOCK_N
    start = lo + split * per
    end = tl.minimum(start + per, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        c_ok = cols < end
        if PAGED:
            page = tl.load(BlockTable + b64 * stride_tb + cols // page_size, mask=c_ok, other=0)
            k_off = page.to(tl.int64) * stride_kb + (cols % page_size).to(tl.int64) * stride_ks
            v_off = page.to(tl.int64) * stride_vb + (cols % page_size).to(tl.int64) * stride_vs
        else:
            k_off = b64 * stride_kb + cols.to(tl.int64) * stride_ks
            v_off = b64 * stride_vb + cols.to(tl.int64) * stride_vs
        k = tl.load(K + hk64 * stride_kh + k_off[None, :] + offs_d[:, None],
                    mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + hk64 * stride_vh + v_off[:, None] + offs_dv[None, :],
                    mask=c_ok[:, None] & dv_ok[None, :], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        s, _t = scores(qk, qk, i[:, None], cols[None, :], SQ, k_len, diag, sm_scale, softcap,
                       window_left, window_right, False, HAS_SOFTCAP, True, WINDOW_LEFT,
                       WINDOW_RIGHT, False)
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, s, v, True, False, DOT_PRECISION)

    out, lse = finalize(acc, l_i, m_i)
    # workspace [B * Hkv, n_splits, rows_total, head_dim_v] / [..., rows_total], contiguous
    row64 = (pid_bh.to(tl.int64) * n_splits + split) * rows_total + r
    tl.store(WsO + row64[:, None] * head_dim_v + offs_dv[None, :], out,
             mask=r_ok[:, None] & dv_ok[None, :])
    tl.store(WsL + row64, lse, mask=r_ok)


@triton.jit
def _reduce_kernel(
    WsO, WsL, Out, Lse, n_splits,
    H_KV, GROUP, SQ, rows_total, head_dim_v,
    stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_ls,
    SPLITS_PAD: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    r = tl.program_id(1)
    b64 = (pid_bh // H_KV).to(tl.int64)
    h64 = (pid_bh % H_KV).to(tl.int64) * GROUP + r // SQ
    i64 = (r % SQ).to(tl.int64)
    s = tl.arange(0, SPLITS_PAD)
    s_ok = s < n_splits
    row64 = (pid_bh.to(tl.int64) * n_splits + s) * rows_total + r
    lse_s = tl.load(WsL + row64, mask=s_ok, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_use)  # splits that saw no key: lse -inf, weight 0
    offs_d = tl.arange(0, BLOCK_DV)
    o = tl.load(WsO + row64[:, None] * head_dim_v + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d < head_dim_v)[None, :], other=0.0)
    tot = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(tot == 0.0, 1.0, tot)
    lse = tl.where(tot == 0.0, float("-inf"), m_use + tl.log(tl.where(tot == 0.0, 1.0, tot)))
    tl.store(Out + b64 * stride_ob + h64 * stride_oh + i64 * stride_os + offs_d,
             out.to(Out.dtype.element_ty), mask=offs_d < head_dim_v)
    tl.store(Lse + b64 * stride_lb + h64 * stride_lh + i64 * stride_ls, lse)


# ---------------------------------------------------------------------------------------------
# Configs: memory bound, so the knobs are bytes in flight per program: BLOCK_N keys per tile and
# the pipeline depth. 4 warps (the 16-64 packed rows give each warp a 16-row MMA slab).

CONFIGS = [common.config(num_warps=4, num_stages=s, BLOCK_N=bn) for bn in (32, 64, 128) for s in (2, 3, 4)]
INTERPRETER_CONFIG = common.config(num_warps=4, num_stages=1, BLOCK_N=16)
INTERPRETER_SPLITS = 3  # exercises the reduce, uneven chunks and empty splits
MAX_SPLITS = 64
MIN_TILES_PER_SPLIT = 4
MAX_PACKED_ROWS = 64  # GROUP * Sq rows per program; beyond, the flash kernel is the better fit
MAX_DECODE_SQ = 16


@functools.lru_cache(maxsize=1024)
def _kept(block_d, block_dv, block_m, elem, sk_bucket, device):
    # K (BLOCK_D) and V (BLOCK_DV) tiles per stage, the packed Q rows once; the register rules
    # take the wider of the two head dims (with D = Dv, the rules as first written)
    _, smem = common.device_limits(device)
    wide = max(block_d, block_dv)
    kept = []
    for idx, c in enumerate(CONFIGS):
        bn = c.kwargs["BLOCK_N"]
        if c.num_stages * bn * (block_d + block_dv) * elem + block_m * block_d * elem > smem:
            continue
        if bn > max(32, sk_bucket):
            continue
        if block_m * wide > 2048 * c.num_warps or bn * wide > 128 * 128:
            continue
        kept.append(idx)
    return frozenset(kept or [0])


def _kept_for(args):
    q = args["Q"]
    return _kept(args["BLOCK_D"], args["BLOCK_DV"], args["BLOCK_M"], q.element_size(),
                 args["SK_BUCKET"], q.device)


def _keep(cfg, args):
    if args.get("_hard_only"):
        return True
    return CONFIGS.index(cfg) in _kept_for(args)


def _default(args):
    """Without autotuning: the kept config closest to 64-key tiles with 3 stages."""
    kept = _kept_for(args)
    return common.closest_config([CONFIGS[i] for i in sorted(kept)], {"BLOCK_N": 64}, stages=3)


_tuned = common.autotune(CONFIGS, key=["BLOCK_D", "BLOCK_DV", "BLOCK_M", "SK_BUCKET", "PAGED",
                                  "HAS_SEQLENS", "HAS_SOFTCAP", "WINDOW_LEFT", "WINDOW_RIGHT"],
                    keep=_keep)(_decode_kernel)


def use_decode_path(q, k, bias, varlen, sq, sk) -> bool:
    """Whether leanops::attention_fwd should take this kernel (dense, no bias, few queries)."""
    if bias is not None or varlen or sk == 0:
        return False
    group = q.shape[1] // k.shape[1]
    return sq <= MAX_DECODE_SQ and group * sq <= MAX_PACKED_ROWS


def num_splits_for(programs: int, max_k: int, device: torch.device) -> int:
    if common.interpreter():
        return INTERPRETER_SPLITS
    sms, _ = common.device_limits(device)
    by_sms = triton.cdiv(2 * sms, max(programs, 1))
    by_len = max(1, max_k // (MIN_TILES_PER_SPLIT * 64))
    return max(1, min(by_sms, by_len, MAX_SPLITS))


def decode_into(out, lse, q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap,
                cfg=None, num_splits=None):
    """Write attention of q [B, Hq, Sq, D] over the cache into out [B, Hq, Sq, Dv] and lse
    [B, Hq, Sq] (any strides)."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    batch, hq, sq, d = q.shape
    hkv, dv = k_cache.shape[1], v_cache.shape[3]
    group = hq // hkv
    rows = group * sq
    block_m = max(16, common.next_power_of_2(rows))
    block_d = max(16, common.next_power_of_2(d))
    block_dv = max(16, common.next_power_of_2(dv))
    paged = block_table is not None
    page_size = k_cache.shape[2] if paged else 1
    max_k = block_table.shape[1] * page_size if paged else k_cache.shape[2]
    splits = num_splits or num_splits_for(batch * hkv, max_k, q.device)
    ws_o = torch.empty((batch * hkv, splits, rows, dv), dtype=torch.float32, device=q.device)
    ws_l = torch.empty((batch * hkv, splits, rows), dtype=torch.float32, device=q.device)
    dummy = ws_l
    args = dict(
        Q=q, K=k_cache, V=v_cache,
        SeqLens=cache_seqlens if cache_seqlens is not None else dummy,
        BlockTable=block_table if paged else dummy, WsO=ws_o, WsL=ws_l,
        sm_scale=float(scale), softcap=float(softcap) if softcap > 0 else 1.0,
        window_left=max(wl, 0), window_right=max(wr, 0),
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qs=q.stride(2),
        stride_kb=k_cache.stride(0), stride_kh=k_cache.stride(1), stride_ks=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vh=v_cache.stride(1), stride_vs=v_cache.stride(2),
        stride_tb=block_table.stride(0) if paged else 0,
        H_KV=hkv, GROUP=group, SQ=sq, seqlen_k=k_cache.shape[2], head_dim=d, head_dim_v=dv,
        page_size=page_size, rows_total=rows, SK_BUCKET=seq_bucket(max_k),
        HAS_SEQLENS=cache_seqlens is not None, PAGED=paged, HAS_SOFTCAP=softcap > 0,
        WINDOW_LEFT=wl >= 0, WINDOW_RIGHT=wr >= 0, DOT_PRECISION=common.dot_precision(q.dtype),
        BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_M=block_m,
    )
    grid = (batch * hkv, splits)
    cfg = common.launch_config(cfg, INTERPRETER_CONFIG, lambda: _default(args))
    with common.device_guard(q):
        if cfg is not None:
            _decode_kernel[grid](**args, **common.config_kwargs(cfg))
        else:
            _tuned[grid](**args)
        _reduce_kernel[(batch * hkv, rows)](
            ws_o, ws_l, out, lse, splits, hkv, group, sq, rows, dv,
            out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            lse.stride(2), SPLITS_PAD=max(2, common.next_power_of_2(splits)), BLOCK_DV=block_dv,
            num_warps=4,
        )
    return out, lse


def attention_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    """Triton kernels of leanops::attention_decode (arguments validated by the op)."""
    out = empty_like_layout(q, (*q.shape[:-1], v_cache.shape[-1]))
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    decode_into(out, lse, q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap)
    return out
