"""Drop-in nn.Module replacements backed by leanops ops."""

from leanops.nn.linear import (
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8WeightOnlyLinear,
    QuantizedLinear,
)

__all__ = ["Int4WeightOnlyLinear", "Int8Linear", "Int8WeightOnlyLinear", "QuantizedLinear"]
