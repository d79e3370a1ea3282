"""HQQ (Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models", 2023):
calibration-free choice of each group's int4 grid by minimising a robust (l_p, p < 1) norm of
the weight's quantisation error.

The l_p problem min_{s,z} ||W - dq(q(W))||_p^p is split half-quadratically with an auxiliary
error W_e: alternate W_e = shrink_p(W - dq(q(W)), beta) (the generalised soft threshold, which
lets a few large errors be absorbed by W_e instead of pulling the grid towards them) and a least
squares fit of the grid to W - W_e, while beta grows by kappa each step.

On leanops' grid (an integer zero point per group, stored as a uint8 code; see
leanops.quant.int4) the zero point is rounded after each update, and, unlike the original (whose
float zero point does the work), the scale is re-fitted by least squares too:
s = <W - W_e, q - z> / ||q - z||^2. The shrinkage works in units of the group's step so the
defaults mean the same for weights of any magnitude. Each group keeps the best grid seen by its
squared error, RTN's included, so no group ends worse than RTN in that norm.
"""

from __future__ import annotations

import torch

from leanops.quant import grid
from leanops.quant import int4 as int4_format
from leanops.quant.common import check_float_matrix, safe_scale


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The generalised soft threshold sign(x) * max(|x| - |x|^(p-1) / beta, 0) (HQQ's eq. 6)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.clamp_min(1e-12).pow(p - 1) / beta)


@torch.no_grad()
def hqq_int4(
    w: torch.Tensor,
    group_size: int,
    symmetric: bool = True,
    *,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """HQQ onto the int4 group grid of leanops.quant.int4 (no calibration data).

    w: [N, K] float16 / bfloat16 / float32 weight (finite). group_size: a multiple of 32
    dividing K. symmetric: bool (zero point 8, only the scale is fitted). iters: int >= 1,
    half-quadratic steps (default 20). p: float in (0, 1], the norm (default 0.7). beta: float
    > 0, initial penalty in units of the group's step (default 10). kappa: float >= 1, beta's
    growth per step (default 1.01). scale_dtype: stored scales' dtype (default w's).
    Returns (w_hat [N, K] in scale_dtype on the grid, scales [N, K / g], zeros uint8 [N, K / g]
    or None); quantize_int4(w_hat, g, symmetric, scales=, zeros=) re-encodes it exactly.
    Raises ValueError on a bad argument.
    """
    check_float_matrix(w, "weight")
    n, k = w.shape
    int4_format.check_group_size(group_size, k)
    if not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    if not (0 < p <= 1):
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    if not (beta > 0 and kappa >= 1):
        raise ValueError(f"beta must be > 0 and kappa >= 1, got beta={beta!r}, kappa={kappa!r}")
    scale_dtype = scale_dtype or w.dtype
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    # Groups are independent: rows are solved a chunk at a time so the ~20 elementwise passes of
    # each step run in cache instead of from memory.
    parts = [_hqq_rows(groups[rows], symmetric, iters, p, beta, kappa, scale_dtype)
             for rows in grid.row_chunks(n, k)]
    scales = torch.cat([s for s, _ in parts])
    zeros = None if symmetric else torch.cat([z for _, z in parts])
    return grid.on_grid(groups, scales, zeros, scale_dtype)


def _hqq_rows(groups, symmetric, iters, p, beta, kappa, scale_dtype):
    """The best (scales, zeros fp32 or None) of groups [n, G, g] (fp32) over the steps."""
    scales, zeros = grid.int4_grid(groups, symmetric, scale_dtype)
    best = None
    for step in range(iters + 1):
        # The codes of the current grid serve both its loss and the next update.
        s32 = scales.float()[..., None]
        q, _ = int4_format.int4_codes(groups, scales, symmetric, zeros)
        z = int4_format.SYMMETRIC_ZERO if symmetric else zeros[..., None]
        d = q - z
        rec = (d * s32).to(scale_dtype).float()  # exactly the format's dequantised weight
        err = groups - rec
        cand = (err.pow(2).sum(-1), scales, zeros)
        best = cand if best is None else grid.keep_better(best, cand)
        if step == iters:
            break
        target = groups - shrink_lp(err / s32, beta, p) * s32
        if not symmetric:
            zeros = torch.round((q - target / s32).mean(-1)).clamp_(0, int4_format.QMAX)
            d = q - zeros[..., None]
        den = d.pow(2).sum(-1)
        fitted = (target * d).sum(-1) / den.clamp_min(1)
        # A group whose codes all sit on the zero point (or whose fit is not positive) keeps
        # its scale.
        fitted = torch.where((den > 0) & (fitted > 0), fitted, scales.float())
        scales = safe_scale(fitted, scale_dtype)
        beta *= kappa
    return best[1:]
