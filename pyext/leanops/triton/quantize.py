"""Dynamic per-token int8 quantisation in Triton, bit-exact with
leanops.quant.int8.quantize_per_token_int8:

    xs = fp32(x) * fp32(smooth);  scale = max(max|xs| / 127, FLT_MIN);  q = rne(xs / scale)
    clamped to [-127, 127]; a row holding NaN/Inf gets scale NaN and all-zero codes.

One program per row (a token), one fused pass over HBM when the row fits in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanops.triton import _common as common

# torch.finfo(torch.float32).tiny, the reference's clamp (2**-126, exact in fp32)
FLT_MIN = tl.constexpr(1.1754943508222875e-38)
# 1.5 * 2**23: for |v| < 2**22, v + MAGIC lands in [2**23, 2**24) where the fp32 spacing is
# exactly 1, so the add itself rounds v to an integer with the FPU's round-half-to-even, and
# subtracting MAGIC back is exact. That is torch.round's rounding, without libdevice's rint
# (which the interpreter lacks). |v| <= 127 * (1 + 2**-23) here, far inside the range.
RNE_MAGIC = tl.constexpr(12582912.0)
QMAX = tl.constexpr(127.0)


@triton.jit
def _scale_of(amax, n_bad):
    # IEEE division (div_rn), as torch's amax / 127; x / 127 compiled as x * (1/127) would be off
    # by an ulp for some rows and then every code of the row could shift.
    scale = tl.maximum(tl.math.div_rn(amax, QMAX), FLT_MIN)
    return tl.where(n_bad > 0, float("nan"), scale)


@triton.jit
def _codes(xs, scale, n_bad):
    v = tl.math.div_rn(xs, scale)
    r = (v + RNE_MAGIC) - RNE_MAGIC
    r = tl.minimum(tl.maximum(r, -QMAX), QMAX)
    # Non-finite row: codes 0 (the NaN scale carries the NaN into the matmul output); done on the
    # float before the int8 conversion, which is undefined for NaN.
    return tl.where(n_bad > 0, 0.0, r).to(tl.int8)


@triton.jit
def _load_row(x_row, smooth_ptr, offs, K, stride_xk, HAS_SMOOTH: tl.constexpr):
    mask = offs < K
    xs = tl.load(x_row + offs.to(tl.int64) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        xs = xs * tl.load(smooth_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return xs, mask


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, smooth_ptr, q_ptr, scale_ptr,
    K, stride_xm, stride_xk, stride_qm,
    HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    q_row = q_ptr + row * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if SINGLE_PASS:
        # The whole row stays in registers between the reduction and the quantisation: x is
        # read from HBM once.
        xs, mask = _load_row(x_row, smooth_ptr, offs, K, stride_xk, HAS_SMOOTH)
        a = tl.abs(xs)
        amax = tl.max(a, axis=0)
        # tl.max need not propagate NaN (GPU max is maxNum), so count non-finite values: NaN
        # fails every comparison and inf is not < inf. Masked lanes are 0, hence finite.
        n_bad = tl.sum(tl.where(a < float("inf"), 0, 1), axis=0)
        scale = _scale_of(amax, n_bad)
        tl.store(q_row + offs, _codes(xs, scale, n_bad), mask=mask)
    else:
        # Rows too long for registers: pass 1 reduces, pass 2 re-reads (mostly from L2: a row
        # is at most a few tens of KiB) and quantises.
        amax = 0.0
        n_bad = 0
        k_tiles = tl.cdiv(K, BLOCK_K)
        for t in range(0, k_tiles):
            xs, mask = _load_row(x_row, smooth_ptr, t * BLOCK_K + offs, K, stride_xk, HAS_SMOOTH)
            a = tl.abs(xs)
            amax = tl.maximum(amax, tl.max(a, axis=0))
            n_bad += tl.sum(tl.where(a < float("inf"), 0, 1), axis=0)
        scale = _scale_of(amax, n_bad)
        for t in range(0, k_tiles):
            k = t * BLOCK_K + offs
            xs, mask = _load_row(x_row, smooth_ptr, k, K, stride_xk, HAS_SMOOTH)
            tl.store(q_row + k, _codes(xs, scale, n_bad), mask=mask)
    tl.store(scale_ptr + row, scale)


# Up to 16384 fp32 values per row in registers: 32 per thread at 16 warps, no spilling. Covers
# hidden sizes up to 16K (Llama-7B's 4096 and its 11008-wide MLP input); longer rows go two-pass.
MAX_SINGLE_PASS = 16384
TWO_PASS_BLOCK = 4096


def _num_warps(block_k: int) -> int:
    # ~16 fp32 elements per thread keeps the loads 16-byte wide without register pressure.
    return max(1, min(16, block_k // (32 * 16)))


def _launch(x, smooth=None, block_k=None, single_pass=None):
    M, K = x.shape
    q = torch.empty((M, K), device=x.device, dtype=torch.int8)
    scale = torch.empty((M,), device=x.device, dtype=torch.float32)
    if block_k is None:
        full = common.next_power_of_2(K)
        single_pass = full <= MAX_SINGLE_PASS
        block_k = full if single_pass else TWO_PASS_BLOCK
    elif single_pass is None:
        single_pass = block_k >= K
    with common.device_guard(x):
        _quantize_per_token_kernel[(M,)](
            x, x if smooth is None else smooth, q, scale,
            K, x.stride(0), x.stride(1), q.stride(0),
            HAS_SMOOTH=smooth is not None, BLOCK_K=block_k, SINGLE_PASS=single_pass,
            num_warps=_num_warps(block_k), **common.LAUNCH_OPTIONS,
        )
    return q, scale


def quantize_per_token_int8(x, smooth=None):
    """Triton kernel of leanops::quantize_per_token_int8 (arguments validated by the op)."""
    return _launch(x, smooth)
