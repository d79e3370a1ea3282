"""Leaf helpers shared by layers that must not import each other (leanops.ops, whose reference
and fake kernels allocate an op's output, leanops.triton, whose launchers do too, and
leanops.quant): the memory layout of an output that follows an input's, and one sequence of a
packed varlen tensor. Nothing here imports another leanops module."""

from __future__ import annotations

import torch


def empty_like_layout(t: torch.Tensor, size, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor of `size` (t's number of dims; only sizes may differ) laid out in
    memory like t: the attention outputs keep q's layout when their last dim (Dv) differs from
    q's (a [B, H, S, D] view of [B, S, H, D] memory gives an output that is one too). Its last
    dim is always innermost (the kernels write rows of it). Of t's size and with t's last dim
    innermost: torch.empty_like(t) (t's strides when t is dense). Otherwise the other dims keep
    t's order by stride (ties in dim order), broadcast ones (stride 0) outermost. Every backend
    and the fake kernel of an op allocate through this, so they agree on strides."""
    last = t.dim() - 1
    if tuple(size) == tuple(t.shape) and (t.stride(last) == 1 or t.shape[last] <= 1):
        return torch.empty_like(t, dtype=dtype or t.dtype)

    def key(i):
        broadcast = t.stride(i) == 0 and t.shape[i] > 1
        return (not broadcast, -t.stride(i))

    order = sorted(range(last), key=key) + [last]
    return torch.empty_permuted(tuple(size), order, dtype=dtype or t.dtype, device=t.device)


def varlen_seq(x: torch.Tensor, rows) -> torch.Tensor:
    """Rows `rows` (a slice: one sequence) of a packed varlen x [T, H, D] as [1, H, S, D] (a
    view)."""
    return x[rows].transpose(0, 1).unsqueeze(0)
