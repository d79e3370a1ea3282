"""QATLinear: an nn.Linear trained with the fake quantisation of one of leanops' inference
formats, and its conversion to the real quantised layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from leanops.nn.packed import PackedLinear
from leanops.nn.quantized import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.nn.sparse import SparseLinear
from leanops.ops.fake_quant import (
    fake_quantize_int4,
    fake_quantize_int8_per_channel,
    fake_quantize_per_token_int8,
)
from leanops.quant import int4 as int4_format
from leanops.quant import int8 as int8_format
from leanops.quant.common import safe_scale
from leanops.quant.config import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from leanops.sparsity.masks import is_nm_sparse

QAT_CONFIGS = (Int8DynamicConfig, Int8WeightOnlyConfig, Int4WeightOnlyConfig)


class QATLinear(nn.Linear):
    """nn.Linear whose forward multiplies by the fake-quantised weight of `config` (and, for
    Int8DynamicConfig, by per-token fake-quantised activations): operands bit-identical to those
    of the layer convert() returns, with straight-through gradients (leanops.ops.fake_quant).

    Parameters: `weight` and `bias` as in nn.Linear (the trainable master copy), and with
    learnable_scales=True `weight_scale` (fp32; [out] for int8, [out, in / group_size] for
    int4), LSQ-trained; the scale used is safe_scale(|weight_scale|) in the stored dtype (fp32
    for int8, the weight's dtype for int4). Without it the scales are the RTN ones, recomputed
    from the weight every forward. Buffers with SmoothQuant (Int8DynamicConfig with
    smoothquant_alpha): `smoothing` s [in] (the weight is quantised as W * s) and `smooth` 1 / s
    (activations are multiplied by it before their quantisation), fixed at prepare_ time.

    `weight` is read through attribute access every forward, so a parametrization on it (e.g.
    leanops.sparsity.enable_sparse_training's 2:4 SparseMask) applies before quantisation.

    Arguments (of the constructor; leanops.qat.prepare_ and `from_linear` wrap an existing
    layer instead):
        in_features, out_features, bias, device, dtype: as nn.Linear's.
        config: Int8DynamicConfig, Int8WeightOnlyConfig or Int4WeightOnlyConfig (required; a
            TypeError otherwise); int4's group size must divide in_features (ValueError).
        learnable_scales: train the scales (LSQ) as the Parameter weight_scale (default False).
        smoothing: Int8DynamicConfig only: SmoothQuant's s [in_features], positive, or None.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: QuantConfig | None = None,
        learnable_scales: bool = False,
        smoothing: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if not isinstance(config, QAT_CONFIGS):
            raise TypeError(
                "config must be Int8DynamicConfig(), Int8WeightOnlyConfig() or "
                f"Int4WeightOnlyConfig(...), got {type(config).__name__}"
            )
        if isinstance(config, Int4WeightOnlyConfig):
            self.group_size = config.group_size_for(in_features)
            int4_format.check_group_size(self.group_size, in_features)
        else:
            self.group_size = None
        self.config = config
        self.learnable_scales = False
        self.register_buffer("smoothing", None)
        self.register_buffer("smooth", None)
        self.register_parameter("weight_scale", None)
        self._add_quant_state(learnable_scales, smoothing)

    def _add_quant_state(self, learnable_scales: bool, smoothing: torch.Tensor | None) -> None:
        """Create the SmoothQuant buffers and the learnable scales on the weight's device."""
        device = self.weight.device
        if smoothing is not None:
            if not isinstance(self.config, Int8DynamicConfig):
                raise ValueError("smoothing (SmoothQuant) applies to Int8DynamicConfig only")
            s = smoothing.detach().float().to(device)
            if s.shape != (self.in_features,) or not bool((s > 0).all()):
                raise ValueError(
                    f"smoothing must be a positive tensor of shape ({self.in_features},), got "
                    f"{tuple(s.shape)}"
                )
            self.register_buffer("smoothing", s.clone())
            # 1 / s computed once, exactly as Int8Linear.from_linear stores it.
            self.register_buffer("smooth", 1.0 / s)
        if learnable_scales:
            self.learnable_scales = True
            shape = (self.out_features,) if self.group_size is None else (
                self.out_features, self.in_features // self.group_size)
            self.weight_scale = nn.Parameter(torch.ones(shape, device=device, dtype=torch.float32))
            if device.type != "meta":
                with torch.no_grad():
                    self.weight_scale.copy_(self._rtn_scale())

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        config: QuantConfig,
        learnable_scales: bool = False,
        smoothing: torch.Tensor | None = None,
    ) -> QATLinear:
        """Wrap `linear`'s own weight and bias Parameters (shared, not copied: an optimizer built
        before the swap keeps updating them) with the fake quantisation of `config`.
        learnable_scales and smoothing as the constructor's; learnable scales start at the RTN
        scales, so the first forward is the same with or without them."""
        module = cls(
            linear.in_features, linear.out_features, bias=False, config=config, device="meta",
            dtype=linear.weight.dtype,
        )
        module.weight = linear.weight
        module.bias = linear.bias
        module._add_quant_state(learnable_scales, smoothing)
        module.train(linear.training)
        return module

    def _quantised_input_weight(self) -> torch.Tensor:
        """The weight the format quantises: W, or W * s (fp32) with SmoothQuant."""
        if self.smoothing is None:
            return self.weight
        return self.weight.float() * self.smoothing[None, :]

    @property
    def scale_dtype(self) -> torch.dtype:
        return torch.float32 if self.group_size is None else self.weight.dtype

    def _rtn_scale(self) -> torch.Tensor:
        w = self._quantised_input_weight().detach()
        w32 = w.float()
        if self.group_size is None:
            return int8_format.int8_channel_scale(w32)
        n, k = w32.shape
        groups = w32.reshape(n, k // self.group_size, self.group_size)
        return int4_format.int4_group_scales(groups, self.config.symmetric, w.dtype)

    def effective_scale(self) -> torch.Tensor | None:
        """The learnt scale as stored by the real format (positive, in its dtype), or None
        (RTN scales from the current weight)."""
        if self.weight_scale is None:
            return None
        return safe_scale(self.weight_scale.abs(), self.scale_dtype)

    # ------------------------------------------------------------------ forward

    def fake_quantized_weight(self) -> torch.Tensor:
        """The dequantised weight the forward multiplies by: bit-identical to the converted
        layer's (for Int8DynamicConfig with SmoothQuant: of W * s, before the 1 / s of the
        activations)."""
        w = self._quantised_input_weight()
        if self.group_size is None:
            return fake_quantize_int8_per_channel(w, self.effective_scale())
        return fake_quantize_int4(w, self.group_size, self.config.symmetric, self.effective_scale())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fake_quantized_weight().to(x.dtype)
        if isinstance(self.config, Int8DynamicConfig):
            x2d = fake_quantize_per_token_int8(x.reshape(-1, self.in_features), self.smooth)
            return F.linear(x2d, w, self.bias).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        extra = ", learnable_scales" if self.learnable_scales else ""
        extra += ", smoothquant" if self.smoothing is not None else ""
        return f"{super().extra_repr()}, qat={self.config}{extra}"

    # ------------------------------------------------------------------ conversion

    def why_not_sparse_24(self) -> str | None:
        """Why convert(sparse_24=True) cannot give a 2:4 + int4 SparseLinear, or None."""
        if self.group_size is None:
            return "leanops has 2:4 formats for 16-bit and int4 weights, not for int8"
        if self.learnable_scales:
            return "the 2:4 + int4 format stores RTN scales; learnt scales need the dense int4 layer"
        if self.group_size % 64 != 0 and self.group_size != self.in_features:
            return f"2:4 + int4 needs a group size that is a multiple of 64, got {self.group_size}"
        if self.in_features % 8 != 0:
            return f"2:4 layers need in_features divisible by 8, got {self.in_features}"
        if not is_nm_sparse(self.weight.detach(), 2, 4):
            return "the weight is not 2:4 sparse (train it with leanops.sparsity.enable_sparse_training)"
        return None

    @torch.no_grad()
    def convert(self, sparse_24: bool = False) -> PackedLinear:
        """The real quantised layer (Int8Linear, Int8WeightOnlyLinear or Int4WeightOnlyLinear)
        with the codes and scales this layer's forward used.

        sparse_24=True: an int4 layer whose weight is 2:4 sparse becomes a SparseLinear with int4
        kept values instead (leanops::sparse24_int4_mm, half the int4 bytes plus metadata): the
        same dequantised weight, since a group's RTN scale over its kept values equals the one
        over all its values when the others are zeros. ValueError (see why_not_sparse_24) if it
        cannot."""
        if sparse_24:
            reason = self.why_not_sparse_24()
            if reason is not None:
                raise ValueError(f"convert(sparse_24=True): {reason}")
            w = self.weight.detach()
            out = SparseLinear.from_weight(
                w, self.bias, w != 0, group_size=self.group_size, symmetric=self.config.symmetric
            )
            out.train(self.training)
            return out
        w = self._quantised_input_weight().detach()
        scale = self.effective_scale()
        scale = None if scale is None else scale.detach()
        bias = self.bias is not None
        kwargs = dict(device=self.weight.device, dtype=self.weight.dtype)
        if self.group_size is not None:
            out = Int4WeightOnlyLinear(
                self.in_features, self.out_features, bias, group_size=self.group_size,
                symmetric=self.config.symmetric, **kwargs,
            )
            packed, scales, zeros = int4_format.quantize_int4(
                w, self.group_size, self.config.symmetric, scales=scale
            )
            out.weight_packed.copy_(packed)
            out.weight_scale.copy_(scales)
            if zeros is not None:
                out.weight_zero.copy_(zeros)
        else:
            if isinstance(self.config, Int8DynamicConfig):
                out = Int8Linear(
                    self.in_features, self.out_features, bias,
                    smoothquant=self.smoothing is not None, **kwargs,
                )
                if self.smooth is not None:
                    out.smooth.copy_(self.smooth)
            else:
                out = Int8WeightOnlyLinear(self.in_features, self.out_features, bias, **kwargs)
            q, s = int8_format.quantize_int8_per_channel(w, scale=scale)
            out.weight.copy_(q)
            out.weight_scale.copy_(s)
        if self.bias is not None:
            out.bias.data.copy_(self.bias.detach())
            out.bias.requires_grad_(self.bias.requires_grad)
        out.train(self.training)
        return out
