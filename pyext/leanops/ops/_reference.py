"""What the PyTorch references of the weight-only matmul ops share: the definition of their
numerics, given the dense weight each op's format decodes to."""

from __future__ import annotations

import torch


def linear_reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                     col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """out = (x @ w.T * col_scale[n] + bias[n]) in fp32, rounded once to x's dtype.

    x [M, K] and w [N, K] (the op's dense weight, in the dtype its definition converts it to)
    are multiplied as fp32 with fp32 accumulation (products of 16-bit operands are exact in
    fp32; the kernels differ from this only in summation order). col_scale [N]
    (int8_weight_mm's per-channel scale) and bias [N] are applied in that order."""
    out = x.float() @ w.float().t()
    if col_scale is not None:
        out = out * col_scale.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
