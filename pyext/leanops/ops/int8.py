"""int8 op family: leanops::int8_mm (W8A8), leanops::int8_weight_mm (W8A16) and
leanops::quantize_per_token_int8 (dynamic activation quantisation).

Numerics every backend follows (the reference below is the definition):
  int8_mm         acc = a @ b.T exactly in int32; out = (fp32(acc) * a_scale[m] * b_scale[n]
                  + bias[n]) rounded once to out_dtype.
  int8_weight_mm  acc = x @ w.T with w converted exactly to x's dtype and fp32 accumulation;
                  out = (acc * w_scale[n] + bias[n]) rounded once to x's dtype.
  quantize_per_token_int8   see leanops.quant.int8.quantize_per_token_int8.

CPU kernels (the "cpu" backend, kernels/cpu/): quantize_per_token_int8, int8_mm and
int8_dynamic_linear are bit-exact with the references (exact integer sums, the same fp32
epilogue); int8_weight_mm differs from its reference only in the order of its fp32 sum.
"""

from __future__ import annotations

import torch

from leanops.dispatch import OpBackends, forced_backend
from leanops.ops._autograd import register_weight_only_autograd
from leanops.ops._checks import (
    FLOAT_DTYPES,
    check_out_dtype,
    check_same_device,
    check_tensor,
    cuda_gemm_m_unsupported,
)
from leanops.ops._library import register
from leanops.ops._reference import linear_reference
from leanops.quant import int8 as int8_format

INT8 = (torch.int8,)
DEFAULT_OUT_DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# quantize_per_token_int8(x [M, K], smooth [K]?) -> (q int8 [M, K], scale fp32 [M])


def _check_quantize_per_token(x, smooth=None):
    op = "leanops.quantize_per_token_int8"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one column, got shape {tuple(x.shape)}")
    if smooth is not None:
        check_tensor(op, "smooth", smooth, dtypes=FLOAT_DTYPES, shape=(x.shape[1],), contiguous=True)
        check_same_device(op, x=x, smooth=smooth)


def _quantize_per_token_reference(x, smooth=None):
    return int8_format.quantize_per_token_int8(x, smooth)


_quantize_per_token_backends = OpBackends(
    "quantize_per_token_int8",
    reference=_quantize_per_token_reference,
    triton="leanops.triton.quantize:quantize_per_token_int8",
    cpu=True,
)


def _quantize_per_token_impl(x, smooth=None):
    _check_quantize_per_token(x, smooth)
    if x.shape[0] == 0:
        return _quantize_per_token_reference(x, smooth)
    return _quantize_per_token_backends(x, smooth)


register(
    "quantize_per_token_int8",
    "(Tensor x, Tensor? smooth=None) -> (Tensor, Tensor)",
    _quantize_per_token_impl,
)


@torch.library.register_fake("leanops::quantize_per_token_int8")
def _quantize_per_token_fake(x, smooth=None):
    _check_quantize_per_token(x, smooth)
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)


