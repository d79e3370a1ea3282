"""Launchers of the fused attention kernels (leanops.triton.attention_kernels): configs, the
keep() rules that filter them per call, and the functions the ops call.

  attention_fwd / attention_bwd   leanops::attention_fwd / attention_bwd (flash forward, or the
                                  split-KV decode kernel of leanops.triton.attention_decode for
                                  a few queries; FA2 backward)
  attention_int8 / _bwd           leanops::attention_int8 / attention_int8_bwd: Q and K (and,
                                  for the backward, dO) quantised by quantize_blocks_kernel,
                                  then the same kernels with QK_INT8 (int8 Q K^T; int8 dV, dQ,
                                  dK in the backward)
"""

from __future__ import annotations

import functools

import torch
import triton

from leanops._layout import empty_like_layout
from leanops.quant import int8 as int8_format
from leanops.quant.int8 import QK_BLOCK
from leanops.triton import _common as common
from leanops.triton import attention_decode
from leanops.triton import attention_kernels as K
from leanops.triton._common import seq_bucket

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
# one [BLOCK_M, BLOCK_D] accumulator plus Q and dO. With a value head dim Dv != D (BLOCK_DV !=
# BLOCK_D) every tile of V, O, dO and dV counts with BLOCK_DV and the rest with BLOCK_D: the same
# rules, which reduce to the fitted ones when the two are equal (Dv = D has not been through
# ptxas separately). The tuned config is cached per (BLOCK_D, BLOCK_DV, query/key length
# buckets, mask switches, dtype), on disk where Triton supports it.

def _cfg(num_warps, num_stages, **kw):
    return common.config(num_warps=num_warps, num_stages=num_stages, **kw)


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
# masked/unmasked range (BLOCK_M != BLOCK_N catches code that assumes square tiles). The int8
# backward's tile along the reduced axis is the format's QK_BLOCK (see _hard_ok).
INTERPRETER_FWD = _cfg(4, 1, BLOCK_M=32, BLOCK_N=16)
INTERPRETER_DKDV = _cfg(4, 1, BLOCK_M=16, BLOCK_N=32)
INTERPRETER_DQ = _cfg(4, 1, BLOCK_M=32, BLOCK_N=16)
INTERPRETER_DKDV_INT8 = _cfg(4, 1, BLOCK_M=QK_BLOCK, BLOCK_N=32)
INTERPRETER_DQ_INT8 = _cfg(4, 1, BLOCK_M=32, BLOCK_N=QK_BLOCK)
_CONFIGS = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}


def _smem(cfg, kind, block_d, elem, block_dv=None):
    kw = cfg.kwargs
    bm, bn, st = kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_stages
    dk, dv = block_d, block_d if block_dv is None else block_dv
    if kind == "fwd":  # Q once, K and V per stage
        return elem * (bm * dk + st * bn * (dk + dv))
    if kind == "dkdv":  # K, V once; Q and dO per stage
        return elem * (bn + st * bm) * (dk + dv)
    return elem * (bm + st * bn) * (dk + dv)  # dq: Q, dO once; K, V per stage


def _regs_ok(kind, bm, bn, bd, w, stages, bdv=None) -> bool:
    """Register budget per thread (fp32 = 1 register, 16-bit = 1/2), fitted to ptxas on sm_90
    (see the comment above); bd the Q/K head dim's block, bdv the V/O one's (default bd)."""
    threads = 32 * w
    bdv = bd if bdv is None else bdv
    kv = bn * (bd + bdv) / 2  # the streamed K and V tiles, as one of the mean width
    if kind == "fwd":  # O accumulator <= 128 per thread; the streamed K/V tile <= 64
        return bm * bdv <= 128 * threads and kv <= 64 * threads
    if kind == "dq":  # dQ accumulator and Q (1.5 bm bd), dO (bm bdv / 2) in registers
        return bm * (3 * bd + bdv) / 2 <= 128 * threads and kv <= 64 * threads
    # dK, dV accumulators (fp32), K and V as MMA operands (16-bit), the Q / dO tile, and the
    # [BLOCK_N, BLOCK_M] fp32 tiles S^T, dP^T, dS^T alive together; a third pipeline stage
    # needs headroom (its address and barrier registers)
    est = (bn * (bd + bdv) + kv + bm * (bd + bdv) / 2 + 3 * bn * bm) / threads
    return est <= (232 if stages <= 2 else 128)


