"""What `leanops.quantize_` can do to a model: one config class per format."""

from __future__ import annotations

from dataclasses import dataclass


class QuantConfig:
    """Base class of the quantisation configs accepted by leanops.quantize_."""


@dataclass(frozen=True)
class Int8DynamicConfig(QuantConfig):
    """W8A8: int8 per-output-channel weights (RTN), activations quantised per token at run time,
    int8 x int8 matmul with the dequantisation fused (leanops::int8_mm).

    smoothquant_alpha: None, or the SmoothQuant migration strength in [0, 1]. With it,
    quantize_ needs `calibrate` (a callable run on the model with sample inputs) to measure each
    layer's per-input-channel activation range, then moves quantisation difficulty from the
    activations into the weights: W' = W * s, x' = x / s with
    s = amax(|x|)^alpha / amax(|W|)^(1 - alpha) per input channel.
    """

    smoothquant_alpha: float | None = None

    def __post_init__(self):
        a = self.smoothquant_alpha
        if a is not None and not (isinstance(a, (int, float)) and 0.0 <= a <= 1.0):
            raise ValueError(f"smoothquant_alpha must be None or a number in [0, 1], got {a!r}")


@dataclass(frozen=True)
class Int8WeightOnlyConfig(QuantConfig):
    """W8A16: int8 per-output-channel weights (RTN), 16-bit activations (leanops::int8_weight_mm)."""


@dataclass(frozen=True)
class Int4WeightOnlyConfig(QuantConfig):
    """W4A16: int4 weights with one scale (and, if not symmetric, one zero point) per group of
    `group_size` input channels (leanops::int4_weight_mm).

    group_size: 32, 64, 128, 256 (any positive multiple of 32), or -1 for one group per output
    channel. Layers whose in_features it does not divide are skipped with a logged reason.
    """

    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        g = self.group_size
        if not isinstance(g, int) or not (g == -1 or (g > 0 and g % 32 == 0)):
            raise ValueError(
                f"group_size must be a positive multiple of 32 (e.g. 32, 64, 128, 256) or -1 "
                f"(per-channel), got {g!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")

    def group_size_for(self, in_features: int) -> int:
        """The group size used for a layer of `in_features` inputs (-1 means in_features)."""
        return in_features if self.group_size == -1 else self.group_size


@dataclass(frozen=True)
class Int8TrainingConfig(QuantConfig):
    """Int8 training (SwitchBack): each nn.Linear becomes a leanops.Int8TrainingLinear that keeps
    its 16-bit (or fp32) weight as the trainable master parameter and runs the forward matmul and
    the grad-input matmul in int8 (leanops::int8_training_linear, two leanops::int8_mm calls with
    per-token activation / output-gradient scales and per-channel weight scales); the weight
    gradient is computed in the weight's dtype. The state_dict is the dense layer's."""
