"""The leanops custom ops (namespace `leanops`): schemas, argument checks, fake kernels, autograd
and backend dispatch (cuda -> triton -> reference), one module per op family."""

from leanops.ops.int4 import int4_weight_mm
from leanops.ops.int8 import int8_dynamic_linear, int8_mm, int8_weight_mm, quantize_per_token_int8
from leanops.ops.sparse24 import sparse24_int4_mm, sparse24_mm

__all__ = [
    "int4_weight_mm",
    "int8_dynamic_linear",
    "int8_mm",
    "int8_weight_mm",
    "quantize_per_token_int8",
    "sparse24_int4_mm",
    "sparse24_mm",
]
