"""Autograd formulas shared by several ops.

register_weight_only_autograd: the matmuls with a frozen quantised weight (W8A16, W4A16, dynamic
W8A8, 2:4): only the activation x (input 0) and the bias have gradients, grad_x = grad_out @ W
with W the dense weight the forward multiplied by, rebuilt in backward from the packed tensors
(nothing dense is kept alive between forward and backward).

register_inference_only: ops without a backward, which must say so when asked for one instead of
silently returning no gradient."""

from __future__ import annotations

import torch


def register_weight_only_autograd(op: str, weight_indices, bias_index: int, dense_weight) -> None:
    """weight_indices: positions of the packed-weight tensors (saved, must not require grad);
    every other non-tensor input (e.g. group_size) is passed after them to
    dense_weight(*weights, *others) -> [N, K]."""
    weight_indices = tuple(weight_indices)

    def setup_context(ctx, inputs, output):
        for i in weight_indices:
            t = inputs[i]
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise NotImplementedError(
                    f"leanops.{op}: input {i} (part of the frozen quantised weight) cannot require "
                    "grad; train quantised weights with leanops.qat"
                )
        ctx.save_for_backward(*(inputs[i] for i in weight_indices))
        ctx.others = [
            v for i, v in enumerate(inputs) if i not in weight_indices and i not in (0, bias_index)
        ]
        ctx.x_needs_grad = inputs[0].requires_grad
        bias = inputs[bias_index]
        ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad):
        grads = [None] * ctx.num_inputs
        if ctx.x_needs_grad:
            grads[0] = grad @ dense_weight(*ctx.saved_tensors, *ctx.others).to(grad.dtype)
        if ctx.bias_dtype is not None:
            grads[bias_index] = grad.sum(0).to(ctx.bias_dtype)
        return tuple(grads)

    torch.library.register_autograd(f"leanops::{op}", backward, setup_context=setup_context)


def register_inference_only(op: str) -> None:
    """Make leanops::<op> raise NotImplementedError when called on inputs that require grad
    (outside torch.no_grad / inference_mode), naming the op and the trainable alternative."""

    def setup_context(ctx, inputs, output):
        raise NotImplementedError(
            f"leanops.{op} is inference only (no backward): call it under torch.no_grad() / "
            "torch.inference_mode(), or use leanops.attention for training"
        )

    def backward(ctx, *grads):  # never reached: setup_context raises first
        raise NotImplementedError(f"leanops.{op} is inference only")

    torch.library.register_autograd(f"leanops::{op}", backward, setup_context=setup_context)
