"""Drop-in replacements for nn.Linear that hold quantised weights and call the leanops ops.
Inputs of any leading shape [..., in_features] are flattened to 2-D for the op; the output has
the input's dtype (see leanops.nn.packed for what every such layer shares)."""

from __future__ import annotations

import torch
from torch import nn

from leanops.nn.packed import PackedLinear, register_packed_linear
from leanops.ops import int4_weight_mm, int8_dynamic_linear, int8_weight_mm
from leanops.quant import int4 as int4_format
from leanops.quant import int8 as int8_format
from leanops.quant.common import require_positive_finite, value_checks


def _check_int8_weight(state, prefix, checks) -> None:
    """The per-channel int8 weight both int8 layers store (weight, weight_scale)."""
    int8_format.check_int8_per_channel(
        state["weight"], state["weight_scale"],
        names=(prefix + "weight", prefix + "weight_scale"), checks=checks,
    )


@register_packed_linear
class Int8Linear(PackedLinear):
    """Dynamic W8A8 linear: int8 per-channel weights, per-token int8 activations at run time
    (leanops::int8_dynamic_linear). Build it with `from_linear` or leanops.quantize_; the
    constructor makes an empty layer of the right shape (what load_quantized fills).

    Arguments:
        in_features, out_features: K and N of the weight [N, K], as nn.Linear.
        bias: whether the layer has a bias Parameter [N] (in `dtype`).
        device, dtype: where the buffers live and the bias's (and output's expected) dtype.
        smoothquant: whether the layer has the SmoothQuant buffer `smooth` (default False).

    Buffers: weight int8 [out, in], weight_scale fp32 [out], and with smoothquant=True
    smooth fp32 [in], the per-input-channel multiplier (1/s) applied to activations inside the
    quantisation kernel. Gradients reach the input through a straight-through estimate.
    """

    def __init__(self, in_features, out_features, bias=True, smoothquant=False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if smoothquant:
            self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device))
        else:
            self.smooth = None

    @property
    def format_description(self):
        return "int8 W8A8 dynamic per-token" + (" smoothquant" if self.smooth is not None else "")

    @classmethod
    def from_linear(cls, linear: nn.Linear, smoothing: torch.Tensor | None = None) -> Int8Linear:
        """Quantise `linear`. `smoothing` [in_features] is SmoothQuant's s: the weight is
        quantised as W * s and activations are multiplied by 1/s before their quantisation."""
        weight = linear.weight.detach()
        module = cls(
            linear.in_features, linear.out_features, linear.bias is not None,
            smoothquant=smoothing is not None, device=weight.device, dtype=weight.dtype,
        )
        if smoothing is not None:
            if not isinstance(smoothing, torch.Tensor) or smoothing.shape != (linear.in_features,):
                got = (
                    tuple(smoothing.shape) if isinstance(smoothing, torch.Tensor)
                    else type(smoothing).__name__
                )
                raise ValueError(
                    f"smoothing must be a tensor of shape ({linear.in_features},), got {got}"
                )
            with value_checks(None) as checks:
                require_positive_finite(checks, smoothing, "smoothing")
            weight = weight.float() * smoothing.float().to(weight.device)[None, :]
            module.smooth.copy_(1.0 / smoothing.float())
        q, scale = int8_format.quantize_int8_per_channel(weight)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        cls._set_bias_and_input_scale(module, linear.bias, None)
        return module

    def format_args(self):
        return {"smoothquant": self.smooth is not None}

    def _check_format(self, state, prefix, checks):
        _check_int8_weight(state, prefix, checks)
        if self.smooth is not None:
            require_positive_finite(checks, state["smooth"], prefix + "smooth")

    def _matmul(self, x2d):
        return int8_dynamic_linear(x2d, self.weight, self.weight_scale, self.smooth, self.bias)

    def dequantized_weight(self):
        w = int8_format.dequantize_int8_per_channel(self.weight, self.weight_scale)
        return w if self.smooth is None else w * self.smooth[None, :]