def _hard_ok(cfg, kind, args) -> bool:
    """Correctness, not speed: the int8 backward quantises P and dS per row over one tile of the
    reduced axis (queries for dK/dV, keys for dQ), which must be the format's QK_BLOCK rows
    (leanops.quant.int8.fake_quantize_row_tiles) and aligned with Q's, K's and dO's blocks."""
    if not args.get("QK_INT8") or kind == "fwd":
        return True
    return cfg.kwargs["BLOCK_M" if kind == "dkdv" else "BLOCK_N"] == QK_BLOCK


def _soft_ok(cfg, kind, args) -> bool:
    kw = cfg.kwargs
    bm, bn, w = kw["BLOCK_M"], kw["BLOCK_N"], cfg.num_warps
    bd, bdv = args["BLOCK_D"], args["BLOCK_DV"]
    if not _regs_ok(kind, bm, bn, bd, w, cfg.num_stages, bdv):
        return False
    _, smem = common.device_limits(args["V"].device)
    # V's element size: Q and K may be int8 codes, V and dO never are (a conservative count)
    if _smem(cfg, kind, bd, args["V"].element_size(), bdv) > smem:
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
def _kept(kind, block_d, elem, sq, sk, device, has_bias=False, block_dv=None, qk_int8=False):
    configs = _CONFIGS[kind]
    block_dv = block_d if block_dv is None else block_dv
    fake = torch.empty(0, dtype={1: torch.int8, 2: torch.float16, 4: torch.float32}[elem],
                       device=device)
    args = {"BLOCK_D": block_d, "BLOCK_DV": block_dv, "V": fake, "SQ_BUCKET": sq,
            "SK_BUCKET": sk, "HAS_BIAS": has_bias, "QK_INT8": qk_int8}
    valid = [i for i, c in enumerate(configs) if _hard_ok(c, kind, args)]
    kept = [i for i in valid if _soft_ok(configs[i], kind, args)]
    if not kept:  # an unusually small GPU: the valid config with the least shared memory
        kept = [min(valid, key=lambda i: _smem(configs[i], kind, block_d, elem, block_dv))]
    return frozenset(kept)


def _kept_for(kind, args):
    return _kept(kind, args["BLOCK_D"], args["V"].element_size(), args["SQ_BUCKET"],
                 args["SK_BUCKET"], args["V"].device, bool(args["HAS_BIAS"]), args["BLOCK_DV"],
                 bool(args.get("QK_INT8", False)))


def _keep_for(kind):
    configs = _CONFIGS[kind]

    def keep(cfg, args):
        if args.get("_hard_only"):
            return _hard_ok(cfg, kind, args)
        return configs.index(cfg) in _kept_for(kind, args)

    return keep


_KEY = ["BLOCK_D", "BLOCK_DV", "SQ_BUCKET", "SK_BUCKET", "IS_VARLEN", "HAS_BIAS", "HAS_SOFTCAP",
        "WINDOW_LEFT", "WINDOW_RIGHT"]
_fwd_tuned = common.autotune(FWD_CONFIGS, key=[*_KEY, "QK_INT8"],
                             keep=_keep_for("fwd"))(K.fwd_kernel)
_dkdv_tuned = common.autotune(DKDV_CONFIGS, key=[*_KEY, "QK_INT8"],
                              keep=_keep_for("dkdv"))(K.bwd_dkdv_kernel)
_dq_tuned = common.autotune(DQ_CONFIGS, key=[*_KEY, "QK_INT8"],
                            keep=_keep_for("dq"))(K.bwd_dq_kernel)

# Without autotuning (LEANOPS_TRITON_AUTOTUNE=0): the kept config closest to a middle-of-the-road
# tile (fwd 128 x 64, dK/dV 64 keys x 32 queries, dQ 64 x 32), 2 stages.
_TARGETS = {"fwd": (128, 64), "dkdv": (32, 64), "dq": (64, 32)}
_INTERPRETER = {"fwd": INTERPRETER_FWD, "dkdv": INTERPRETER_DKDV, "dq": INTERPRETER_DQ}
_INTERPRETER_INT8 = {"fwd": INTERPRETER_FWD, "dkdv": INTERPRETER_DKDV_INT8, "dq": INTERPRETER_DQ_INT8}


