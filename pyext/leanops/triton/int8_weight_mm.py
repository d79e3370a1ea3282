"""W8A16 matmul in Triton: out = (x @ w.T * w_scale[None, :] + bias) rounded once to x's dtype,
x [M, K] float16/bfloat16/float32 (any strides), w int8 [N, K] contiguous, w_scale [N].

Every int8 value is exact in fp16/bf16/fp32, so converting the weight tile to x's dtype in
registers loses nothing; the MMA runs in x's dtype with fp32 accumulation and the per-channel
scale is applied once to the accumulator (it is constant along K), as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanops.triton import _common as common
from leanops.triton import _matmul as matmul
from leanops.triton._matmul import k_slice, store_partial, store_tile, tile_ids


@triton.jit
def _int8_weight_mm_kernel(
    x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, ws_ptr,
    M, N, K, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on, stride_ws_s,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_first, k_end = k_slice(tl.program_id(1), K, BLOCK_K, SPLIT_K)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Edge tiles re-read row 0 (unmasked, vectorised loads); the store mask drops those rows.
    rm = tl.where(offs_m < M, offs_m, 0)
    rn = tl.where(offs_n < N, offs_n, 0)
    k0 = k_first.to(tl.int64) * BLOCK_K
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk
    # w [N, K] row-major read as the [BLOCK_K, BLOCK_N] operand of x @ w.T.
    w_ptrs = w_ptr + rn[None, :] * stride_wn + (k0 + offs_k)[:, None] * stride_wk
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    w_step = tl.cast(stride_wk, tl.int64) * BLOCK_K

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(k_first, k_end):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = K - t * BLOCK_K
            x = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            w = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0)
        # int8 -> x's dtype is exact; the weight travels HBM -> SMEM as 1 byte per value.
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
        x_ptrs += x_step
        w_ptrs += w_step

    if SPLIT_K == 1:
        out = acc * tl.load(w_scale_ptr + rn).to(tl.float32)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        store_tile(out_ptr, out, offs_m, offs_n, M, N, stride_om, stride_on)
    else:
        # fp32 partial sums; the reduce adds them in slice order, then scales once.
        store_partial(ws_ptr, acc, offs_m, offs_n, M, N, stride_ws_s)


_kernel = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(
    _int8_weight_mm_kernel
)

# 16-bit activations: BLOCK_K = 64 already moves 128 bytes per x row; 256 only pays off for the
# decode path where the weight tile (1 byte per value) is the bulk of each load.
FAMILY = matmul.matmul_family(
    _kernel, small_block_ks=(64, 128, 256), large_block_ks=(32, 64), x_bytes=matmul.x_element_bytes,
    w_bytes=1, ws_dtype=torch.float32,
)


def _launch(x, w, w_scale, bias=None, cfg=None):
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty((M, N), device=x.device, dtype=x.dtype)
    return matmul.run_matmul(
        FAMILY,
        (x, w, w_scale, w_scale if bias is None else bias),
        out, M, N, K,
        (x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1)),
        meta={"HAS_BIAS": bias is not None, "DOT_PRECISION": common.dot_precision(x.dtype)},
        epilogue={"col_scale": w_scale, "bias": bias},
        cfg=cfg,
    )


def int8_weight_mm(x, w, w_scale, bias=None):
    """Triton kernel of leanops::int8_weight_mm (arguments validated by the op)."""
    return _launch(x, w, w_scale, bias)
