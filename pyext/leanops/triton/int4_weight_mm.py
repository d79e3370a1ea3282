"""W4A16 group-wise matmul in Triton: out = (x @ W.T + bias) rounded once to x's dtype, with
W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g] formed in the scales' dtype, then converted to
x's dtype (the layout and numerics of leanops.quant.int4 / leanops.ops.int4).

The packed weight is streamed as stored (uint8 [N, K/2], byte j of a row holding columns 2j in
its low nibble and 2j+1 in its high nibble) and dequantised in registers, so HBM traffic for the
weight is half a byte per value plus the group scales.
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
def _int4_weight_mm_kernel(
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_om, stride_on, stride_ws_s,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):
    # BLOCK_K divides GROUP_SIZE (keep() enforces it), so a K tile lies inside one group: one
    # scale (and zero) per weight row per tile, a [BLOCK_N] vector instead of a gather. K is a
    # multiple of the group size, hence of BLOCK_K: no K tail, no K mask.
    tl.static_assert(GROUP_SIZE % BLOCK_K == 0)
    offs_m, offs_n, rm, rn, offs_k, k0, k_first, k_end, x_ptrs, x_step = matmul_prologue(
        x_ptr, M, N, K, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K)
    offs_kp = tl.arange(0, BLOCK_K // 2)
    groups = K // GROUP_SIZE  # scales / zeros are [N, groups] contiguous
    # The packed tile as the [BLOCK_K/2, BLOCK_N] operand layout of x @ W.T (bytes contiguous
    # along K within a weight row).
    w_ptrs = w_ptr + rn[None, :] * stride_wn + (k0 // 2 + offs_kp)[:, None]
    sz_ptrs = rn * groups  # row starts in scales / zeros

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(k_first, k_end):
        x = tl.load(x_ptrs)
        packed = tl.load(w_ptrs)
        q = unpack_nibbles(packed, BLOCK_K, BLOCK_N)
        g = (t * BLOCK_K) // GROUP_SIZE
        # The conversion to x's dtype is the reference's second rounding step.
        w = dequantize_int4(q, scales_ptr, zeros_ptr, sz_ptrs, g, HAS_ZEROS, BLOCK_N).to(x.dtype)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        x_ptrs += x_step
        w_ptrs += BLOCK_K // 2

    matmul_epilogue(out_ptr, ws_ptr, bias_ptr, bias_ptr, bias_ptr, acc, offs_m, offs_n, rm, rn,
                    M, N, stride_om, stride_on, stride_ws_s, False, False, HAS_BIAS, SPLIT_K)


# BLOCK_K 32..256 filtered by the group size (it must divide it): g = 32 streams 16 bytes of
# packed weight per row per tile, g >= 128 can use 64-128 byte runs.
FAMILY = matmul.matmul_family(
    _int4_weight_mm_kernel, small_block_ks=(32, 64, 128, 256), large_block_ks=(32, 64),
    x_bytes=matmul.x_element_bytes, w_bytes=0.5, ws_dtype=torch.float32,
    key=("M_BUCKET", "N", "K", "GROUP_SIZE"), valid=matmul.group_size_divides_block_k,
)


def _launch(x, w_packed, scales, zeros, group_size, bias=None, cfg=None):
    M, K = x.shape
    N = w_packed.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return matmul.run_matmul(
        FAMILY,
        (x, w_packed, scales, scales if zeros is None else zeros, scales if bias is None else bias),
        out, M, N, K,
        (x.stride(0), x.stride(1), w_packed.stride(0), out.stride(0), out.stride(1)),
        meta={
            "HAS_ZEROS": zeros is not None,
            "HAS_BIAS": bias is not None,
            "GROUP_SIZE": int(group_size),
            "DOT_PRECISION": common.dot_precision(x.dtype),
        },
        epilogue={"bias": bias},
        cfg=cfg,
    )


def int4_weight_mm(x, w_packed, scales, zeros, group_size, bias=None):
    """Triton kernel of leanops::int4_weight_mm (arguments validated by the op)."""
    return _launch(x, w_packed, scales, zeros, group_size, bias)