def quantize_per_token_int8(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise each row (token) of x to int8 with its own fp32 scale, symmetric RTN:
    scale = max(amax|row| / 127, FLT_MIN), q = round-half-even(x / scale) in [-127, 127]
    (leanops.quant.int8). Inference only: the int8 outputs carry no gradient.

    Arguments:
        x: [M, K] float16, bfloat16 or float32, any strides, K >= 1.
        smooth: None or [K] float, contiguous: multiplies x per column first (SmoothQuant's
            1 / s), fused into the same pass on a GPU.

    Returns: (q int8 [M, K], scale fp32 [M]). A row holding NaN or Inf (after smooth) gets scale
    NaN and all-zero codes, so the NaN reaches the matmul's output instead of vanishing.

    Raises: ValueError naming the argument for a wrong shape, dtype or device.

    Every backend (CPU kernels included) is bit-exact with the reference.
    """
    return torch.ops.leanops.quantize_per_token_int8.default(x, smooth)


# ---------------------------------------------------------------------------------------------
# int8_mm(a int8 [M, K], b int8 [N, K], a_scale [M], b_scale [N], bias [N]?, out_dtype?) -> [M, N]


def _check_int8_mm(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    op = "leanops.int8_mm"
    check_tensor(op, "a", a, dtypes=INT8, dim=2)
    check_tensor(op, "b", b, dtypes=INT8, dim=2, contiguous=True)
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(
            f"{op}: b must be [N, K] with the K of a ({k}); got b of shape {tuple(b.shape)}"
        )
    check_tensor(op, "a_scale", a_scale, dtypes=FLOAT_DTYPES, shape=(m,), contiguous=True)
    check_tensor(op, "b_scale", b_scale, dtypes=FLOAT_DTYPES, shape=(n,), contiguous=True)
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(n,), contiguous=True)
    check_out_dtype(op, DEFAULT_OUT_DTYPE if out_dtype is None else out_dtype)
    check_same_device(op, a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)


def _int8_mm_reference(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    # float64 holds every int8 dot product of length < 2**38 exactly, on CPU and CUDA alike
    # (CUDA has no int32 matmul); then the epilogue in the documented fp32 order.
    acc = (a.double() @ b.double().t()).float()
    out = acc * a_scale.float()[:, None] * b_scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(DEFAULT_OUT_DTYPE if out_dtype is None else out_dtype)


# The CUDA kernel (kernels/cuda/int8_mm.cu) copies K in 16-byte units and accumulates in
# int32, exact while K * 128 * 128 < 2**31; kernels/cuda/int8_mm.h has the same bound.
INT8_MM_CUDA_MAX_K = 65536


def _int8_mm_cuda_supports(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    k = a.shape[1]
    if k % 16 != 0:
        return f"the CUDA kernel needs K to be a multiple of 16, got K = {k}"
    if k > INT8_MM_CUDA_MAX_K:
        return f"the CUDA kernel's int32 accumulation is bounded to K <= {INT8_MM_CUDA_MAX_K}, got K = {k}"
    if (why := cuda_gemm_m_unsupported(a.shape[0])) is not None:
        return why
    if b.data_ptr() % 16 != 0:  # cp.async copies 16-byte units; a fresh tensor is aligned
        return "the CUDA kernel needs b's data 16-byte aligned (it is a view at an odd offset)"
    return None


_int8_mm_backends = OpBackends(
    "int8_mm",
    reference=_int8_mm_reference,
    triton="leanops.triton.int8_mm:int8_mm",
    cuda_supports=_int8_mm_cuda_supports,
    cpu=True,
)


def _int8_mm_impl(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    _check_int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return _int8_mm_reference(a, b, a_scale, b_scale, bias, out_dtype)
    return _int8_mm_backends(a, b, a_scale, b_scale, bias, out_dtype)


register(
    "int8_mm",
    "(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias=None, "
    "ScalarType? out_dtype=None) -> Tensor",
    _int8_mm_impl,
)


@torch.library.register_fake("leanops::int8_mm")
def _int8_mm_fake(a, b, a_scale, b_scale, bias=None, out_dtype=None):
    _check_int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
    dtype = DEFAULT_OUT_DTYPE if out_dtype is None else out_dtype
    return a.new_empty((a.shape[0], b.shape[0]), dtype=dtype)


def _int8_mm_setup(ctx, inputs, output):
    a, b, a_scale, b_scale, bias, _ = inputs
    if a_scale.requires_grad or b_scale.requires_grad:
        raise NotImplementedError(
            "leanops.int8_mm: a_scale/b_scale cannot require grad; only bias has a gradient "
            "here (train scales with leanops.qat)"
        )
    ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None


def _int8_mm_backward(ctx, grad):
    grad_bias = None if ctx.bias_dtype is None else grad.sum(0).to(ctx.bias_dtype)
    return None, None, None, None, grad_bias, None


torch.library.register_autograd(
    "leanops::int8_mm", _int8_mm_backward, setup_context=_int8_mm_setup
)


def int8_mm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """W8A8 matmul with the dequantisation fused: out = (a @ b.T) * a_scale[:, None] *
    b_scale[None, :] + bias, the products summed exactly in int32 and the epilogue in fp32 in
    that order, rounded once to out_dtype. Differentiable only in bias.

    Arguments:
        a: int8 [M, K], any strides (the activation codes, e.g. from quantize_per_token_int8).
        b: int8 [N, K], contiguous (the weight codes, one row per output channel).
        a_scale: [M] float, contiguous: one scale per row of a (per token).
        b_scale: [N] float, contiguous: one scale per output channel.
        bias: None or [N] float, contiguous.
        out_dtype: float16, bfloat16 or float32; None means bfloat16.

    Returns: [M, N] in out_dtype.

    Raises: ValueError naming the argument for a wrong shape, dtype, layout or device.

    On a CPU (VNNI u8 x s8 dot products, or portable C++) the result is bit-exact with the
    reference: exact integer sums for any K, then the same fp32 epilogue.
    """
    return torch.ops.leanops.int8_mm.default(a, b, a_scale, b_scale, bias, out_dtype)


# ---------------------------------------------------------------------------------------------
# int8_weight_mm(x [M, K] float, w int8 [N, K], w_scale [N], bias [N]?) -> [M, N] in x.dtype


def _check_int8_weight_mm(x, w, w_scale, bias=None):
    op = "leanops.int8_weight_mm"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "w", w, dtypes=INT8, dim=2, contiguous=True)
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: w must be [N, K] with the K of x ({x.shape[1]}); got w of shape {tuple(w.shape)}"
        )
    check_tensor(op, "w_scale", w_scale, dtypes=FLOAT_DTYPES, shape=(w.shape[0],), contiguous=True)
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(w.shape[0],), contiguous=True)
    check_same_device(op, x=x, w=w, w_scale=w_scale, bias=bias)


def _int8_weight_mm_reference(x, w, w_scale, bias=None):
    return linear_reference(x, w, bias, col_scale=w_scale)


_int8_weight_mm_backends = OpBackends(
    "int8_weight_mm",
    reference=_int8_weight_mm_reference,
    triton="leanops.triton.int8_weight_mm:int8_weight_mm",
    cpu=True,
)


def _int8_weight_mm_impl(x, w, w_scale, bias=None):
    _check_int8_weight_mm(x, w, w_scale, bias)
    if x.shape[0] == 0 or w.shape[0] == 0:
        return _int8_weight_mm_reference(x, w, w_scale, bias)
    return _int8_weight_mm_backends(x, w, w_scale, bias)


register(
    "int8_weight_mm",
    "(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor",
    _int8_weight_mm_impl,
)


@torch.library.register_fake("leanops::int8_weight_mm")
def _int8_weight_mm_fake(x, w, w_scale, bias=None):
    _check_int8_weight_mm(x, w, w_scale, bias)
    return x.new_empty((x.shape[0], w.shape[0]))


register_weight_only_autograd(
    "int8_weight_mm",
    weight_indices=(1, 2),
    bias_index=3,
    dense_weight=int8_format.dequantize_int8_per_channel,
)


def int8_weight_mm(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A16 matmul: out = (x @ w.T) * w_scale[None, :] + bias, w converted exactly to x's dtype,
    fp32 accumulation, rounded once to x's dtype. Differentiable in x and bias (the weight is
    frozen).

    Arguments:
        x: [M, K] float16, bfloat16 or float32, any strides.
        w: int8 [N, K], contiguous (RTN per output channel, leanops.quant.int8).
        w_scale: [N] float, contiguous.
        bias: None or [N] float, contiguous.

    Returns: [M, N] in x's dtype.

    Raises: ValueError naming the argument for a wrong shape, dtype, layout or device.

    On a CPU the products x * w are formed exactly as the reference forms them (w converted
    exactly, fp32 accumulation) and only the order of the fp32 sum differs (blocked 16-lane sums
    for M <= 4, BLAS on dequantised tiles above): an fp32 rounding difference, about
    K * 2^-24 * sum |x * w| at worst; 16-bit outputs are almost always bit-identical.
    """
    return torch.ops.leanops.int8_weight_mm.default(x, w, w_scale, bias)


# ---------------------------------------------------------------------------------------------
# int8_dynamic_linear(x [M, K] float, w int8 [N, K], w_scale [N], smooth [K]?, bias [N]?)
#   = int8_mm(quantize_per_token_int8(x, smooth), w, ...): the W8A8 linear layer as one op, so
#   it can carry a gradient for x (straight-through: the int8 activations themselves have none).


def _check_int8_dynamic_linear(x, w, w_scale, smooth=None, bias=None):
    _check_int8_weight_mm(x, w, w_scale, bias)
    if smooth is not None:
        check_tensor(
            "leanops.int8_dynamic_linear", "smooth", smooth, dtypes=FLOAT_DTYPES,
            shape=(x.shape[1],), contiguous=True,
        )
        check_same_device("leanops.int8_dynamic_linear", x=x, smooth=smooth)


def _int8_dynamic_linear_composed(x, w, w_scale, smooth=None, bias=None):
    q, q_scale = torch.ops.leanops.quantize_per_token_int8.default(x, smooth)
    return torch.ops.leanops.int8_mm.default(q, w, q_scale, w_scale, bias, x.dtype)


# Only the CPU backend has this layer as one kernel (quantising straight into the GEMM's
# operand, one op call); everywhere else it is the two ops, each dispatched on its own.
_int8_dynamic_linear_backends = OpBackends(
    "int8_dynamic_linear", reference=_int8_dynamic_linear_composed, cpu=True
)


def _int8_dynamic_linear_impl(x, w, w_scale, smooth=None, bias=None):
    _check_int8_dynamic_linear(x, w, w_scale, smooth, bias)
    if x.device.type == "cpu" and forced_backend() in (None, "cpu"):
        return _int8_dynamic_linear_backends(x, w, w_scale, smooth, bias)
    return _int8_dynamic_linear_composed(x, w, w_scale, smooth, bias)


register(
    "int8_dynamic_linear",
    "(Tensor x, Tensor w, Tensor w_scale, Tensor? smooth=None, Tensor? bias=None) -> Tensor",
    _int8_dynamic_linear_impl,
)


@torch.library.register_fake("leanops::int8_dynamic_linear")
def _int8_dynamic_linear_fake(x, w, w_scale, smooth=None, bias=None):
    _check_int8_dynamic_linear(x, w, w_scale, smooth, bias)
    return x.new_empty((x.shape[0], w.shape[0]))


def _smoothed_dense_weight(w, w_scale, smooth):
    # out = (x * smooth) @ W'.T = x @ (W' * smooth).T: the straight-through gradient's weight.
    dense = int8_format.dequantize_int8_per_channel(w, w_scale)
    return dense if smooth is None else dense * smooth.float()[None, :]


register_weight_only_autograd(
    "int8_dynamic_linear",
    weight_indices=(1, 2, 3),
    bias_index=4,
    dense_weight=_smoothed_dense_weight,
)


def int8_dynamic_linear(
    x: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    smooth: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dynamic W8A8 linear layer as one op: quantize_per_token_int8(x, smooth), then
    int8_mm with the int8 weight, out_dtype x's dtype.

    Arguments:
        x: [M, K] float16, bfloat16 or float32, any strides.
        w: int8 [N, K], contiguous; w_scale: [N] float, contiguous (per output channel).
        smooth: None or [K] float, contiguous: SmoothQuant's 1 / s, applied to x before its
            quantisation (the weight was quantised as W * s).
        bias: None or [N] float, contiguous.

    Returns: [M, N] in x's dtype. Gradients: x gets the straight-through estimate
    grad @ (W * smooth) (the rounding itself has none) and bias its sum; the weight is frozen.

    Raises: ValueError naming the argument for a wrong shape, dtype, layout or device.

    On a CPU it runs as one fused kernel, bit-exact with the two ops.
    """
    return torch.ops.leanops.int8_dynamic_linear.default(x, w, w_scale, smooth, bias)
