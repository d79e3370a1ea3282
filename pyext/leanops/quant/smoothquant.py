"""SmoothQuant (Xiao et al., 2022) calibration: measure each linear layer's per-input-channel
activation range on sample inputs, then pick per-channel factors s that move the quantisation
difficulty of outlier channels from the activations (divided by s) into the weights (times s)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from leanops.calibration import amax, collect_input_statistics

# Factors are clamped to this range so a dead channel (amax 0) or an extreme outlier cannot turn
# into an Inf/0 multiplier.
_MIN_FACTOR, _MAX_FACTOR = 1e-4, 1e4


def collect_activation_amax(
    model: nn.Module, layers: dict[str, nn.Linear], calibrate: Callable[[nn.Module], object]
) -> dict[str, torch.Tensor]:
    """Run `calibrate(model)` with forward hooks on `layers`; return name -> amax|x| [in] (fp32)."""
    return collect_input_statistics(model, layers, calibrate, amax, purpose="SmoothQuant")


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = amax|x_j|^alpha / amax|W_:,j|^(1-alpha), 1 where either range is zero."""
    w_amax = weight.detach().abs().amax(dim=0).float().to(act_amax.device)
    s = act_amax.float().pow(alpha) / w_amax.pow(1.0 - alpha)
    s = torch.where((act_amax > 0) & (w_amax > 0), s, torch.ones_like(s))
    return s.clamp(_MIN_FACTOR, _MAX_FACTOR)
