"""The leanops custom ops (namespace `leanops`): schemas, argument checks, fake kernels, autograd
and backend dispatch (cuda -> triton -> reference), one module per op family."""

# `leanops.attention` (the function) is exported at the top level; here `attention` stays the
# module leanops.ops.attention (definitions, references, mask semantics). No module here is named
# like a function this package exports, so `leanops.ops.<name>` is never ambiguous.
from leanops.ops.attention import attention_fwd, attention_varlen
from leanops.ops.decode_attention import attention_decode
from leanops.ops.fake_quant import (
    fake_quantize_int4,
    fake_quantize_int8_per_channel,
    fake_quantize_per_token_int8,
)
from leanops.ops.int4 import int4_weight_mm
from leanops.ops.int8 import int8_dynamic_linear, int8_mm, int8_weight_mm, quantize_per_token_int8
from leanops.ops.int8_attention import attention_int8, attention_int8_varlen
from leanops.ops.int8_training import int8_training_linear
from leanops.ops.sparse24 import sparse24_int4_mm, sparse24_mm

__all__ = [
    "attention_decode",
    "attention_fwd",
    "attention_int8",
    "attention_int8_varlen",
    "attention_varlen",
    "fake_quantize_int4",
    "fake_quantize_int8_per_channel",
    "fake_quantize_per_token_int8",
    "int4_weight_mm",
    "int8_dynamic_linear",
    "int8_mm",
    "int8_training_linear",
    "int8_weight_mm",
    "quantize_per_token_int8",
    "sparse24_int4_mm",
    "sparse24_mm",
]
