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


# How the weights are chosen on the grid (leanops.ptq runs them over a model):
#   rtn       round to nearest, no data
#   hqq       half-quadratic fit of each group's scale and zero point, no data (int4 only)
#   awq       activation-aware per-input-channel scales, then a clip search (needs calibrate=)
#   gptq      OBS error feedback through the inverse Hessian (needs calibrate=)
#   awq+gptq  AWQ's scales, then GPTQ on the scaled weights (needs calibrate=)
INT4_ALGORITHMS = ("rtn", "hqq", "awq", "gptq", "awq+gptq")
INT8_ALGORITHMS = ("rtn", "awq", "gptq", "awq+gptq")
CALIBRATED_ALGORITHMS = ("awq", "gptq", "awq+gptq")


@dataclass(frozen=True, kw_only=True)
class _WeightAlgorithm(QuantConfig):
    """The algorithm options shared by the weight-only configs (keyword-only; see
    Int4WeightOnlyConfig for their meaning)."""

    algorithm: str = "rtn"
    damp: float | None = None
    act_order: bool = True
    sequential: bool = False

    _ALGORITHMS = CALIBRATED_ALGORITHMS

    def __post_init__(self):
        if self.algorithm not in self._ALGORITHMS:
            raise ValueError(f"algorithm must be one of {self._ALGORITHMS}, got {self.algorithm!r}")
        d = self.damp
        if d is not None and not (isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0):
            raise ValueError(f"damp must be None (automatic) or a positive number, got {d!r}")
        for name in ("act_order", "sequential"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def needs_calibration(self) -> bool:
        """Whether quantize_ needs calibrate= for this config."""
        return self.algorithm in CALIBRATED_ALGORITHMS


@dataclass(frozen=True)
class Int8WeightOnlyConfig(_WeightAlgorithm):
    """W8A16: int8 per-output-channel weights, 16-bit activations (leanops::int8_weight_mm).

    algorithm: "rtn" (default), "awq", "gptq" or "awq+gptq"; damp, act_order, sequential: as
    in Int4WeightOnlyConfig (keyword-only).
    """

    _ALGORITHMS = INT8_ALGORITHMS


@dataclass(frozen=True)
class Int4WeightOnlyConfig(_WeightAlgorithm):
    """W4A16: int4 weights with one scale (and, if not symmetric, one zero point) per group of
    `group_size` input channels (leanops::int4_weight_mm).

    group_size: 32, 64, 128, 256 (any positive multiple of 32), or -1 for one group per output
        channel. Layers whose in_features it does not divide are skipped with a logged reason.
    symmetric: False (default) stores a uint8 zero point per group (range [min(w, 0),
        max(w, 0)]), 1/group_size byte more per weight (+1.5% at g128); True uses the fixed
        zero point 8 (range [-amax, amax]). Asymmetric is the default because it is the more
        accurate: on all-MiniLM-L6-v2, RTN g128 keeps a cosine of 0.955 against 0.940 symmetric
        (g32: 0.973 / 0.959; GPTQ g128: 0.990 / 0.988).
    algorithm (keyword-only, like the rest): how the grid and codes are chosen; the packed
        format is the same for all.
        "rtn"       round to nearest (default; no data).
        "hqq"       HQQ: each group's scale and zero point fitted to the weight by a robust
                    (l_0.7) half-quadratic solver, no data (leanops.quant.hqq).
        "awq"       AWQ: per-input-channel scales from activation magnitudes, folded into the
                    norm or linear layer that produces the input where the model has one (else
                    carried by the layer as input_scale), then a per-group clip search
                    (leanops.quant.awq).
        "gptq"      GPTQ with a clip search per group (leanops.quant.gptq).
        "awq+gptq"  AWQ's scales, then GPTQ on the scaled weights.
        The last three need quantize_(..., calibrate=). How much data: GPTQ fits K x K
        statistics per layer, so give it several tokens per input channel (>= 4 x the largest
        in_features; e.g. 512 sentences, ~14k tokens, for a 384/1536-wide model); with fewer it
        still helps on average but leans on dampening; a warning is logged below 1 x. AWQ
        needs far less (a few hundred tokens).
    damp: GPTQ's dampening lambda / mean(diag H). None (default): 0.01 + 0.2 x K / T for a
        layer with K inputs that saw T calibration tokens (a ridge that grows as the data
        shrinks); or a positive float used as is (the paper's 0.01).
    act_order: GPTQ processes the inputs by decreasing activation energy (default True); the
        groups stay static (fitted on the original weights), so the format does not change.
    sequential: GPTQ calibrates each layer on the outputs of the already quantised layers
        before it (one calibrate(model) run per set of layers sharing an input, statistics of
        one such set in memory at a time) instead of all layers from one run of the float
        model (default False).
    """

    group_size: int = 128
    symmetric: bool = False

    _ALGORITHMS = INT4_ALGORITHMS

    def __post_init__(self):
        super().__post_init__()
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