@register_packed_linear
class Int8WeightOnlyLinear(PackedLinear):
    """W8A16 linear: int8 per-channel weights, 16-bit (or fp32) activations
    (leanops::int8_weight_mm). Build it with `from_linear` or leanops.quantize_; the
    constructor makes an empty layer of the right shape.

    Arguments:
        in_features, out_features: K and N of the weight [N, K], as nn.Linear.
        bias: whether the layer has a bias Parameter [N] (in `dtype`).
        input_scale: whether the layer has the buffer input_scale (AWQ's 1/s; default False).
        device, dtype: where the buffers live and the bias's (and output's expected) dtype.

    Buffers: weight int8 [out, in], weight_scale fp32 [out], and with input_scale=True
    input_scale fp32 [in] (the input is multiplied by it before the matmul: AWQ's 1/s).
    """

    def __init__(self, in_features, out_features, bias=True, input_scale=False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        if input_scale:
            self.use_input_scale(device)

    @property
    def format_description(self):
        return "int8 weight-only per-channel" + (" input-scaled" if self.input_scale is not None else "")

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Quantise `linear` (RTN per output channel, leanops.quant.int8) into a new layer on
        its device, the bias copied. Raises ValueError for a non-finite or non-float weight."""
        return cls.from_weight(linear.weight, linear.bias)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> Int8WeightOnlyLinear:
        """A layer computing (x * input_scale) @ Q(weight).T + bias.

        weight: [out, in] float16 / bfloat16 / float32. bias: [out] or None (its dtype is the
        layer's; default weight's). scale: fp32 [out] row scales to quantise with (e.g. GPTQ's,
        whose weight lies on that grid, so the codes are exactly its), default RTN's amax / 127.
        input_scale: positive [in] multiplier of the input, or None. The layer's dtype is the
        bias's (default weight's). Raises ValueError on a bad shape or non-finite value."""
        weight = weight.detach()
        q, scale = int8_format.quantize_int8_per_channel(weight, scale)
        module = cls(
            weight.shape[1], weight.shape[0], bias is not None, input_scale is not None,
            device=weight.device, dtype=weight.dtype if bias is None else bias.dtype,
        )
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        cls._set_bias_and_input_scale(module, bias, input_scale)
        return module

    def format_args(self):
        return {"input_scale": True} if self.input_scale is not None else {}

    def _check_format(self, state, prefix, checks):
        _check_int8_weight(state, prefix, checks)

    def _matmul(self, x2d):
        return int8_weight_mm(x2d, self.weight, self.weight_scale, self.bias)

    def dequantized_weight(self):
        return self._scaled_weight(int8_format.dequantize_int8_per_channel(self.weight, self.weight_scale))


@register_packed_linear
class Int4WeightOnlyLinear(PackedLinear):
    """W4A16 linear: group-wise int4 weights in the layout of leanops.quant.int4
    (leanops::int4_weight_mm). Build it with `from_linear` or leanops.quantize_; the
    constructor makes an empty layer of the right shape.

    Arguments:
        in_features, out_features: K and N of the weight [N, K], as nn.Linear.
        bias: whether the layer has a bias Parameter [N] (in `dtype`).
        device, dtype: where the buffers live and the bias's (and output's expected) dtype;
            the scales are stored in `dtype` too.
        group_size: inputs per scale, a multiple of 32 dividing in_features (default 128);
            in_features means one scale per output channel.
        symmetric: False (default, as from_linear and Int4WeightOnlyConfig): a uint8 zero point
            per group (weight_zero); True: codes -8..7 around the fixed zero point 8.
        input_scale: whether the layer has the buffer input_scale (AWQ's 1/s; default False).

    Buffers: weight_packed uint8 [out, in/2], weight_scale [out, in/group_size] in `dtype`, if
    not symmetric weight_zero uint8 [out, in/group_size], and with input_scale=True input_scale
    fp32 [in] (the input is multiplied by it before the matmul: AWQ's 1/s).
    Raises: ValueError if group_size is not a multiple of 32 dividing in_features.
    """

    def __init__(
        self, in_features, out_features, bias=True, group_size=128, symmetric=False,
        input_scale=False, device=None, dtype=None,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        if input_scale:
            self.use_input_scale(device)
        int4_format.check_group_size(group_size, in_features)
        self.group_size = group_size
        self.symmetric = symmetric
        groups = in_features // group_size
        self.register_buffer(
            "weight_packed",
            torch.full((out_features, in_features // 2), 0x88, dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "weight_scale",
            torch.ones(out_features, groups, dtype=dtype or torch.get_default_dtype(), device=device),
        )
        if symmetric:
            self.weight_zero = None
        else:
            self.register_buffer(
                "weight_zero",
                torch.full((out_features, groups), int4_format.SYMMETRIC_ZERO, dtype=torch.uint8, device=device),
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    @property
    def format_description(self):
        scaled = " input-scaled" if self.input_scale is not None else ""
        return f"int4 weight-only g{self.group_size} {'sym' if self.symmetric else 'asym'}{scaled}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = False):
        """Quantise `linear` (RTN per group of `group_size` inputs, leanops.quant.int4) into a new
        layer on its device, scales in its weight's dtype, the bias copied. symmetric: False
        (default) a zero point per group, True the fixed zero point 8. Raises ValueError for a
        group size that does not divide in_features."""
        return cls.from_weight(linear.weight, linear.bias, group_size, symmetric)

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = 128,
        symmetric: bool = False,
        scales: torch.Tensor | None = None,
        zeros: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> Int4WeightOnlyLinear:
        """A layer computing (x * input_scale) @ Q(weight).T + bias.

        weight: [out, in] float16 / bfloat16 / float32. bias: [out] or None. group_size: a
        multiple of 32 dividing in. symmetric: bool (default False). scales [out, in/group_size]
        and zeros uint8 [out, in/group_size] (asymmetric only): the grid to encode `weight` on
        (a calibrated one: leanops.quant.gptq/awq/hqq, whose weights lie on it, so the codes are
        exactly theirs); default RTN's. input_scale: positive [in] multiplier of the input, or
        None. The layer's dtype is the scales' (default weight's). Raises ValueError on a bad
        shape, group size or non-finite value."""
        weight = weight.detach()
        packed, scales, zeros = int4_format.quantize_int4(
            weight, group_size, symmetric, scales=scales, zeros=zeros
        )
        module = cls(
            weight.shape[1], weight.shape[0], bias is not None, group_size=group_size,
            symmetric=symmetric, input_scale=input_scale is not None, device=weight.device,
            dtype=scales.dtype,
        )
        module.weight_packed.copy_(packed)
        module.weight_scale.copy_(scales)
        if zeros is not None:
            module.weight_zero.copy_(zeros)
        cls._set_bias_and_input_scale(module, bias, input_scale)
        return module

    def format_args(self):
        args = {"group_size": self.group_size, "symmetric": self.symmetric}
        return {**args, "input_scale": True} if self.input_scale is not None else args

    def _check_format(self, state, prefix, checks):
        int4_format.check_int4(
            state["weight_packed"], state["weight_scale"], state.get("weight_zero"), self.group_size,
            names=(prefix + "weight_packed", prefix + "weight_scale", prefix + "weight_zero"),
            checks=checks,
        )

    def _matmul(self, x2d):
        return int4_weight_mm(
            x2d, self.weight_packed, self.weight_scale, self.weight_zero, self.group_size, self.bias
        )

    def dequantized_weight(self):
        return self._scaled_weight(int4_format.dequantize_int4(
            self.weight_packed, self.weight_scale, self.weight_zero, self.group_size
        ).float())
