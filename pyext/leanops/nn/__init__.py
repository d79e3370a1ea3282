"""Drop-in nn.Module replacements backed by leanops ops."""

from leanops.nn.attention import MultiheadAttention
from leanops.nn.packed import PackedLinear, packed_linear_from_spec, register_packed_linear
from leanops.nn.quantized import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.nn.sparse import SparseLinear
from leanops.training.linear import Int8TrainingLinear

__all__ = [
    "Int4WeightOnlyLinear",
    "Int8Linear",
    "Int8TrainingLinear",
    "Int8WeightOnlyLinear",
    "MultiheadAttention",
    "PackedLinear",
    "SparseLinear",
    "packed_linear_from_spec",
    "register_packed_linear",
]