def _default(kind, args):
    configs = _CONFIGS[kind]
    kept = _kept_for(kind, args)
    tm, tn = _TARGETS[kind]
    return common.closest_config([configs[i] for i in sorted(kept)],
                                 {"BLOCK_M": tm, "BLOCK_N": tn}, stages=2)


def _launch(kind, raw, tuned, grid, args: dict, cfg=None):
    """Run kernel `raw` (or its autotuned twin) with the named arguments `args`, with the config
    of leanops.triton._common.launch_config's rule."""
    interpreter_cfg = (_INTERPRETER_INT8 if args.get("QK_INT8") else _INTERPRETER)[kind]
    cfg = common.launch_config(cfg, interpreter_cfg, lambda: _default(kind, args))
    # Fp contraction stays on here (unlike _common.LAUNCH_OPTIONS): these kernels are judged by
    # error bounds, not bit-exactness, and the softmax update s * c - m is one FMA per score.
    if cfg is not None:
        raw[grid](**args, **common.config_kwargs(cfg))
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


def _scale_layout(scale, varlen):
    """(stride_b, stride_h) of block scales: dense [B, H, nb] or varlen [H, slots]."""
    if varlen:
        return 0, scale.stride(0)
    return scale.stride(0), scale.stride(1)


def _block(d):
    return max(16, common.next_power_of_2(d))


def _common_meta(q, d, dv, sq, sk, varlen, bias, softcap, wl, wr, qk_int8=False):
    # int8 dots reduce over at least 32 (mma's k32): Q K^T's head dim <= 16 runs in a 32-wide
    # tile (the int8 backward's other dots reduce over its 64-wide tiles)
    block_d, block_dv = max(32, _block(d)) if qk_int8 else _block(d), _block(dv)
    return dict(
        SQ_BUCKET=seq_bucket(sq), SK_BUCKET=seq_bucket(sk), IS_VARLEN=varlen,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap > 0, WINDOW_LEFT=wl >= 0,
        WINDOW_RIGHT=wr >= 0, EVEN_D=block_d == d, EVEN_DV=block_dv == dv,
        DOT_PRECISION=common.dot_precision(q.dtype), QK_INT8=qk_int8, QK_BLOCK=QK_BLOCK,
        BLOCK_D=block_d, BLOCK_DV=block_dv,
    )


def _fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, cfg=None, path=None,
         int8=None):
    """Forward launcher. path: None (choose), "flash" or "decode" (tests force one). int8:
    None, or the leanops.quant.int8.QKCodes of q and k for the int8 Q K^T variant."""
    out = empty_like_layout(q, (*q.shape[:-1], v.shape[-1]))  # the op's layout: from q as given
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    varlen, batch, hq, hkv, sq, sk, d = _problem(q, k, cu_q, max_q, max_k)
    dv = v.shape[-1]
    lse = torch.empty((hq, q.shape[0]) if varlen else (batch, hq, sq), dtype=torch.float32,
                      device=q.device)
    if path is None:
        path = "decode" if (int8 is None and attention_decode.use_decode_path(
            q, k, bias, varlen, sq, sk)) else "flash"
    if path == "decode":
        attention_decode.decode_into(out, lse, q, k, v, None, None, scale, wl, wr, softcap)
        return out, lse

    group = hq // hkv
    dummy = lse
    if int8 is not None:
        q_in, k_in, qs, ks = int8.q_codes, int8.k_codes, int8.q_scale, int8.k_scale
        scale_strides = (*_scale_layout(qs, varlen), *_scale_layout(ks, varlen))
    else:
        q_in, k_in, qs, ks = q, k, dummy, dummy
        scale_strides = (0, 0, 0, 0)
    meta = _common_meta(q, d, dv, sq, sk, varlen, bias, softcap, wl, wr, int8 is not None)
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
        H=hq, GROUP=group, seqlen_q=sq, seqlen_k=sk, head_dim=d, head_dim_v=dv, **meta,
    )
    with common.device_guard(q):
        _launch("fwd", K.fwd_kernel, _fwd_tuned, grid, args, cfg)
    return out, lse


def attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    """Triton kernel of leanops::attention_fwd (arguments validated by the op)."""
    return _fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)


