"""QAT op family: fake quantisation with straight-through gradients, the ops leanops.qat's layers
call. Each returns the dequantised tensor that the real format (and so the real kernel after
leanops.qat.convert_) multiplies by, computed by the format's own functions in leanops.quant, so
the QAT forward and the converted forward agree to the last bit in their operands:

  fake_quantize_int8_per_channel(w [N, K], scale [N]?) -> [N, K] in w's dtype
      = dequantize_int8_per_channel(int8 RTN codes of w, scale, w.dtype); scale defaults to the
      RTN scale amax / 127 (the one Int8Linear / Int8WeightOnlyLinear store).
  fake_quantize_int4(w [N, K], group_size, symmetric, scales [N, K/g]?) -> [N, K]
      = dequantize_int4 of quantize_int4(w): in w's dtype (the stored scale dtype of
      Int4WeightOnlyLinear.from_linear), or in scales' dtype when scales are given.
  fake_quantize_per_token_int8(x [M, K], smooth [K]?) -> [M, K] in x's dtype
      = q * scale of leanops::quantize_per_token_int8(x, smooth) (its GPU kernels included).

Gradients (straight-through estimators):
  * scale not given (it follows the weight's range, recomputed every step): d out / d w = I. The
    range always covers the weight, so nothing is clipped and the plain STE is the usual choice.
  * scale given (a learnt scale, LSQ: Esser et al., 2020): with v = w / s and the signed code
    range [qmin, qmax] ([-127, 127]; [-8, 7] for symmetric int4; [-z, 15 - z] for asymmetric
    int4, the zero point z held constant), the weight gets the clipped STE grad * [qmin <= v <=
    qmax], and the scale gets d out / d s = q - v inside the range and q (the clamped code)
    outside it, summed over the elements that share the scale.
  * per-token activations: d out / d x = diag(smooth) (identity without smooth); the per-token
    scale follows x's range, nothing is clipped.
Finite differences of a quantiser are zero almost everywhere, so these gradients are checked
against autograd of the same straight-through formulas written independently in float64
(tests/test_qat.py), not with gradcheck.

There is one implementation per op, PyTorch code that runs on any device (elementwise work that
is small next to the matmul it feeds); the per-token op reaches the Triton/CUDA quantisation
kernels through leanops::quantize_per_token_int8.
"""

from __future__ import annotations

import torch

from leanops.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from leanops.ops._library import register
from leanops.quant import int4 as int4_format
from leanops.quant import int8 as int8_format

# ---------------------------------------------------------------------------------------------
# fake_quantize_int8_per_channel(w [N, K], scale [N]?) -> [N, K]


def _check_fq_int8(w, scale=None):
    op = "leanops.fake_quantize_int8_per_channel"
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES, dim=2)
    if scale is not None:
        check_tensor(op, "scale", scale, dtypes=FLOAT_DTYPES, shape=(w.shape[0],))
        check_same_device(op, w=w, scale=scale)


def _int8_codes_and_scale(w, scale):
    w32 = w.float()
    s32 = int8_format.int8_channel_scale(w32) if scale is None else scale.float()
    return w32, int8_format.int8_codes(w32, s32), s32


def _fq_int8_impl(w, scale=None):
    _check_fq_int8(w, scale)
    _, q, s32 = _int8_codes_and_scale(w, scale)
    return int8_format.dequantize_int8_per_channel(q, s32, w.dtype)


register(
    "fake_quantize_int8_per_channel", "(Tensor w, Tensor? scale=None) -> Tensor", _fq_int8_impl
)


@torch.library.register_fake("leanops::fake_quantize_int8_per_channel")
def _fq_int8_fake(w, scale=None):
    _check_fq_int8(w, scale)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _lsq_grads(grad32, v, q, qmin, qmax, sum_dims):
    """Clipped-STE grad for the input and LSQ grad for its scale: v = w / s, q = the signed codes
    (clamped to [qmin, qmax]); inside the range means qmin <= v <= qmax, as in LSQ."""
    inside = (v >= qmin) & (v <= qmax)
    grad_w = torch.where(inside, grad32, 0.0)
    grad_s = (grad32 * torch.where(inside, q - v, q)).sum(dim=sum_dims)
    return grad_w, grad_s


