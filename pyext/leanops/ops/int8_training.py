"""Int8 training op: leanops::int8_training_linear, a linear layer whose forward and grad-input
matmuls run in int8 (the SwitchBack recipe, Wortsman et al., 2023) while the weight stays a 16-bit
(or fp32) master parameter and its gradient is computed in that precision.

  forward      y  = int8_mm(Q_row(x), Q_row(W)) + b               x [M, K], W [N, K]
               x per token (row of x, scale [M]), W per output channel (row of W, scale [N]):
               the reduction runs over K, so each product's scales factor out of the sum.
  grad input   dx = int8_mm(Q_row(dy), Q_row(W^T))                 dy [M, N], W^T [K, N]
               dy per token (scale [M]) and W per *input* channel (row of W^T, scale [K]): the
               reduction now runs over N, so the scales must be indexed by M and K, the dims
               that are not summed. (Per-output-channel scales of W would vary along the
               reduction and could not be pulled out of the int8 dot product.)
  grad weight  dW = dy^T @ x in x's dtype (no quantisation: weight gradients have a heavy-tailed,
               per-element spread that int8 loses, and SwitchBack keeps this product 16-bit)
  grad bias    db = sum over rows of dy

Every quantisation is leanops::quantize_per_token_int8 and every int8 product is
leanops::int8_mm (their CUDA or Triton kernels on a GPU), with the exact integer accumulation and
fp32 epilogue those ops define; the output and dx are rounded once to x's dtype. The weight
quantisation is the per-row one of quantize_per_token_int8, which equals the RTN per-channel
format of leanops.quant.int8 except that an all-zero row gets scale FP32_TINY instead of 1 (its
codes and dequantised values are zeros either way).

Saved for backward: x (16-bit, for dW) and W (the parameter itself; no copy).
"""

from __future__ import annotations

import torch

from leanops.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from leanops.ops._library import register


def _check(x, w, bias=None):
    op = "leanops.int8_training_linear"
    check_tensor(op, "x", x, dtypes=FLOAT_DTYPES, dim=2)
    check_tensor(op, "w", w, dtypes=(x.dtype,), dim=2)
    if w.shape[1] != x.shape[1]:
        raise ValueError(
            f"{op}: w must be [N, K] with the K of x ({x.shape[1]}); got w of shape {tuple(w.shape)}"
        )
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one column, got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(w.shape[0],), contiguous=True)
    check_same_device(op, x=x, w=w, bias=bias)


def _int8_product(a: torch.Tensor, b: torch.Tensor, bias, out_dtype) -> torch.Tensor:
    """a [M, R] @ b[N, R].T through int8: both quantised per row, so the scales are indexed by the
    output's row and column and factor out of the int8 reduction over R."""
    qa, sa = torch.ops.leanops.quantize_per_token_int8.default(a, None)
    qb, sb = torch.ops.leanops.quantize_per_token_int8.default(b.contiguous(), None)
    return torch.ops.leanops.int8_mm.default(qa, qb, sa, sb, bias, out_dtype)


def _impl(x, w, bias=None):
    _check(x, w, bias)
    return _int8_product(x, w, bias, x.dtype)


register("int8_training_linear", "(Tensor x, Tensor w, Tensor? bias=None) -> Tensor", _impl)


@torch.library.register_fake("leanops::int8_training_linear")
def _fake(x, w, bias=None):
    _check(x, w, bias)
    return x.new_empty((x.shape[0], w.shape[0]))


def _setup(ctx, inputs, output):
    x, w, bias = inputs
    ctx.needs = (x.requires_grad, w.requires_grad, bias is not None and bias.requires_grad)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    # x only for dW, W only for dx: save what the requested gradients need.
    ctx.save_for_backward(x if ctx.needs[1] else None, w if ctx.needs[0] else None)


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = _int8_product(grad, w.t(), None, grad.dtype)
    if need_w:
        grad_w = grad.t().to(x.dtype) @ x
    if need_b:
        grad_b = grad.sum(0).to(ctx.bias_dtype)
    return grad_x, grad_w, grad_b


torch.library.register_autograd("leanops::int8_training_linear", _backward, setup_context=_setup)


def int8_training_linear(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ w.T + bias with int8 forward and grad-input matmuls (SwitchBack), trainable w.

    x [M, K] float16/bfloat16/float32, w [N, K] in x's dtype (the master weight, quantised on the
    fly every call), bias [N] or None; output [M, N] in x's dtype. Gradients: x through an int8
    matmul of the per-token-quantised output gradient and the per-input-channel-quantised weight;
    w in x's dtype (dy^T @ x); bias exactly. See the module docstring for the numerics.
    """
    return torch.ops.leanops.int8_training_linear.default(x, w, bias)