def _bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap,
         cfg_dkdv=None, cfg_dq=None, int8=None):
    """Backward launcher. int8: None, or (QKCodes of q and k, dO's codes, dO's block scales)
    for attention_int8's backward."""
    q, k, v, out, grad_out = (_last_dim_contiguous(t) for t in (q, k, v, out, grad_out))
    varlen, batch, hq, hkv, sq, sk, d = _problem(q, k, cu_q, max_q, max_k)
    d_v = v.shape[-1]
    group = hq // hkv
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    meta = _common_meta(q, d, d_v, sq, sk, varlen, bias, softcap, wl, wr, int8 is not None)
    dummy = lse
    cu_q_, cu_k_ = (cu_q, cu_k) if varlen else (dummy, dummy)
    lse_strides = _lse_layout(lse, varlen)
    q_in, k_in = q, k
    int8_args = dict(QScale=dummy, KScale=dummy, Balance=dummy, stride_qsb=0, stride_qsh=0,
                     stride_ksb=0, stride_ksh=0, stride_bab=0, stride_bah=0)
    do_codes, do_scale = grad_out, dummy
    if int8 is not None:
        codes, do_codes, do_scale = int8
        # dO's codes and scales are read with dO's and Q's scales' strides
        assert do_codes.stride() == grad_out.stride()
        assert do_scale.stride() == codes.q_scale.stride()
        q_in, k_in = codes.q_codes, codes.k_codes
        int8_args = dict(
            QScale=codes.q_scale, KScale=codes.k_scale, Balance=codes.balance,
            **dict(zip(("stride_qsb", "stride_qsh"), _scale_layout(codes.q_scale, varlen),
                       strict=True)),
            **dict(zip(("stride_ksb", "stride_ksh"), _scale_layout(codes.k_scale, varlen),
                       strict=True)),
            stride_bab=codes.balance.stride(0), stride_bah=codes.balance.stride(1),
        )
    shared = dict(
        Q=q_in, K=k_in, V=v, Bias=bias if bias is not None else dummy, DO=grad_out, Lse=lse,
        Delta=delta, CuQ=cu_q_, CuK=cu_k_,
        sm_scale=float(scale), softcap=float(softcap) if softcap > 0 else 1.0,
        window_left=max(wl, 0), window_right=max(wr, 0),
        **dict(zip(("stride_qb", "stride_qh", "stride_qs"), _layout(q_in, varlen), strict=True)),
        **dict(zip(("stride_kb", "stride_kh", "stride_ks"), _layout(k_in, varlen), strict=True)),
        **dict(zip(("stride_vb", "stride_vh", "stride_vs"), _layout(v, varlen), strict=True)),
        **dict(zip(("stride_dob", "stride_doh", "stride_dos"), _layout(grad_out, varlen),
                   strict=True)),
        **dict(zip(("stride_lb", "stride_lh", "stride_ls"), lse_strides, strict=True)),
        **dict(zip(("stride_bb", "stride_bh", "stride_bm", "stride_bn"), _bias_layout(bias),
                   strict=True)),
        **int8_args, GROUP=group, seqlen_q=sq, seqlen_k=sk, head_dim=d, head_dim_v=d_v, **meta,
    )
    with common.device_guard(q):
        pre_m = 64
        K.bwd_preprocess_kernel[(triton.cdiv(sq, pre_m), batch * hq)](
            out, grad_out, delta, cu_q_, cu_k_,
            *_layout(out, varlen), *_layout(grad_out, varlen), *lse_strides,
            hq, sq, sk, d_v, IS_VARLEN=varlen, BLOCK_M=pre_m, BLOCK_D=meta["BLOCK_DV"],
            num_warps=4,
        )
        dkdv_args = dict(
            shared, DK=dk, DV=dv, H_KV=hkv, DOCodes=do_codes, DOScale=do_scale,
            **dict(zip(("stride_dkb", "stride_dkh", "stride_dks"), _layout(dk, varlen), strict=True)),
            **dict(zip(("stride_dvb", "stride_dvh", "stride_dvs"), _layout(dv, varlen), strict=True)),
        )
        _launch("dkdv", K.bwd_dkdv_kernel, _dkdv_tuned,
                lambda m: (triton.cdiv(sk, m["BLOCK_N"]), batch * hkv), dkdv_args, cfg_dkdv)
        dq_args = dict(
            shared, DQ=dq, H=hq,
            **dict(zip(("stride_dqb", "stride_dqh", "stride_dqs"), _layout(dq, varlen), strict=True)),
        )
        _launch("dq", K.bwd_dq_kernel, _dq_tuned,
                lambda m: (triton.cdiv(sq, m["BLOCK_M"]), batch * hq), dq_args, cfg_dq)
    return dq, dk, dv


