"""Quantisation-aware training for leanops' inference formats.

    leanops.qat.prepare_(model, leanops.Int4WeightOnlyConfig(group_size=128))  # fake quant + STE
    train(model)                                                                  # any training loop
    leanops.qat.convert_(model)                                                   # real int4 layers

prepare_ swaps nn.Linear layers for QATLinear, which multiplies by the weight (and, for
Int8DynamicConfig, the per-token activations) quantised and dequantised by the very functions the
real formats use (leanops.ops.fake_quant), so after convert_ the model's forward equals the QAT
forward to rounding. Gradients are straight-through; learnable_scales=True trains the scales
(LSQ) and convert_ stores the learnt ones. Everything is a torch.library op with a fake kernel and
registered autograd, so QAT models compile with torch.compile(fullgraph=True).

This package holds the whole-model workflow (api.py); QATLinear itself is a drop-in module and
lives, like every one, in leanops.nn (re-exported here).
"""

from leanops.nn.qat import QATLinear
from leanops.qat.api import convert_, prepare_

__all__ = ["QATLinear", "convert_", "prepare_"]
