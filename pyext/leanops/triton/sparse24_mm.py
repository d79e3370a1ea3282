"""2:4 sparse matmuls in Triton, decompressing the weight on the fly (the portable path; the
sparse tensor cores are for the CUDA kernels): out = (x @ W.T + bias) rounded once to x's dtype.

  sparse24_mm       W from (values [N, K/2], meta uint8 [N, K/8]) (leanops.sparsity.sparse24)
  sparse24_int4_mm  the kept values int4 group-wise first ((q - z) * s in the scales' dtype)

The compressed weight is streamed as stored, so HBM traffic for it is 1.125 bytes per dense
16-bit entry (0.4375 for the int4 variant, plus scales). Each K tile is expanded in registers:
a tile of BLOCK_K inputs is BLOCK_K/4 groups; the two kept values of each group are split out of
the values tile, the group codes out of the meta bytes, and the four dense entries of every group
selected (p == i0 -> v0, p == i1 -> v1, else 0), then interleaved back into K order with
join/permute/reshape (the nibble trick of the int4 kernel), and fed to tl.dot as a dense tile.
The MMA therefore does the dense 2MNK work: the win over dense is bytes (decode), not FLOPs.

The launcher skeleton (decode split-K / prefill tiles, autotuning, the reduce) is the one of the
other matmuls: leanops.triton._matmul.run_matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanops.triton import _common as common
from leanops.triton import _matmul as matmul
from leanops.triton._matmul import (
    dequantize_int4,
    matmul_epilogue,
    matmul_prologue,
    unpack_nibbles,
)


@triton.jit
def _expand_24(kept, codes, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """kept values [BLOCK_K/2, BLOCK_N] (2 per group, K order) and group codes [BLOCK_K/4,
    BLOCK_N] -> the dense tile [BLOCK_K, BLOCK_N] (the rule of leanops.sparsity.sparse24)."""
    G: tl.constexpr = BLOCK_K // 4
    v0, v1 = tl.split(tl.permute(tl.reshape(kept, (G, 2, BLOCK_N)), (0, 2, 1)))
    i0 = codes & 3
    i1 = (codes >> 2) & 3
    zero = tl.zeros_like(v0)
    d0 = tl.where(i0 == 0, v0, tl.where(i1 == 0, v1, zero))
    d1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    d2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    d3 = tl.where(i0 == 3, v0, tl.where(i1 == 3, v1, zero))
    # join(join(d0, d1), join(d2, d3))[g, n, s, t] = d_{2t + s}; permuting to (g, t, s, n) and
    # flattening (g, t, s) gives k = 4g + 2t + s.
    dense = tl.join(tl.join(d0, d1), tl.join(d2, d3))
    return tl.reshape(tl.permute(dense, (0, 3, 2, 1)), (BLOCK_K, BLOCK_N))


@triton.jit
def _sparse24_mm_kernel(
    x_ptr, values_ptr, meta_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on, stride_ws_s,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # K is a multiple of 8 (the op checks it), so a ragged last K tile still ends on a meta byte:
    # the masks below cut x, values and meta at the same column.
    offs_m, offs_n, rm, rn, offs_k, k0, k_first, k_end, x_ptrs, x_step = matmul_prologue(
        x_ptr, M, N, K, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // 8)
    # values / meta rows read as the [*, BLOCK_N] operand layout of x @ W.T (contiguous along K).
    v_ptrs = values_ptr + rn[None, :] * stride_vn + (k0 // 2 + offs_v)[:, None]
    m_ptrs = meta_ptr + rn[None, :] * stride_mn + (k0 // 8 + offs_g)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(k_first, k_end):
        if EVEN_K:
            x = tl.load(x_ptrs)
            kept = tl.load(v_ptrs)
            meta = tl.load(m_ptrs)
        else:
            k_left = K - t * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            kept = tl.load(v_ptrs, mask=offs_v[:, None] < k_left // 2, other=0.0)
            # Missing meta bytes read as code 0 (i0 = i1 = 0) over zero values: zero weights.
            meta = tl.load(m_ptrs, mask=offs_g[:, None] < k_left // 8, other=0)
        codes = unpack_nibbles(meta, BLOCK_K // 4, BLOCK_N)
        w = _expand_24(kept.to(x.dtype), codes, BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += x_step
        v_ptrs += BLOCK_K // 2
        m_ptrs += BLOCK_K // 8

    matmul_epilogue(out_ptr, ws_ptr, bias_ptr, bias_ptr, bias_ptr, acc, offs_m, offs_n, rm, rn,
                    M, N, stride_om, stride_on, stride_ws_s, False, False, HAS_BIAS, SPLIT_K)


@triton.jit
def _sparse24_int4_mm_kernel(
    x_ptr, values_ptr, meta_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on, stride_ws_s,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # BLOCK_K divides GROUP_SIZE (keep() enforces it; GROUP_SIZE counts original input columns),
    # so a K tile's BLOCK_K/2 kept values lie in one quantisation group: one scale (and zero) per
    # weight row per tile. K is a multiple of GROUP_SIZE, hence of BLOCK_K: no K tail.
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
    offs_m, offs_n, rm, rn, offs_k, k0, k_first, k_end, x_ptrs, x_step = matmul_prologue(
        x_ptr, M, N, K, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K)
    offs_p = tl.arange(0, BLOCK_K // 4)  # packed bytes: 2 codes of kept values each
    offs_g = tl.arange(0, BLOCK_K // 8)
    groups = K // GROUP_SIZE  # scales / zeros are [N, groups] contiguous
    v_ptrs = values_ptr + rn[None, :] * stride_vn + (k0 // 4 + offs_p)[:, None]
    m_ptrs = meta_ptr + rn[None, :] * stride_mn + (k0 // 8 + offs_g)[:, None]
    sz_ptrs = rn * groups

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(k_first, k_end):
        x = tl.load(x_ptrs)
        packed = tl.load(v_ptrs)
        meta = tl.load(m_ptrs)
        # int4 codes of the kept values, in kept (K) order, dequantised as int4_weight_mm's.
        q = unpack_nibbles(packed, BLOCK_K // 2, BLOCK_N)
        g = (t * BLOCK_K) // GROUP_SIZE
        kept = dequantize_int4(q, scales_ptr, zeros_ptr, sz_ptrs, g, HAS_ZEROS, BLOCK_N)
        kept = kept.to(x.dtype)
        w = _expand_24(kept, unpack_nibbles(meta, BLOCK_K // 4, BLOCK_N), BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += x_step
        v_ptrs += BLOCK_K // 4
        m_ptrs += BLOCK_K // 8

    matmul_epilogue(out_ptr, ws_ptr, bias_ptr, bias_ptr, bias_ptr, acc, offs_m, offs_n, rm, rn,
                    M, N, stride_om, stride_on, stride_ws_s, False, False, HAS_BIAS, SPLIT_K)


# ---------------------------------------------------------------------------------------------
# sparse24_mm: configs and launcher

_kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
    _sparse24_mm_kernel
)

# The weight stream is 1.125 bytes per dense entry (16-bit values), between int8's 1 and int4's
# 0.5: the BLOCK_K choices of int8_weight_mm (64..256 for decode, 32/64 for prefill, where the
# expanded dense tile costs registers like a dequantised one).
def _w_bytes(args) -> float:
    # per dense weight entry: half a value plus an eighth of a meta byte
    return args["values_ptr"].element_size() / 2 + 1 / 8


FAMILY = matmul.matmul_family(
    _kernel, small_block_ks=(64, 128, 256), large_block_ks=(32, 64), x_bytes=matmul.x_element_bytes,
    w_bytes=_w_bytes, ws_dtype=torch.float32,
)


def _launch(x, values, meta, bias=None, cfg=None):
    M, K = x.shape
    N = values.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return matmul.run_matmul(
        FAMILY,
        (x, values, meta, values if bias is None else bias),
        out, M, N, K,
        (x.stride(0), x.stride(1), values.stride(0), meta.stride(0), out.stride(0), out.stride(1)),
        meta={"HAS_BIAS": bias is not None, "DOT_PRECISION": common.dot_precision(x.dtype)},
        epilogue={"bias": bias},
        cfg=cfg,
    )


def sparse24_mm(x, values, meta, bias=None):
    """Triton kernel of leanops::sparse24_mm (arguments validated by the op)."""
    return _launch(x, values, meta, bias)


# ---------------------------------------------------------------------------------------------
# sparse24_int4_mm: configs and launcher

# BLOCK_K must divide the group size (a multiple of 64): as int4_weight_mm. Weight bytes per
# dense entry: a quarter byte of codes plus an eighth of a meta byte.
INT4_FAMILY = matmul.matmul_family(
    _sparse24_int4_mm_kernel, small_block_ks=(32, 64, 128, 256), large_block_ks=(32, 64),
    x_bytes=matmul.x_element_bytes, w_bytes=0.375, ws_dtype=torch.float32,
    key=("M_BUCKET", "N", "K", "GROUP_SIZE"), valid=matmul.group_size_divides_block_k,
)


def _launch_int4(x, values, meta, scales, zeros, group_size, bias=None, cfg=None):
    M, K = x.shape
    N = values.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return matmul.run_matmul(
        INT4_FAMILY,
        (x, values, meta, scales, scales if zeros is None else zeros,
         scales if bias is None else bias),
        out, M, N, K,
        (x.stride(0), x.stride(1), values.stride(0), meta.stride(0), out.stride(0), out.stride(1)),
        meta={
            "HAS_ZEROS": zeros is not None,
            "HAS_BIAS": bias is not None,
            "GROUP_SIZE": int(group_size),
            "DOT_PRECISION": common.dot_precision(x.dtype),
        },
        epilogue={"bias": bias},
        cfg=cfg,
    )


def sparse24_int4_mm(x, values, meta, scales, zeros, group_size, bias=None):
    """Triton kernel of leanops::sparse24_int4_mm (arguments validated by the op)."""
    return _launch_int4(x, values, meta, scales, zeros, group_size, bias)