def attention_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                  softcap):
    """Triton kernels of leanops::attention_bwd (arguments validated by the op)."""
    return _bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)


# ---------------------------------------------------------------------------------------------
# int8


def quantize_blocks(x, cu=None, max_len=0, mean=None, mul=None):
    """The Triton twin of leanops.quant.int8's block quantisation (bit for bit): int8 codes of
    dense x [B, H, S, D] or varlen x [T, H, D] (cu_seqlens `cu`, longest sequence `max_len`) per
    QK_BLOCK rows, after x -> (x - mean) * mul with the [B, Hkv, D] statistics of each head's kv
    head. Returns (codes with x's shape and strides, scales [B, H, nb] or [H, slots])."""
    varlen = cu is not None
    x = _last_dim_contiguous(x)
    codes = torch.empty_like(x, dtype=torch.int8)  # x's strides (the backward relies on it)
    if varlen:
        batch, h, d, s = cu.shape[0] - 1, x.shape[1], x.shape[2], int(max_len)
        # slots no block uses (between sequences) hold 0, as the reference's
        scale = torch.zeros((h, int8_format.num_slots(x.shape[0], batch)), dtype=torch.float32,
                            device=x.device)
    else:
        batch, h, s, d = x.shape
        scale = torch.empty((batch, h, triton.cdiv(s, QK_BLOCK)), dtype=torch.float32,
                            device=x.device)
    if x.numel() == 0:
        return codes, scale
    stats = mean if mean is not None else mul
    with common.device_guard(x):
        K.quantize_blocks_kernel[(triton.cdiv(s, QK_BLOCK), batch * h)](
            x, mean if mean is not None else scale, mul if mul is not None else scale, codes,
            scale, cu if varlen else scale,
            *_layout(x, varlen), *((stats.stride(0), stats.stride(1)) if stats is not None else (0, 0)),
            *_layout(codes, varlen), *_scale_layout(scale, varlen),
            h, h // stats.shape[1] if stats is not None else 1, s, d,
            HAS_MEAN=mean is not None, HAS_MUL=mul is not None, IS_VARLEN=varlen,
            QK_BLOCK=QK_BLOCK, BLOCK_D=_block(d), num_warps=4,
        )
    return codes, scale


def quantize_qk(q, k, smooth_k, cu_q=None, cu_k=None, max_q=0, max_k=0):
    """The Triton twin of leanops.quant.int8.quantize_qk: the same QKCodes, bit for bit (the
    smoothing statistics are the format's own function, leanops.quant.int8.qk_stats)."""
    mean, balance = int8_format.qk_stats(q, k, smooth_k, cu_q, cu_k)
    qc, qs = quantize_blocks(q, cu_q, max_q, mul=(1.0 / balance).contiguous())
    kc, ks = quantize_blocks(k, cu_k, max_k, mean=mean, mul=balance)
    return int8_format.QKCodes(qc, qs, kc, ks, mean, balance)


def attention_int8(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, smooth_k,
                   cfg=None):
    """Triton kernels of leanops::attention_int8: quantise Q and K (per QK_BLOCK rows, K
    smoothed by its mean, both balanced per channel), then the forward kernel with an int8
    Q K^T."""
    codes = quantize_qk(q, k, smooth_k, cu_q, cu_k, max_q, max_k)
    return _fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, cfg=cfg,
                path="flash", int8=codes)


def attention_int8_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                       wr, softcap, smooth_k, cfg_dkdv=None, cfg_dq=None):
    """Triton kernels of leanops::attention_int8_bwd: Q and K quantised again exactly as in the
    forward (cheaper than keeping the codes alive between forward and backward), dO per
    QK_BLOCK rows, then the backward kernels with QK_INT8."""
    codes = quantize_qk(q, k, smooth_k, cu_q, cu_k, max_q, max_k)
    grad_out = _last_dim_contiguous(grad_out)
    do_codes, do_scale = quantize_blocks(grad_out, cu_q, max_q)
    return _bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                softcap, cfg_dkdv, cfg_dq, int8=(codes, do_codes, do_scale))
