"""int4 op family: leanops::int4_weight_mm (W4A16, group-wise, symmetric or with zero points).

The packed layout is documented in leanops.quant.int4. Numerics every backend follows (the
reference below is the definition): the dense weight W = (q - z) * s is formed in the scales'
dtype (one rounding), converted to x's dtype, and multiplied with fp32 accumulation; then
out = (acc + bias) rounded once to x's dtype.

CPU kernels (the "cpu" backend, kernels/cpu/) dequantise exactly as the reference (a 16-entry
table per group holds the rounded values) and differ only in the order of the fp32 sum.
"""

from __future__ import annotations

import torch

from leanops.dispatch import OpBackends
from leanops.ops._autograd import register_weight_only_autograd
from leanops.ops._checks import (
    FLOAT_DTYPES,
    UINT8,
    check_group_quant_args,
    check_same_device,
    check_tensor,
    cuda_gemm_m_unsupported,
)
from leanops.ops._library import register
from leanops.ops._reference import linear_reference
from leanops.quant import int4 as int4_format


def _check_int4_weight_mm(x, w_packed, scales, zeros, group_size, bias=None):
    op = "leanops.int4_weight_mm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "w_packed", w_packed, dtypes=UINT8, dim=2, contiguous=True)
    k = x.shape[1]
    n = w_packed.shape[0]
    if w_packed.shape[1] * 2 != k:
        raise ValueError(
            f"{op}: w_packed must be uint8 [N, K/2] with K = {k} (the columns of x), got shape "
            f"{tuple(w_packed.shape)}"
        )
    try:
        int4_format.check_group_size(group_size, k)
    except ValueError as exc:
        raise ValueError(f"{op}: {exc}") from None
    check_group_quant_args(op, scales, zeros, bias, n, k // group_size)
    check_same_device(op, x=x, w_packed=w_packed, scales=scales, zeros=zeros, bias=bias)


def _int4_weight_mm_reference(x, w_packed, scales, zeros, group_size, bias=None):
    w = int4_format.dequantize_int4(w_packed, scales, zeros, group_size).to(x.dtype)
    return linear_reference(x, w, bias)


def _int4_weight_mm_cuda_supports(x, w_packed, scales, zeros, group_size, bias=None):
    # The tensor-core kernel (kernels/cuda/int4_weight_mm.cu) dequantises into 16-bit mma
    # operands in the scales' dtype, which is then also x's; anything else runs on Triton.
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the CUDA kernel takes float16/bfloat16 x, got {x.dtype}"
    if scales.dtype != x.dtype:
        return f"the CUDA kernel needs scales in x's dtype ({x.dtype}), got {scales.dtype}"
    if (why := cuda_gemm_m_unsupported(x.shape[0])) is not None:
        return why
    if w_packed.data_ptr() % 16 != 0:  # cp.async copies 16-byte units; a fresh tensor is aligned
        return "the CUDA kernel needs w_packed's data 16-byte aligned (it is a view at an odd offset)"
    return None


_int4_weight_mm_backends = OpBackends(
    "int4_weight_mm",
    reference=_int4_weight_mm_reference,
    triton="leanops.triton.int4_weight_mm:int4_weight_mm",
    cuda_supports=_int4_weight_mm_cuda_supports,
    cpu=True,
)


def _int4_weight_mm_impl(x, w_packed, scales, zeros, group_size, bias=None):
    _check_int4_weight_mm(x, w_packed, scales, zeros, group_size, bias)
    if x.shape[0] == 0 or w_packed.shape[0] == 0:
        return _int4_weight_mm_reference(x, w_packed, scales, zeros, group_size, bias)
    return _int4_weight_mm_backends(x, w_packed, scales, zeros, group_size, bias)


register(
    "int4_weight_mm",
    "(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int group_size, "
    "Tensor? bias=None) -> Tensor",
    _int4_weight_mm_impl,
)


@torch.library.register_fake("leanops::int4_weight_mm")
def _int4_weight_mm_fake(x, w_packed, scales, zeros, group_size, bias=None):
    _check_int4_weight_mm(x, w_packed, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], w_packed.shape[0]))


register_weight_only_autograd(
    "int4_weight_mm",
    weight_indices=(1, 2, 3),
    bias_index=5,
    dense_weight=int4_format.dequantize_int4,
)


def int4_weight_mm(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W4A16 matmul: out = x @ W.T + bias, W[n, k] = (q - z) * s of group k // group_size formed
    in the scales' dtype, then converted to x's dtype; fp32 accumulation, rounded once to x's
    dtype. Differentiable in x and bias (the weight is frozen).

    Arguments:
        x: [M, K] float16, bfloat16 or float32, any strides.
        w_packed: uint8 [N, K/2], contiguous: two codes per byte, column 2j in the low nibble
            (the layout of leanops.quant.int4).
        scales: [N, K/group_size] float, contiguous.
        zeros: None (symmetric: the zero point is 8) or uint8 [N, K/group_size], contiguous.
        group_size: a multiple of 32 dividing K (K itself: one scale per output channel).
        bias: None or [N] float, contiguous.

    Returns: [M, N] in x's dtype.

    Raises: ValueError naming the argument for a wrong shape, dtype, layout, group size or
    device.

    On a CPU the dense weight is formed exactly as the reference forms it; only the order of
    the fp32 sum differs (blocked 16-lane sums for M <= 4, BLAS on dequantised tiles above):
    an fp32 rounding difference, about K * 2^-24 * sum |x * W| at worst.
    """
    return torch.ops.leanops.int4_weight_mm.default(x, w_packed, scales, zeros, group_size, bias)
