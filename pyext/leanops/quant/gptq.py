"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2023) onto leanops' int4 and int8 weight grids.

Columns (input channels) are quantised one at a time and the rounding error of each is
compensated by the columns not yet quantised, through the inverse Hessian of the layer's
reconstruction loss (leanops.quant.obs, the solver shared with SparseGPT). Options:

  damp        dampening lambda = damp * mean(diag H) added to H's diagonal before inverting;
              larger values trust the calibration data less (damp -> inf is RTN). 0.01 is the
              paper's; with few tokens per input channel (T < 2K) raise it.
  act_order   quantise the columns in order of decreasing H_jj (most active inputs first, while
              the most columns remain to absorb their error). Groups stay *static*: each
              group's scale and zero point are fitted once, up front, on the original weights
              of its own K-contiguous columns, so the stored format (and every kernel) is
              unchanged: no per-column group index at run time.
  clip_search without act_order, each group's grid is fitted when its first column is reached,
              on the weights as updated so far; with act_order, up front. Either way the
              range shrink is searched to minimise the group's output error (leanops.quant.grid)
              instead of taking the full range.

Returned weights lie exactly on the int4 grid, so quantize_int4(w_hat, g, symmetric,
scales=scales, zeros=zeros) re-encodes them to the solver's codes (and Int4WeightOnlyLinear
.from_weight does so).
"""

from __future__ import annotations

import torch

from leanops.quant import grid, obs
from leanops.quant import int4 as int4_format
from leanops.quant import int8 as int8_format
from leanops.quant.common import check_float_matrix

BLOCKSIZE = 128


class Int4ColumnQuantizer:
    """Quantises one column at a time onto int4 group grids, for obs.solve: GPTQ's quantiser and
    that of SparseGPT's joint prune-and-quantise pass.

    rows, k: the weight's shape [N, K]; group_size g divides K. importance: None, the Hessian's
    diagonal blocks [K / g, g, g] (or its diagonal [K / g, g]) that score the clip search, or
    not searched when clip_search is False. order: None (columns processed in their own order,
    each group fitted by `fit` when the solver reaches it) or the processing permutation [K]
    (act-order): then every group must be fitted up front with fit_all.
    Holds scales [N, K / g] (scale_dtype) and zeros fp32 [N, K / g] or None.
    """

    def __init__(
        self, rows, k, group_size, symmetric, scale_dtype, device, importance=None,
        clip_search=True, order=None,
    ):
        self.group_size = group_size
        self.symmetric = symmetric
        self.scale_dtype = scale_dtype
        self.importance = importance
        self.clip_search = clip_search
        groups = k // group_size
        self.scales = torch.ones(rows, groups, dtype=scale_dtype, device=device)
        self.zeros = None if symmetric else torch.zeros(rows, groups, device=device)
        self._s32 = torch.ones(groups, rows, device=device)
        self._z = torch.full((groups, rows), float(int4_format.SYMMETRIC_ZERO), device=device)
        if order is None:
            self.group_of = torch.arange(k, device=device) // group_size
            self.span = group_size
        else:
            self.group_of = (order.to(device) // group_size)
            self.span = None
        self.group_of = self.group_of.tolist()

    def _fit(self, groups32: torch.Tensor, first: int, importance) -> None:
        if self.clip_search:
            scales, zeros = grid.search_int4_grid(
                groups32, self.symmetric, self.scale_dtype, importance
            )
        else:
            scales, zeros = grid.int4_grid(groups32, self.symmetric, self.scale_dtype)
        count = groups32.shape[1]
        self.scales[:, first : first + count] = scales
        if zeros is not None:
            self.zeros[:, first : first + count] = zeros
        # Per-group rows [G, N] for the per-column hot path (contiguous, fp32).
        self._s32[first : first + count] = scales.float().t()
        if zeros is not None:
            self._z[first : first + count] = zeros.t()

    def fit_all(self, w: torch.Tensor) -> None:
        """Fit every group on w [N, K] (fp32, original column order)."""
        n, k = w.shape
        self._fit(w.reshape(n, k // self.group_size, self.group_size), 0, self.importance)

    def fit(self, j: int, cols: torch.Tensor, keep: torch.Tensor) -> None:
        """obs.solve's hook: fit group j // g on its current columns cols [N, g]; entries
        already pruned (keep False) count as 0."""
        first = j // self.group_size
        vals = torch.where(keep, cols, torch.zeros((), device=cols.device))
        imp = None if self.importance is None else self.importance[first : first + 1]
        self._fit(vals.reshape(vals.shape[0], -1, self.group_size), first, imp)

    def __call__(self, j: int, col: torch.Tensor) -> torch.Tensor:
        """obs.solve's hook: the dequantised value (fp32, exactly the format's) of column j."""
        grp = self.group_of[j]
        s, z = self._s32[grp], self._z[grp]
        q = torch.div(col, s).round_().add_(z).clamp_(0, int4_format.QMAX)
        # (q - z) * s is exact in fp32 (a 5-bit integer times a 16-bit scale), so rounding it
        # to the scales' dtype once is the format's own product.
        out = q.sub_(z).mul_(s)
        return out if self.scale_dtype == torch.float32 else out.to(self.scale_dtype).float()

    def zero_codes(self) -> torch.Tensor | None:
        """The zero points as the format stores them (uint8), or None when symmetric."""
        return None if self.zeros is None else self.zeros.to(torch.uint8)


def _check(w, hessian, damp, blocksize):
    check_float_matrix(w, "weight")
    k = w.shape[1]
    if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (k, k):
        got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"hessian must be a tensor of shape ({k}, {k}) (X^T X over the inputs), got {got}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("hessian contains NaN or Inf")
    if not (isinstance(damp, (int, float)) and damp > 0):
        raise ValueError(f"damp must be a positive number, got {damp!r}")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")


def _prepared(w, hessian, damp, act_order, group_size=None):
    """(W fp32 in the original column order, U in processing order, the Hessian's diagonal
    blocks [K / g, g, g] of the original order if group_size else None, permutation or None: the
    caller permutes W, after any fit that needs the original order). Two K x K buffers at most."""
    W = w.detach().float().clone()
    H, dead = obs.prepare_hessian(hessian, W)
    W[:, dead] = 0.0
    blocks = grid.hessian_blocks(H, group_size) if group_size else None
    perm, work = None, None
    if act_order:
        perm = torch.argsort(H.diagonal(), descending=True, stable=True)
        work = torch.empty_like(H)
        torch.index_select(H, 0, perm, out=work)
        torch.index_select(work, 1, perm, out=H)
    U = obs.inverse_hessian_cholesky(H, damp, "gptq", workspace=work)
    return W, U, blocks, perm


@torch.no_grad()
def gptq_int4(
    w: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    symmetric: bool = True,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    clip_search: bool = True,
    blocksize: int = BLOCKSIZE,
    scale_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ onto the int4 group grid of leanops.quant.int4.

    w: [N, K] float16 / bfloat16 / float32 weight (finite). hessian: [K, K] X^T X of the
    layer's calibration inputs (leanops.calibration.gram), any positive scale. group_size: a
    multiple of 32 dividing K (K for per-channel). symmetric: bool, the format's zero point 8
    (True) or a uint8 zero point per group (False). damp: positive float, relative dampening
    (default 0.01). act_order: bool (default True), static groups. clip_search: bool (default
    True). blocksize: positive int, columns per lazy update (default 128; speed only).
    scale_dtype: the stored scales' dtype (default w's).
    Returns (w_hat [N, K] in scale_dtype, on the grid; scales [N, K / g] scale_dtype; zeros uint8
    [N, K / g] or None). Raises ValueError on a bad argument or a Hessian that stays indefinite.
    """
    _check(w, hessian, damp, blocksize)
    n, k = w.shape
    int4_format.check_group_size(group_size, k)
    scale_dtype = scale_dtype or w.dtype
    W, U, importance, perm = _prepared(w, hessian, damp, act_order, group_size if clip_search else None)
    quantizer = Int4ColumnQuantizer(
        n, k, group_size, symmetric, scale_dtype, W.device, importance, clip_search, order=perm
    )
    if act_order:
        quantizer.fit_all(W)  # static groups: every group's grid from the original order
        W, _ = obs.solve(W[:, perm], U, blocksize, quantize=quantizer)
        W = W[:, torch.argsort(perm)]
    else:
        W, _ = obs.solve(W, U, blocksize, quantize=quantizer, fit=quantizer.fit, span=group_size)
    return W.to(scale_dtype), quantizer.scales, quantizer.zero_codes()


@torch.no_grad()
def gptq_int8(
    w: torch.Tensor,
    hessian: torch.Tensor,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    blocksize: int = BLOCKSIZE,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ onto the int8 per-output-channel grid of leanops.quant.int8.

    w: [N, K] float weight; hessian: [K, K] X^T X; damp, act_order, blocksize: as gptq_int4.
    scale: fp32 [N] row scales to use (default RTN's amax / 127 of w).
    Returns (w_hat fp32 [N, K] on the grid, scale fp32 [N]):
    quantize_int8_per_channel(w_hat, scale) re-encodes it exactly.
    """
    _check(w, hessian, damp, blocksize)
    W, U, _, perm = _prepared(w, hessian, damp, act_order)
    if perm is not None:
        W = W[:, perm]
    if scale is None:
        scale = int8_format.int8_channel_scale(w.detach().float())
    s = scale.float().to(W.device)

    def quantize(j, col):
        return int8_format.int8_codes(col[:, None], s)[:, 0] * s

    W, _ = obs.solve(W, U, blocksize, quantize=quantize)
    if perm is not None:
        W = W[:, torch.argsort(perm)]
    return W, s
