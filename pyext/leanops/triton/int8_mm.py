"""The int8-weight matmuls in Triton, one kernel with a constexpr switch (X_INT8):

  int8_mm         (W8A8)  out = (fp32(a @ b.T) * a_scale[:, None] * b_scale[None, :] + bias),
                  a int8 [M, K] (any strides), b int8 [N, K] contiguous, out in out_dtype
  int8_weight_mm  (W8A16) out = (x @ w.T * w_scale[None, :] + bias), x [M, K]
                  float16/bfloat16/float32 (any strides), w int8 [N, K] contiguous, out in x's
                  dtype (the launcher is leanops.triton.int8_weight_mm)

W8A8: the products accumulate in int32 (exact while K * 128 * 128 < 2**31, K < 131072), so the
only rounding is the reference's fp32 epilogue, done in its order with fp contraction off (see
_common.LAUNCH_OPTIONS): the result should equal leanops.ops.int8's reference bit for bit (the
tests allow 1 ulp of out_dtype). Split-K partials stay int32, so the decode path is exact too.

W8A16: every int8 value is exact in fp16/bf16/fp32, so converting the weight tile to x's dtype in
registers loses nothing; the MMA runs in x's dtype with fp32 accumulation and the per-channel
scale is applied once to the accumulator (it is constant along K), as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanops.triton import _matmul as matmul
from leanops.triton._matmul import matmul_epilogue, matmul_prologue


@triton.jit
def _int8_mm_kernel(
    x_ptr, w_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_ws_s,
    X_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    offs_m, offs_n, rm, rn, offs_k, k0, k_first, k_end, x_ptrs, x_step = matmul_prologue(
        x_ptr, M, N, K, stride_xm, stride_xk, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT_K)
    # w is [N, K] row-major; it is read as the [BLOCK_K, BLOCK_N] operand of x @ w.T ("NT" GEMM,
    # K contiguous in both operands, which is what the int8 MMA wants).
    w_ptrs = w_ptr + rn[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K

    if X_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(k_first, k_end):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - t * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        if X_INT8:
            # out_dtype spelled out: Triton 3.6 defaults it to fp32 even with an int32 acc.
            acc = tl.dot(x, w, acc, out_dtype=tl.int32)
        else:
            # int8 -> x's dtype is exact; the weight travels HBM -> SMEM as 1 byte per value.
            acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step

    # W8A8 scales rows by a_scale and columns by b_scale; W8A16 columns by w_scale only.
    matmul_epilogue(out_ptr, ws_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, acc, offs_m, offs_n,
                    rm, rn, M, N, stride_om, stride_on, stride_ws_s, X_INT8, True, HAS_BIAS,
                    SPLIT_K)


KERNEL = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
    _int8_mm_kernel
)

# int8 operands: 128-256 bytes of K per row per tile fill whole cache lines and the int8 MMA
# (k = 32 per instruction); decode tiles add 64 for small K.
FAMILY = matmul.matmul_family(
    KERNEL, small_block_ks=(64, 128, 256), large_block_ks=(64, 128), x_bytes=1, w_bytes=1,
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
        # DOT_PRECISION is unused by the int8 dot; one fixed value keeps one compiled variant.
        meta={"X_INT8": True, "HAS_BIAS": bias is not None, "DOT_PRECISION": "tf32"},
        epilogue={"row_scale": a_scale, "col_scale": b_scale, "bias": bias},
        cfg=cfg,
    )


def int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    """Triton kernel of leanops::int8_mm (arguments validated by the op)."""
    return _launch(a, b, a_scale, b_scale, bias, out_dtype)
