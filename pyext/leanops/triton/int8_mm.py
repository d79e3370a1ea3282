"""W8A8 matmul in Triton: out = (fp32(a @ b.T) * a_scale[:, None] * b_scale[None, :] + bias)
rounded once to out_dtype, a int8 [M, K] (any strides), b int8 [N, K] contiguous.

The products accumulate in int32 (exact while K * 128 * 128 < 2**31, K < 131072), so the only
rounding is the reference's fp32 epilogue, done in its order with fp contraction off (see
_common.LAUNCH_OPTIONS): the result should equal leanops.ops.int8's reference bit for bit (the
tests allow 1 ulp of out_dtype). Split-K partials stay int32, so the decode path is exact too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanops.triton import _matmul as matmul
from leanops.triton._matmul import k_slice, store_partial, store_tile, tile_ids


@triton.jit
def _int8_mm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on, stride_ws_s,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_first, k_end = k_slice(tl.program_id(1), K, BLOCK_K, SPLIT_K)

    # int64 before any stride product: offsets pass 2**31 on large activations.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Edge tiles read row 0 instead of masking: loads stay unmasked along M/N (vectorised, no
    # predicate per element) and the extra rows are dropped by the masked store.
    rm = tl.where(offs_m < M, offs_m, 0)
    rn = tl.where(offs_n < N, offs_n, 0)
    k0 = k_first.to(tl.int64) * BLOCK_K
    # b is [N, K] row-major; it is read as the [BLOCK_K, BLOCK_N] operand of a @ b.T ("NT" GEMM,
    # K contiguous in both operands, which is what the int8 MMA wants).
    a_ptrs = a_ptr + rm[:, None] * stride_am + (k0 + offs_k)[None, :] * stride_ak
    b_ptrs = b_ptr + rn[None, :] * stride_bn + (k0 + offs_k)[:, None] * stride_bk
    a_step = tl.cast(stride_ak, tl.int64) * BLOCK_K
    b_step = tl.cast(stride_bk, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for t in range(k_first, k_end):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - t * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        # out_dtype spelled out: Triton 3.6 defaults it to fp32 even with an int32 acc.
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += a_step
        b_ptrs += b_step

    if SPLIT_K == 1:
        a_s = tl.load(a_scale_ptr + rm).to(tl.float32)
        b_s = tl.load(b_scale_ptr + rn).to(tl.float32)
        out = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        store_tile(out_ptr, out, offs_m, offs_n, M, N, stride_om, stride_on)
    else:
        # Unscaled int32 partials: slices then add exactly in the reduce, which applies the
        # epilogue once, so split-K is bit-identical to the unsplit kernel.
        store_partial(ws_ptr, acc, offs_m, offs_n, M, N, stride_ws_s)


_kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
    _int8_mm_kernel
)

# int8 operands: 128-256 bytes of K per row per tile fill whole cache lines and the int8 MMA
# (k = 32 per instruction); decode tiles add 64 for small K.
FAMILY = matmul.matmul_family(
    _kernel, small_block_ks=(64, 128, 256), large_block_ks=(64, 128), x_bytes=1, w_bytes=1,
    ws_dtype=torch.int32,
)


def _launch(a, b, a_scale, b_scale, bias=None, out_dtype=None, cfg=None):
    M, K = a.shape
    N = b.shape[0]
    dtype = torch.bfloat16 if out_dtype is None else out_dtype
    out = torch.empty((M, N), device=a.device, dtype=dtype)
    return matmul.run_matmul(
        FAMILY,
        (a, b, a_scale, b_scale, b_scale if bias is None else bias),
        out, M, N, K,
        (a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1)),
        meta={"HAS_BIAS": bias is not None},
        epilogue={"row_scale": a_scale, "col_scale": b_scale, "bias": bias},
        cfg=cfg,
    )


def int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    """Triton kernel of leanops::int8_mm (arguments validated by the op)."""
    return _launch(a, b, a_scale, b_scale, bias, out_dtype)