def _fq_int8_setup(ctx, inputs, output):
    w, scale = inputs
    ctx.learnt = scale is not None
    ctx.w_dtype = w.dtype
    ctx.scale_dtype = scale.dtype if scale is not None else None
    if ctx.learnt:
        ctx.save_for_backward(w, scale)


def _fq_int8_backward(ctx, grad):
    if not ctx.learnt:
        return grad.to(ctx.w_dtype), None
    w, scale = ctx.saved_tensors
    w32, q, s32 = _int8_codes_and_scale(w, scale)
    qmax = int8_format.INT8_QMAX
    grad_w, grad_s = _lsq_grads(grad.float(), w32 / s32[:, None], q, -qmax, qmax, sum_dims=1)
    return grad_w.to(ctx.w_dtype), grad_s.to(ctx.scale_dtype)


torch.library.register_autograd(
    "leanops::fake_quantize_int8_per_channel", _fq_int8_backward, setup_context=_fq_int8_setup
)


def fake_quantize_int8_per_channel(w: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 per-output-channel weight w [N, K] quantised and dequantised, in w's dtype: what
    Int8WeightOnlyLinear / Int8Linear built from w multiply by. `scale` [N] (positive) replaces
    the RTN scale amax / 127 and gets the LSQ gradient. See the module docstring for gradients."""
    return torch.ops.leanops.fake_quantize_int8_per_channel.default(w, scale)


# ---------------------------------------------------------------------------------------------
# fake_quantize_int4(w [N, K], group_size, symmetric, scales [N, K/g]?) -> [N, K]


def _check_fq_int4(w, group_size, symmetric, scales=None):
    op = "leanops.fake_quantize_int4"
    check_tensor(op, "w", w, dtypes=FLOAT_DTYPES, dim=2)
    try:
        int4_format.check_group_size(group_size, w.shape[1])
    except ValueError as exc:
        raise ValueError(f"{op}: {exc}") from None
    if scales is not None:
        check_tensor(op, "scales", scales, dtypes=FLOAT_DTYPES, shape=(w.shape[0], w.shape[1] // group_size))
        check_same_device(op, w=w, scales=scales)


def _int4_codes(w, group_size, symmetric, scales):
    n, k = w.shape
    groups = w.float().reshape(n, k // group_size, group_size)
    if scales is None:
        scales = int4_format.int4_group_scales(groups, symmetric, w.dtype)
    q, zeros = int4_format.int4_codes(groups, scales, symmetric)
    return groups, q, zeros, scales


def _fq_int4_impl(w, group_size, symmetric, scales=None):
    _check_fq_int4(w, group_size, symmetric, scales)
    _, q, zeros, scales = _int4_codes(w, group_size, symmetric, scales)
    return int4_format.dequantize_int4_codes(q.reshape(w.shape), scales, zeros, group_size)


register(
    "fake_quantize_int4",
    "(Tensor w, int group_size, bool symmetric, Tensor? scales=None) -> Tensor",
    _fq_int4_impl,
)


@torch.library.register_fake("leanops::fake_quantize_int4")
def _fq_int4_fake(w, group_size, symmetric, scales=None):
    _check_fq_int4(w, group_size, symmetric, scales)
    dtype = w.dtype if scales is None else scales.dtype
    return w.new_empty(w.shape, dtype=dtype)


def _fq_int4_setup(ctx, inputs, output):
    w, group_size, symmetric, scales = inputs
    ctx.learnt = scales is not None
    ctx.w_dtype = w.dtype
    ctx.group_size, ctx.symmetric = group_size, symmetric
    ctx.scales_dtype = scales.dtype if scales is not None else None
    if ctx.learnt:
        ctx.save_for_backward(w, scales)


def _fq_int4_backward(ctx, grad):
    if not ctx.learnt:
        return grad.to(ctx.w_dtype), None, None, None
    w, scales = ctx.saved_tensors
    groups, q, zeros, _ = _int4_codes(w, ctx.group_size, ctx.symmetric, scales)
    z = int4_format.SYMMETRIC_ZERO if zeros is None else zeros[..., None]
    v = groups / scales.float()[..., None]
    grad_w, grad_s = _lsq_grads(
        grad.float().reshape(groups.shape), v, q - z, -z, int4_format.QMAX - z, sum_dims=-1
    )
    return grad_w.reshape(w.shape).to(ctx.w_dtype), None, None, grad_s.to(ctx.scales_dtype)


torch.library.register_autograd(
    "leanops::fake_quantize_int4", _fq_int4_backward, setup_context=_fq_int4_setup
)


def fake_quantize_int4(
    w: torch.Tensor, group_size: int, symmetric: bool = True, scales: torch.Tensor | None = None
) -> torch.Tensor:
    """The group-wise int4 weight w [N, K] quantised and dequantised: exactly the dense weight
    Int4WeightOnlyLinear.from_linear(w, group_size, symmetric) multiplies by, in w's dtype.
    `scales` [N, K/g] (positive, in the dtype to store) replace the RTN scales and get the LSQ
    gradient; asymmetric zero points are then recomputed from them (the code of 0.0)."""
    return torch.ops.leanops.fake_quantize_int4.default(w, group_size, symmetric, scales)


# ---------------------------------------------------------------------------------------------
# fake_quantize_per_token_int8(x [M, K], smooth [K]?) -> [M, K] in x's dtype


def _check_fq_per_token(x, smooth=None):
    op = "leanops.fake_quantize_per_token_int8"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    if smooth is not None:
        check_tensor(op, "smooth", smooth, dtypes=FLOAT_DTYPES, shape=(x.shape[1],), contiguous=True)
        check_same_device(op, x=x, smooth=smooth)


def _fq_per_token_impl(x, smooth=None):
    _check_fq_per_token(x, smooth)
    q, scale = torch.ops.leanops.quantize_per_token_int8.default(x, smooth)
    # Per-token dequantisation is per-row, the same formula as the per-channel weights'.
    return int8_format.dequantize_int8_per_channel(q, scale, x.dtype)


register(
    "fake_quantize_per_token_int8", "(Tensor x, Tensor? smooth=None) -> Tensor", _fq_per_token_impl
)


@torch.library.register_fake("leanops::fake_quantize_per_token_int8")
def _fq_per_token_fake(x, smooth=None):
    _check_fq_per_token(x, smooth)
    return x.new_empty(x.shape)


def _fq_per_token_setup(ctx, inputs, output):
    x, smooth = inputs
    if smooth is not None and smooth.requires_grad:
        raise NotImplementedError(
            "leanops.fake_quantize_per_token_int8: smooth cannot require grad (SmoothQuant "
            "factors are calibrated, not trained)"
        )
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(smooth)


def _fq_per_token_backward(ctx, grad):
    (smooth,) = ctx.saved_tensors
    if smooth is None:
        return grad.to(ctx.x_dtype), None
    return (grad.float() * smooth.float()).to(ctx.x_dtype), None


torch.library.register_autograd(
    "leanops::fake_quantize_per_token_int8", _fq_per_token_backward, setup_context=_fq_per_token_setup
)


def fake_quantize_per_token_int8(x: torch.Tensor, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (times `smooth` [K] per column, if given) quantised per row (token) to int8 and
    dequantised, in x's dtype: the activation Int8Linear's kernel multiplies by. Straight-through
    gradient: grad * smooth."""
    return torch.ops.leanops.fake_quantize_per_token_int8.default(x, smooth)
