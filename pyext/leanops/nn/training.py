"""Int8TrainingLinear: an nn.Linear whose matmuls run through leanops::int8_training_linear."""

from __future__ import annotations

import torch
from torch import nn

from leanops.ops.int8_training import int8_training_linear


class Int8TrainingLinear(nn.Linear):
    """nn.Linear trained with int8 matmuls (SwitchBack, see leanops.ops.int8_training): the
    forward and the input gradient are int8 x int8 products (per-token activation and
    output-gradient scales, per-channel weight scales), the weight gradient is dy^T @ x in the
    weight's dtype. `weight` and `bias` stay ordinary parameters (the master copy, e.g. bf16), so
    optimizers, state_dict, DDP and FSDP see a plain linear layer; the input must have the
    weight's dtype (cast the model, e.g. model.to(torch.bfloat16); autocast does not reach
    custom ops).

    Arguments: nn.Linear's (in_features, out_features, bias, device, dtype); `from_linear`
    wraps an existing layer's parameters instead, which is what leanops.quantize_ does.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8TrainingLinear:
        """Wrap `linear`'s own weight and bias Parameters (shared, not copied: an optimizer
        built on the model before the swap still updates them)."""
        module = cls(linear.in_features, linear.out_features, bias=False, device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Int8TrainingLinear: the input's last dimension must be in_features="
                f"{self.in_features}, got input of shape {tuple(x.shape)}"
            )
        out = int8_training_linear(x.reshape(-1, self.in_features), self.weight, self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 training (SwitchBack)"
