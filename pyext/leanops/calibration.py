"""Statistics of linear layers' inputs, gathered by forward pre-hooks while a user's callable
runs sample inputs through the model: the one home for calibration hooks.

    stats = collect_input_statistics(model, {"layers.0.mlp.up_proj": layer, ...},
                                     calibrate=lambda m: m(sample_batch), update=sum_of_squares,
                                     purpose="Wanda")

`update(x2d, previous)` folds one call's input (fp32 [tokens, in_features]) into the running
statistic. The statistics used in leanops:
  amax            SmoothQuant: max |x_j| per input channel
  sum_of_squares  Wanda: sum over tokens of x_j^2 per input channel (||X_j||^2)
  gram            SparseGPT: X^T X [in, in] and the token count (its Hessian, up to a factor)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibrate: Callable[[nn.Module], object],
    update: Callable[[torch.Tensor, object], object],
    purpose: str,
) -> dict[str, object]:
    """Run `calibrate(model)` with forward pre-hooks on `layers`; return name -> statistic.

    Raises ValueError if an input holds NaN/Inf or if calibrate never ran one of the layers
    (`purpose` names the algorithm in the message). Hooks are removed even if calibrate raises.
    """
    stats: dict[str, object] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            x2d = x.reshape(-1, x.shape[-1])
            if not bool(torch.isfinite(x2d).all()):
                raise ValueError(f"calibration input to {name!r} contains NaN or Inf")
            stats[name] = update(x2d, stats.get(name))

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - set(stats))
    if missing:
        raise ValueError(
            f"calibrate(model) never ran these layers, so {purpose} cannot calibrate them: {missing}"
        )
    return stats


def amax(x2d: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """max |x_j| over tokens, fp32 [in]."""
    cur = x2d.abs().amax(dim=0).float()
    return cur if previous is None else torch.maximum(previous, cur)


def sum_of_squares(x2d: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """sum over tokens of x_j^2, fp32 [in] (||X_j||_2^2 over every calibration token)."""
    cur = x2d.float().pow(2).sum(dim=0)
    return cur if previous is None else previous + cur


def gram(x2d: torch.Tensor, previous: tuple[torch.Tensor, int] | None) -> tuple[torch.Tensor, int]:
    """(X^T X fp32 [in, in], number of tokens) accumulated over calls."""
    x = x2d.float()
    cur = x.t() @ x
    if previous is None:
        return cur, x.shape[0]
    return previous[0] + cur, previous[1] + x.shape[0]
