"""One-shot pruning of a linear layer's weight to N:M sparsity along its inputs.

  magnitude   keep the largest |W_ij| of every m inputs of a row.
  wanda       Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs": keep the largest
              |W_ij| * ||X_j||_2, with ||X_j|| the L2 norm of input channel j over every calibration
              token. An input channel that carries large activations (the outlier channels of
              LLMs) protects its weights even when they are small.
  sparsegpt   Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
              Pruned in One-Shot": walks the inputs left to right; in each group of m it prunes
              the n' = m - n entries with the smallest w^2 / [H^-1]_jj^2 and spreads each pruned
              weight's error onto the not-yet-visited inputs of its row through the inverse
              Hessian H = X^T X (an OBS update), so the kept weights change to compensate. This is
              the layer-wise solver with H from the dense model's inputs (the original processes
              blocks sequentially, feeding each the outputs of the already pruned ones); the
              solver (leanops.quant.obs) is GPTQ's, which can quantise in the same pass.

Everything here works on one weight at a time; leanops.prune_ and leanops.sparsify_ (in
leanops.api) drive it over a model.
"""

from __future__ import annotations

import torch

from leanops.quant import obs
from leanops.sparsity.masks import check_nm, nm_mask

METHODS = ("magnitude", "wanda", "sparsegpt")


def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().abs()


def wanda_scores(w: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (fp32 [N, K]); input_norm [K] is ||X_j||_2 (not squared)."""
    if input_norm.shape != (w.shape[1],):
        raise ValueError(
            f"input_norm must have shape ({w.shape[1]},) (one norm per input channel), got "
            f"{tuple(input_norm.shape)}"
        )
    return w.detach().float().abs() * input_norm.float().to(w.device)[None, :]


def prune_magnitude(w: torch.Tensor, n: int = 2, m: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(w with the pruned entries zeroed, keep-mask) by |w|."""
    mask = nm_mask(magnitude_scores(w), n, m)
    return _apply(w, mask), mask


def prune_wanda(
    w: torch.Tensor, input_norm: torch.Tensor, n: int = 2, m: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """(w with the pruned entries zeroed, keep-mask) by |w| * ||X_j||."""
    mask = nm_mask(wanda_scores(w, input_norm), n, m)
    return _apply(w, mask), mask


def _apply(w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


@torch.no_grad()
def prune_sparsegpt(
    w: torch.Tensor,
    hessian: torch.Tensor,
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
    quantizer=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's N:M solver: (the updated, pruned weight in w's dtype, keep-mask).

    hessian: X^T X [K, K] over the calibration tokens (any positive scale: the damping is
    relative to its mean diagonal). Input channels that never saw a nonzero activation
    (H_jj = 0) carry no signal; their weights are pruned first where the pattern allows
    (their score is 0).
    quantizer: None, or a leanops.quant.gptq.Int4ColumnQuantizer (in column order) to prune
    and quantise in the same pass, as the SparseGPT paper's joint mode: masks are still chosen
    m columns at a time as the solver reaches them; each quantisation group's grid is fitted
    when the solver reaches the group, on its weights as updated so far (the masks of its later
    columns are not chosen yet: measured on all-MiniLM-L6-v2, choosing them all at the group's
    start to fit on kept values only is worse than plain SparseGPT + RTN, while this removes
    ~40% of the error quantisation adds to pruning); every kept weight is rounded onto the grid
    with its error spread like a pruned one's. The result lies on the quantizer's grid (in its
    scales' dtype).
    The solver is leanops.quant.obs, shared with GPTQ.
    """
    check_nm(n, m)
    rows, k = w.shape
    if k % m != 0:
        raise ValueError(f"in_features (K={k}) must be a multiple of m={m} for {n}:{m} sparsity")
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}), got {tuple(hessian.shape)}")
    if not isinstance(blocksize, int) or blocksize <= 0 or blocksize % m != 0:
        raise ValueError(f"blocksize must be a positive multiple of m={m}, got {blocksize!r}")
    if not (damp > 0):
        raise ValueError(f"damp must be positive, got {damp!r}")
    W = w.detach().float().clone()
    H, dead = obs.prepare_hessian(hessian, W)
    W[:, dead] = 0.0
    hinv = obs.inverse_hessian_cholesky(H, damp, "sparsegpt")
    prune = (n, m) if n < m else None
    if quantizer is None:
        W, keep = obs.solve(W, hinv, blocksize, prune=prune)
        out = W.to(w.dtype)
    else:
        span = quantizer.span
        if span is None or span % m:
            raise ValueError(
                "quantizer must fit its groups in column order (no act-order) with a group "
                f"size that is a multiple of m={m}"
            )
        W, keep = obs.solve(
            W, hinv, blocksize, quantize=quantizer, fit=quantizer.fit, span=span, prune=prune,
        )
        out = W.to(quantizer.scale_dtype)
    # Rounding to the output dtype cannot create nonzeros where the solver left exact zeros.
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device)), keep
