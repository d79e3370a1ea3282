"""2:4 sparse op family: leanops::sparse24_mm (16-bit activations x 2:4 weights) and
leanops::sparse24_int4_mm (the kept values also int4, group-wise).

The compressed layout is documented in leanops.sparsity.sparse24. Numerics every backend follows
(the references below are the definition):
  sparse24_mm       W = decompress_24(values, meta) exactly (values' dtype), converted to x's
                    dtype; acc = x @ W.T with fp32 accumulation; out = (acc + bias) rounded once
                    to x's dtype.
  sparse24_int4_mm  kept values (q - z) * s in the scales' dtype (one rounding, as int4), placed
                    by meta, converted to x's dtype; then as above.

Backends (cuda -> triton -> reference, see leanops.dispatch):
  sparse24_mm       "cuda": leanops_C::sparse24_mm (kernels/cuda/sparse24_mm.cu), the sparse
                    tensor cores (mma.sp, sm_80+) reading the stored (values, meta) as they are.
                    It takes x float16/bfloat16 with values of the same dtype and K a multiple
                    of 64 (bias any float dtype, x any strides); `_sparse24_mm_cuda_supports`
                    says why not otherwise and the call goes to Triton (fp32, mixed dtypes,
                    K % 64 != 0). "triton": every dtype and K.
  sparse24_int4_mm  "cuda": leanops_C::sparse24_int4_mm (kernels/cuda/sparse24_int4_mm.cu), the
                    same mma.sp kernel with the kept values dequantised from the stored int4
                    codes in registers ((q - z) * s, one rounding, bit-identical to the
                    reference's). It takes x float16/bfloat16 with scales of the same dtype and
                    K a multiple of 64 (group_size is already a multiple of 64 dividing K);
                    `_sparse24_int4_mm_cuda_supports` says why not otherwise and the call goes
                    to Triton (fp32 x, scales in another dtype, K % 64 != 0). "triton": every
                    dtype and K.

On CPU tensors both take the "cpu" backend (kernels/cpu/): the dense weight is formed exactly as
the references form it (kept values placed by the metadata rule, int4 through a table of the
rounded values) and only the order of the fp32 sum differs.
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
from leanops.sparsity import sparse24 as sparse_format


def _check_k(op, x):
    k = x.shape[1]
    if k % sparse_format.K_MULTIPLE != 0:
        raise ValueError(
            f"{op}: x has K = {k} columns (in_features); the 2:4 format needs K a multiple of 8 "
            "(groups of 4 inputs, two groups per metadata byte)"
        )
    return k


def _check_meta_arg(op, meta, n, k):
    check_tensor(op, "meta", meta, dtypes=UINT8, dim=2, contiguous=True)
    if tuple(meta.shape) != (n, k // 8):
        raise ValueError(
            f"{op}: meta must be uint8 [N, K/8] = ({n}, {k // 8}) (K = {k}, the columns of x); "
            f"got {tuple(meta.shape)}"
        )


# ---------------------------------------------------------------------------------------------
# sparse24_mm(x [M, K], values [N, K/2], meta uint8 [N, K/8], bias [N]?) -> [M, N] in x.dtype


def _check_sparse24_mm(x, values, meta, bias=None):
    op = "leanops.sparse24_mm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "values", values, dtypes=FLOAT_DTYPES, dim=2, contiguous=True)
    k = _check_k(op, x)
    n = values.shape[0]
    if values.shape[1] * 2 != k:
        raise ValueError(
            f"{op}: values must be [N, K/2] with K = {k} (the columns of x), got shape "
            f"{tuple(values.shape)}"
        )
    _check_meta_arg(op, meta, n, k)
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(n,), contiguous=True)
    check_same_device(op, x=x, values=values, meta=meta, bias=bias)


def _sparse24_mm_reference(x, values, meta, bias=None):
    w = sparse_format.decompress_24(values, meta).to(x.dtype)
    return linear_reference(x, w, bias)


# What leanops_C::sparse24_mm takes (its binding checks the same and raises otherwise).
_CUDA_DTYPES = (torch.float16, torch.bfloat16)
_CUDA_K_MULTIPLE = 64  # the kernels' k-tile: kSparse24KMultiple, kSparse24Int4KMultiple


def _cuda_unsupported(x, n, name, operand):
    """The checks both 2:4 CUDA kernels make: None, or why this call cannot run there. `operand`
    (called `name` in the message) must be in x's dtype; n is the weight's row count."""
    if x.dtype not in _CUDA_DTYPES:
        return f"the CUDA kernel takes float16/bfloat16 x, got {x.dtype}"
    if operand.dtype != x.dtype:
        return f"the CUDA kernel needs {name} in x's dtype ({x.dtype}), got {operand.dtype}"
    k = x.shape[1]
    if k == 0 or k % _CUDA_K_MULTIPLE != 0:  # K = 0: the binding refuses; the others return bias
        return f"the CUDA kernel needs K a positive multiple of {_CUDA_K_MULTIPLE}, got K = {k}"
    if k > 1 << 30 or n > 1 << 30:
        return f"the CUDA kernel takes K and N up to 2^30, got K = {k}, N = {n}"
    if (why := cuda_gemm_m_unsupported(x.shape[0])) is not None:
        return why
    return None


def _sparse24_mm_cuda_supports(x, values, meta, bias=None):
    """None if the CUDA kernel can run this (already checked) call, else why not."""
    return _cuda_unsupported(x, values.shape[0], "values", values)


_sparse24_mm_backends = OpBackends(
    "sparse24_mm",
    reference=_sparse24_mm_reference,
    triton="leanops.triton.sparse24_mm:sparse24_mm",
    cuda_supports=_sparse24_mm_cuda_supports,
    cpu=True,
)


def _sparse24_mm_impl(x, values, meta, bias=None):
    _check_sparse24_mm(x, values, meta, bias)
    if x.shape[0] == 0 or values.shape[0] == 0:
        return _sparse24_mm_reference(x, values, meta, bias)
    return _sparse24_mm_backends(x, values, meta, bias)


register(
    "sparse24_mm",
    "(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor",
    _sparse24_mm_impl,
)


@torch.library.register_fake("leanops::sparse24_mm")
def _sparse24_mm_fake(x, values, meta, bias=None):
    _check_sparse24_mm(x, values, meta, bias)
    return x.new_empty((x.shape[0], values.shape[0]))


register_weight_only_autograd(
    "sparse24_mm",
    weight_indices=(1, 2),
    bias_index=3,
    dense_weight=sparse_format.decompress_24,
)


def sparse24_mm(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """2:4 sparse matmul: out = x @ W.T + bias, W the 2:4 weight (values, meta) decompressed
    exactly and converted to x's dtype; fp32 accumulation, rounded once to x's dtype.
    Differentiable in x and bias (the compressed weight is frozen).

    Arguments:
        x: [M, K] float16, bfloat16 or float32, any strides; K a multiple of 8.
        values: [N, K/2] float, contiguous: the two kept entries of every group of 4 inputs.
        meta: uint8 [N, K/8], contiguous: their in-group indices, two groups per byte (the
            layout of leanops.sparsity.sparse24; codes are not re-checked per call).
        bias: None or [N] float, contiguous.

    Returns: [M, N] in x's dtype.

    Raises: ValueError naming the argument for a wrong shape, dtype, layout or device.

    On a CPU only the order of the fp32 sum differs from the reference (an fp32 rounding
    difference).
    """
    return torch.ops.leanops.sparse24_mm.default(x, values, meta, bias)


# ---------------------------------------------------------------------------------------------
# sparse24_int4_mm(x [M, K], values uint8 [N, K/4], meta uint8 [N, K/8], scales [N, K/g],
#                  zeros uint8 [N, K/g]?, group_size, bias [N]?) -> [M, N] in x.dtype


def _check_sparse24_int4_mm(x, values, meta, scales, zeros, group_size, bias=None):
    op = "leanops.sparse24_int4_mm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "values", values, dtypes=UINT8, dim=2, contiguous=True)
    k = _check_k(op, x)
    n = values.shape[0]
    if values.shape[1] * 4 != k:
        raise ValueError(
            f"{op}: values must be uint8 [N, K/4] (two int4 codes per byte, K/2 kept values) with "
            f"K = {k} (the columns of x), got shape {tuple(values.shape)}"
        )
    _check_meta_arg(op, meta, n, k)
    try:
        sparse_format.check_int4_group_size(group_size, k)
    except ValueError as exc:
        raise ValueError(f"{op}: {exc}") from None
    check_group_quant_args(op, scales, zeros, bias, n, k // group_size)
    check_same_device(op, x=x, values=values, meta=meta, scales=scales, zeros=zeros, bias=bias)


def _sparse24_int4_mm_reference(x, values, meta, scales, zeros, group_size, bias=None):
    w = sparse_format.decompress_24_int4(values, scales, zeros, meta, group_size).to(x.dtype)
    return linear_reference(x, w, bias)


def _sparse24_int4_mm_cuda_supports(x, values, meta, scales, zeros, group_size, bias=None):
    """None if the CUDA kernel can run this (already checked) call, else why not."""
    # The kernel dequantises into 16-bit mma operands in the scales' dtype, which must then
    # also be x's (kernels/sparse24_int4_mm.cpp checks the same and raises otherwise).
    return _cuda_unsupported(x, values.shape[0], "scales", scales)


_sparse24_int4_mm_backends = OpBackends(
    "sparse24_int4_mm",
    reference=_sparse24_int4_mm_reference,
    triton="leanops.triton.sparse24_mm:sparse24_int4_mm",
    cuda_supports=_sparse24_int4_mm_cuda_supports,
    cpu=True,
)


def _sparse24_int4_mm_impl(x, values, meta, scales, zeros, group_size, bias=None):
    _check_sparse24_int4_mm(x, values, meta, scales, zeros, group_size, bias)
    args = (x, values, meta, scales, zeros, group_size, bias)
    if x.shape[0] == 0 or values.shape[0] == 0:
        return _sparse24_int4_mm_reference(*args)
    return _sparse24_int4_mm_backends(*args)


register(
    "sparse24_int4_mm",
    "(Tensor x, Tensor values, Tensor meta, Tensor scales, Tensor? zeros, int group_size, "
    "Tensor? bias=None) -> Tensor",
    _sparse24_int4_mm_impl,
)


@torch.library.register_fake("leanops::sparse24_int4_mm")
def _sparse24_int4_mm_fake(x, values, meta, scales, zeros, group_size, bias=None):
    _check_sparse24_int4_mm(x, values, meta, scales, zeros, group_size, bias)
    return x.new_empty((x.shape[0], values.shape[0]))


def _int4_dense_weight(values, meta, scales, zeros, group_size):
    return sparse_format.decompress_24_int4(values, scales, zeros, meta, group_size)


register_weight_only_autograd(
    "sparse24_int4_mm",
    weight_indices=(1, 2, 3, 4),
    bias_index=6,
    dense_weight=_int4_dense_weight,
)


def sparse24_int4_mm(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """2:4 + int4 matmul: out = x @ W.T + bias, W the 2:4 weight whose kept values are int4
    group-wise ((q - z) * s in the scales' dtype, placed by meta, converted to x's dtype); fp32
    accumulation, rounded once to x's dtype. Differentiable in x and bias.

    Arguments:
        x: [M, K] float16, bfloat16 or float32, any strides; K a multiple of 8.
        values: uint8 [N, K/4], contiguous: int4 codes of the K/2 kept values, two per byte
            (leanops.quant.int4's packing).
        meta: uint8 [N, K/8], contiguous (leanops.sparsity.sparse24).
        scales: [N, K/group_size] float, contiguous.
        zeros: None (symmetric: zero point 8) or uint8 [N, K/group_size], contiguous.
        group_size: a multiple of 64 dividing K, counted in original input columns (each group
            keeps group_size / 2 values).
        bias: None or [N] float, contiguous.

    Returns: [M, N] in x's dtype.

    Raises: ValueError naming the argument for a wrong shape, dtype, layout, group size or
    device.

    On a CPU only the order of the fp32 sum differs from the reference (an fp32 rounding
    difference).
    """
    return torch.ops.leanops.sparse24_int4_mm.default(
        x, values, meta, scales, zeros, group_size, bias
    )
