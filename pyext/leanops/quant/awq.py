"""AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", 2024): per-input-channel scales that protect the weights of the inputs that
carry large activations, then a per-group clip search.

A layer y = W x computes the same as (W diag(s)) (x / s). Quantising W diag(s) instead of W
gives the columns of the most active inputs (large s) a relatively finer grid. AWQ takes
s = a^alpha with a_j the activation magnitude of input j (here its RMS over the calibration
tokens, sqrt(H_jj / T), read off the Gram H = X^T X that GPTQ uses too), normalised so that
sqrt(max(s) min(s)) = 1, and searches alpha in [0, 1) on a grid for the smallest output error
tr(E H E^T), E = W - Q(W diag(s)) diag(s)^-1 (alpha = 0 is RTN, so the search never picks
something worse than RTN on the calibration tokens). Layers that share their input (q, k, v
after one norm) share s when it is folded into the op that produces that input; their errors
are summed.

The 1/s on the input side goes where it costs nothing when the model allows it (the weight and
bias of a norm feeding only these layers, or the output rows of a linear layer whose output
reaches this one through per-channel-linear ops: v_proj -> attention -> o_proj, up_proj ->
act(gate) * up -> down_proj); see leanops.ptq. Otherwise the layer carries it
(input_scale of leanops' weight-only layers).

The loss is scored on the diagonal blocks of H (block_width inputs each, the quantisation
group where there is one) and on at most `max_rows` rows of each weight (evenly spaced): the
errors of different groups are nearly uncorrelated, so the cross-block terms add noise rather
than signal, and a sample of rows ranks the candidates as the whole does. Measured on
all-MiniLM-L6-v2 (g128, clip search after): held-out error 0.647 of RTN's with block-diagonal
scoring of 512 rows, 0.649 with the full tr(E H E^T) of 512 rows, 0.648 of 128; the block
form costs N x K x b instead of N x K^2 per candidate, which is what makes K = 14336 affordable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from leanops.quant import grid
from leanops.quant import int8 as int8_format

GRID = 20
# Rows of each weight used to score a candidate scale (evenly spaced): the loss is a sum over
# rows, so a sample ranks candidates the same way at a fraction of the cost on large layers.
MAX_ROWS = 512


def activation_rms(hessian: torch.Tensor, count: int) -> torch.Tensor:
    """sqrt(H_jj / T): each input channel's RMS over the T calibration tokens, fp32 [K]."""
    return (hessian.diagonal().float().clamp_min(0) / max(count, 1)).sqrt()


def scales_for(act: torch.Tensor, alpha: float) -> torch.Tensor:
    """AWQ's s = a^alpha normalised to sqrt(max * min) = 1, fp32 [K]; channels that never fired
    (a = 0) get the smallest active channel's magnitude."""
    live = act > 0
    floor = act[live].min() if bool(live.any()) else torch.ones((), device=act.device)
    s = torch.where(live, act, floor).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def int4_rtn_fake(group_size: int, symmetric: bool, scale_dtype: torch.dtype) -> Callable:
    """w [N, K] fp32 -> w quantised by int4 RTN with this grid and dequantised (fp32)."""

    def fake(w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        groups = w.reshape(n, k // group_size, group_size)
        scales, zeros = grid.int4_grid(groups, symmetric, scale_dtype)
        return grid.int4_fake(groups, scales, zeros).reshape(n, k)

    return fake


def int8_rtn_fake(w: torch.Tensor) -> torch.Tensor:
    """w [N, K] fp32 -> w quantised by int8 per-channel RTN and dequantised (fp32)."""
    scale = int8_format.int8_channel_scale(w)
    return int8_format.int8_codes(w, scale) * scale[:, None]


def _rows(w: torch.Tensor, max_rows: int) -> torch.Tensor:
    n = w.shape[0]
    if n <= max_rows:
        return w
    idx = torch.linspace(0, n - 1, max_rows, device=w.device).round().long()
    return w[idx]


@torch.no_grad()
def search_scales(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor,
    count: int,
    fake_quantize: Callable[[torch.Tensor], torch.Tensor],
    block_width: int,
    grid_points: int = GRID,
    max_rows: int = MAX_ROWS,
) -> tuple[torch.Tensor, float]:
    """AWQ's scale search for the layers `weights` (each [N_c, K], any float dtype) that share
    the input whose Gram is hessian [K, K] over `count` tokens.

    fake_quantize: w [N, K] fp32 -> its quantised-dequantised copy (int4_rtn_fake / int8_rtn_fake).
    block_width: a divisor of K, the width of the Hessian blocks scored (block_width_for).
    grid_points: alphas tried, i / grid_points for i in 0 .. grid_points - 1 (default 20).
    max_rows: rows of each weight scored (default 512; sampled evenly beyond).
    Returns (s fp32 [K], the chosen alpha). Raises ValueError on mismatched shapes.
    """
    k = hessian.shape[0]
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"every weight must be [N, {k}] to match the hessian, got {tuple(w.shape)}")
    if not isinstance(block_width, int) or block_width <= 0 or k % block_width:
        raise ValueError(f"block_width must be a positive divisor of K={k}, got {block_width!r}")
    h = hessian.float()
    act = activation_rms(h, count)
    blocks = grid.hessian_blocks(h, block_width)
    sampled = [_rows(w.detach().float().to(h.device), max_rows) for w in weights]
    best_loss, best_alpha, best_s = None, 0.0, torch.ones(k, device=h.device)
    for i in range(grid_points):
        alpha = i / grid_points
        s = scales_for(act, alpha) if alpha else torch.ones(k, device=h.device)
        loss = 0.0
        for w in sampled:
            err = (w - fake_quantize(w * s) / s).reshape(w.shape[0], k // block_width, block_width)
            loss += float(grid.group_loss(err, blocks).sum())
        if best_loss is None or loss < best_loss:
            best_loss, best_alpha, best_s = loss, alpha, s
    return best_s, best_alpha


def block_width_for(k: int, group_size: int | None) -> int:
    """The Hessian block width search_scales scores with: the int4 group size when it is below
    K, else the largest of 128, 64, 32 dividing K, else K (the full loss)."""
    if group_size is not None and group_size < k:
        return group_size
    return next((b for b in (128, 64, 32) if k % b == 0 and b < k), k)


def scaled_hessian(hessian: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Gram of the inputs x / s: diag(s)^-1 H diag(s)^-1 (one new K x K tensor)."""
    inv = 1.0 / s.float()
    return (hessian * inv[:, None]).mul_(inv[None, :])


@torch.no_grad()
def clip_int4(
    w: torch.Tensor, hessian: torch.Tensor, group_size: int, symmetric: bool,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """AWQ's clip search on w [N, K] (already scaled) with hessian [K, K] (of the scaled
    inputs): each group's range shrink minimising e H_gg e^T (leanops.quant.grid), then RTN on
    that grid. Returns (w_hat [N, K] scale_dtype on the grid, scales [N, K / g], zeros uint8 or
    None)."""
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    blocks = grid.hessian_blocks(hessian.float(), group_size)
    scales, zeros = grid.search_int4_grid(groups, symmetric, scale_dtype, blocks)
    return grid.on_grid(groups, scales, zeros, scale_dtype)
