"""SmoothQuant (Xiao et al., 2022) calibration: measure each linear layer's per-input-channel
activation range on sample inputs, then pick per-channel factors s that move the quantisation
difficulty of outlier channels from the activations (divided by s) into the weights (times s)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Factors are clamped to this range so a dead channel (amax 0) or an extreme outlier cannot turn
# into an Inf/0 multiplier.
_MIN_FACTOR, _MAX_FACTOR = 1e-4, 1e4


@torch.no_grad()
def collect_activation_amax(
    model: nn.Module, layers: dict[str, nn.Linear], calibrate: Callable[[nn.Module], object]
) -> dict[str, torch.Tensor]:
    """Run `calibrate(model)` with forward hooks on `layers`; return name -> amax|x| [in] (fp32)."""
    amax: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].detach()
            cur = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            if not bool(torch.isfinite(cur).all()):
                raise ValueError(f"calibration input to {name!r} contains NaN or Inf")
            amax[name] = cur if name not in amax else torch.maximum(amax[name], cur)

        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - set(amax))
    if missing:
        raise ValueError(
            f"calibrate(model) never ran these layers, so SmoothQuant cannot calibrate them: {missing}"
        )
    return amax


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = amax|x_j|^alpha / amax|W_:,j|^(1-alpha), 1 where either range is zero."""
    w_amax = weight.detach().abs().amax(dim=0).float().to(act_amax.device)
    s = act_amax.float().pow(alpha) / w_amax.pow(1.0 - alpha)
    s = torch.where((act_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(_MIN_FACTOR, _MAX_FACTOR)
