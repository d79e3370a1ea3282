"""The base of every drop-in nn.Linear replacement in leanops (quantised, sparse, ...): shape
handling, bias, repr, and the serialisation spec that save_quantized / load_quantized use to
rebuild an empty layer of the right kind before loading its tensors.

A subclass stores its packed weight tensors as buffers (so state_dict, .to(device) and
safetensors see them) and the bias as a Parameter of the original layer's dtype. These buffers
are the only copy of the weight on every device: the CPU kernels (kernels/cpu/) read the stored
layouts as they are, so no derived layout is built, cached or saved, and nothing is repacked per
call (tests/test_cpu_backend.py checks it). A subclass implements
`_matmul(x2d)` and `dequantized_weight()`, returns its constructor arguments from
`format_args()`, and is registered with @register_packed_linear.
"""

from __future__ import annotations

import torch
from torch import nn


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class PackedLinear(nn.Module):
    """Shared shape handling, bias, repr and (de)serialisation spec of leanops' linear layers."""

    format_description = "packed"

    def __init__(self, in_features: int, out_features: int, bias: bool, device, dtype):
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(
                f"in_features and out_features must be positive, got {in_features}, {out_features}"
            )
        self.in_features = in_features
        self.out_features = out_features
        if bias:
            dtype = dtype or torch.get_default_dtype()
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: the input's last dimension must be in_features="
                f"{self.in_features}, got input of shape {tuple(x.shape)}"
            )
        out = self._matmul(x.reshape(-1, self.in_features))
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the layer was built for (bias, and int4 scales); follows .to(dtype)."""
        return self.bias.dtype if self.bias is not None else torch.float32

    def _matmul(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The dense [out_features, in_features] weight this layer multiplies by, in fp32."""
        raise NotImplementedError

    # -- serialisation spec: enough to rebuild an empty module that load_state_dict can fill --
    def format_args(self) -> dict:
        return {}

    def spec(self) -> dict:
        return {
            "type": type(self).__name__,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": _dtype_name(self.dtype),
            **self.format_args(),
        }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, format={self.format_description}, "
            f"dtype={_dtype_name(self.dtype)}"
        )

    @staticmethod
    def _copy_bias(linear: nn.Linear, module: PackedLinear) -> None:
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
            module.bias.requires_grad_(linear.bias.requires_grad)


_LAYER_TYPES: dict[str, type[PackedLinear]] = {}


def register_packed_linear(cls: type[PackedLinear]) -> type[PackedLinear]:
    """Class decorator: make `cls` known to packed_linear_from_spec (and so to load_quantized)."""
    _LAYER_TYPES[cls.__name__] = cls
    return cls


def packed_linear_from_spec(spec: dict, device=None) -> PackedLinear:
    """An empty layer (to be filled by load_state_dict) from PackedLinear.spec()."""
    spec = dict(spec)
    name = spec.pop("type")
    if name not in _LAYER_TYPES:
        raise ValueError(f"unknown leanops layer type {name!r}; known: {sorted(_LAYER_TYPES)}")
    dtype = getattr(torch, spec.pop("dtype"))
    return _LAYER_TYPES[name](**spec, device=device, dtype=dtype)
