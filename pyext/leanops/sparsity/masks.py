"""N:M masks along the input dimension: keep the n highest-scoring of every m consecutive inputs
of each output row (2:4 is n = 2, m = 4, what sparse tensor cores run)."""

from __future__ import annotations

import torch


def check_nm(n: int, m: int) -> None:
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n <= m):
        raise ValueError(f"N:M sparsity needs integers 0 < n <= m, got n={n!r}, m={m!r}")


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """bool [N, K] keeping, in every row, the n largest of each group of m consecutive scores.

    Exactly n per group. Ties go to the lower input index (a stable sort), so the mask is
    deterministic on every device. K must be a multiple of m; NaN scores are refused.
    """
    check_nm(n, m)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(
            f"scores must be a 2-D Tensor [out_features, in_features], got "
            f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}"
        )
    rows, k = scores.shape
    if k % m != 0:
        raise ValueError(f"in_features (K={k}) must be a multiple of m={m} for {n}:{m} sparsity")
    if scores.is_floating_point() and bool(scores.isnan().any()):
        raise ValueError("scores contain NaN; an N:M mask needs comparable scores")
    return nm_mask_unchecked(scores, n, m)


def nm_mask_unchecked(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """nm_mask without the value checks: no GPU synchronisation, traceable by torch.compile
    (the per-step mask of SR-STE training)."""
    rows, k = scores.shape
    groups = scores.reshape(rows, k // m, m)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order, True)
    return keep.reshape(rows, k)


def is_nm_sparse(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Whether every group of m consecutive inputs of each row of w [N, K] (a weight, or a bool
    keep-mask) has at most n nonzeros."""
    check_nm(n, m)
    if w.dim() != 2 or w.shape[1] % m != 0:
        return False
    return bool(((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all())
