"""The Optimal Brain Surgeon layer solver: one home for the Hessian of a linear layer's
reconstruction loss, its damped inverse, and the column-by-column solve with error feedback
that GPTQ (quantise), SparseGPT (prune) and SparseGPT's joint mode (prune and quantise in one
pass) share.

For a weight W [N, K] and calibration inputs X [T, K], the loss ||W X^T - W' X^T||^2 is the
quadratic form of H = X^T X (leanops.calibration.gram; the factor 2 does not matter). Fixing
input column j to a value q_j and re-fitting the columns not yet fixed changes them by
-(w_j - q_j) / [H^-1]_jj * [H^-1]_j,: (Frantar et al., "Optimal Brain Compression", 2022). With
U the upper Cholesky factor of H^-1, processing columns left to right and using row j of U in
place of the shrinking inverse is exact (GPTQ, Frantar et al. 2023, section 3), so one
factorisation serves every column. Updates inside a block of B columns are applied at once per
column to that block only; the rest of the matrix receives the block's errors in one matmul
("lazy batch" updates), which turns the rank-1 updates into GEMMs.

Memory for one layer, fp32: two K x K matrices (H's copy and one workspace, in which the
factor is formed; see inverse_hessian_cholesky), plus the weight and its transposed working copy,
N x K each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Relative dampening tried after `damp` fails: a Hessian from fewer tokens than inputs is
# singular and rounding can make its Cholesky fail even with a little dampening.
_RETRIES = 6


def prepare_hessian(hessian: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H as an fp32 copy on w's device, dead-channel mask [K]). Input channels that never saw
    a nonzero activation (H_jj = 0) carry no signal: their diagonal is set to 1 so the inverse
    exists, and the solvers may set their weights to anything (they zero or keep them)."""
    k = w.shape[1]
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"hessian must have shape ({k}, {k}), got {tuple(hessian.shape)}")
    h = hessian.detach().to(device=w.device, dtype=torch.float32, copy=True)
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    return h, dead


def inverse_hessian_cholesky(
    h: torch.Tensor, damp: float, what: str = "the solver", workspace: torch.Tensor | None = None
) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1 (U^T U = the inverse), lambda = damp *
    mean(diag H), in fp32. Retries with 10x the dampening (up to 10^5 x) if rounding makes the
    matrix indefinite (a rank-deficient H from few tokens).

    h (fp32 [K, K]) is overwritten: it and `workspace` (an fp32 [K, K] buffer, or None to
    allocate one) are the only K x K memory used, and U is returned in one of them. With J the
    reversal permutation, if J (H + lambda I) J = L L^T then (H + lambda I)^-1 = U^T U with
    U = J L^-1 J, upper triangular with a positive diagonal, hence the factor: one Cholesky and
    one in-place triangular solve, no explicit inverse. `what` names the caller in the error.
    """
    if not (damp > 0):
        raise ValueError(f"damp must be positive, got {damp!r}")
    scale = float(h.diagonal().mean())
    flipped = torch.empty_like(h) if workspace is None else workspace
    _flip_into(h, flipped)
    info = torch.empty((), dtype=torch.int32, device=h.device)
    for attempt in range(_RETRIES):
        lam = damp * (10**attempt) * scale
        flipped.diagonal().add_(lam)
        torch.linalg.cholesky_ex(flipped, out=(h, info))
        flipped.diagonal().sub_(lam)
        if int(info) == 0:
            flipped.zero_()
            flipped.diagonal().fill_(1.0)
            torch.linalg.solve_triangular(h, flipped, upper=False, out=flipped)
            _flip_into(flipped, h)
            return h
    raise ValueError(f"{what}: the Hessian X^T X stays indefinite even with heavy damping")


def _flip_into(src: torch.Tensor, dst: torch.Tensor, rows: int = 512) -> None:
    """dst = src reversed along both dims (J src J), a block of rows at a time so that no
    K x K temporary is made."""
    k = src.shape[0]
    for r0 in range(0, k, rows):
        r1 = min(r0 + rows, k)
        dst[r0:r1] = src[k - r1 : k - r0].flip((0, 1))


def aligned_blocksize(blocksize: int, span: int | None, multiple: int = 1) -> int:
    """A block size near `blocksize`, a multiple of `multiple` (which must divide span), such
    that every run of `span` columns starting at a multiple of span either starts a block or
    lies inside one, so a group's parameters are fitted on weights that already hold every
    earlier column's update (see solve)."""
    if not span:
        return blocksize
    if span <= blocksize:
        return (blocksize // span) * span
    for b in range(blocksize - blocksize % multiple, 0, -multiple):
        if span % b == 0:
            return b
    return multiple


@torch.no_grad()
def solve(
    w: torch.Tensor,
    hinv_upper: torch.Tensor,
    blocksize: int,
    quantize: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    fit: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    span: int | None = None,
    prune: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fix the columns of w [N, K] (fp32, updated in place and returned) left to right with OBS
    error feedback through hinv_upper [K, K] (inverse_hessian_cholesky). Returns (w, keep mask
    bool [N, K]); w holds the final values (pruned entries 0, quantised entries on their grid).

    quantize(j, col [N]) -> the values column j is fixed to (fp32 [N]); None keeps it (prune
        only). fit(j, cols [N, span], keep [N, span]) is called before column j when j is a
        multiple of `span`, with the current (updated) weights of the next span columns and
        their keep mask so far: GPTQ fits a group's scale and zero point there.
    prune: (n, m) keeps n of every m consecutive columns (blocksize and span must then be
        multiples of m): when the solver reaches a run of m, the entries with the smallest
        w^2 / [H^-1]_jj^2 (OBS saliency, current weights) go; lowest index first on ties.
    """
    rows, k = w.shape
    m = prune[1] if prune is not None else 1
    blocksize = aligned_blocksize(blocksize, span, m)
    # Work on W^T so that a column is a contiguous row: the per-column updates below are the
    # solver's inner loop, bound by memory traffic and per-op overhead.
    wt = w.t().contiguous()
    keep = torch.ones(k, rows, dtype=torch.bool, device=w.device)
    diag = hinv_upper.diagonal()
    for i1 in range(0, k, blocksize):
        i2 = min(i1 + blocksize, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv_upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            if prune is not None and j % m == 0:
                sal = w1[i : i + m] ** 2 / diag[j : j + m][:, None] ** 2
                # Stable order: lowest index first on ties (as nm_mask).
                drop = torch.argsort(sal, dim=0, stable=True)[: m - prune[0]]
                keep[j : j + m].scatter_(0, drop, False)
            if fit is not None and span and j % span == 0:
                # The current weights of the group: inside the block they are in w1; a longer
                # group starts the block (aligned_blocksize), where wt is up to date.
                cols = w1[i : i + span] if i + span <= i2 - i1 else wt[j : j + span]
                fit(j, cols.t(), keep[j : j + cols.shape[0]].t())
            col = w1[i]
            q = col if quantize is None else quantize(j, col)
            if prune is not None:
                q = torch.where(keep[j], q, torch.zeros((), dtype=q.dtype, device=q.device))
            err = torch.sub(col, q, out=err1[i]).div_(hinv1[i, i])
            if i + 1 < i2 - i1:
                w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1)
            w1[i] = q
        wt[i1:i2] = w1
        if i2 < k:
            wt[i2:].addmm_(hinv_upper[i1:i2, i2:].t(), err1, alpha=-1)
    w.copy_(wt.t())
    return w, keep.t()
