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
              blocks sequentially, feeding each the outputs of the already pruned ones).

Everything here works on one weight at a time; leanops.prune_ and leanops.sparsify_ (in
leanops.api) drive it over a model.
"""

from __future__ import annotations

import torch

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


def _inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, in fp32, retrying with 10x the
    damping if rounding makes the matrix indefinite (a rank-deficient H with few tokens)."""
    k = h.shape[0]
    eye = torch.eye(k, device=h.device, dtype=h.dtype)
    scale = float(h.diagonal().mean())
    for attempt in range(6):
        lam = damp * (10**attempt) * scale
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ValueError("sparsegpt: the Hessian X^T X stays indefinite even with heavy damping")


@torch.no_grad()
def prune_sparsegpt(
    w: torch.Tensor,
    hessian: torch.Tensor,
    n: int = 2,
    m: int = 4,
    blocksize: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's N:M solver: (the updated, pruned weight in w's dtype, keep-mask).

    hessian: X^T X [K, K] over the calibration tokens (any positive scale: the damping is
    relative to its mean diagonal). Input channels that never saw a nonzero activation
    (H_jj = 0) carry no signal; their weights are pruned first where the pattern allows
    (their score is 0).
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
    prune_n = m - n
    W = w.detach().float().clone()
    H = hessian.detach().float().to(W.device).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = _inverse_hessian_cholesky(H, damp)

    keep = torch.ones(rows, k, dtype=torch.bool, device=W.device)
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        pruned1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if prune_n and i % m == 0:
                # OBS saliency of each entry of the next group, with the weights as updated so
                # far: w^2 / [H^-1]_jj^2 (Cholesky-factor diagonal squared). The smallest go.
                sal = W1[:, i : i + m] ** 2 / Hinv1.diagonal()[i : i + m].reshape(1, -1) ** 2
                # Stable order, lowest index first on ties (as nm_mask).
                drop = torch.argsort(sal, dim=1, stable=True)[:, :prune_n]
                pruned1.scatter_(1, i + drop, True)
            col = W1[:, i]
            d = Hinv1[i, i]
            q = torch.where(pruned1[:, i], torch.zeros_like(col), col)
            Q1[:, i] = q
            err = (col - q) / d
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~pruned1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    out = W.to(w.dtype)
    # Rounding to w's dtype cannot create nonzeros where Q1 held exact zeros; keep is the mask.
    return torch.where(keep, out, torch.zeros((), dtype=out.dtype, device=out.device)), keep
