"""Quantisation formats (packing, scales, zero points), algorithms and configs.

Algorithms onto the int4 / int8 weight grids: RTN (quantize_int4, quantize_int8_per_channel),
GPTQ (gptq), AWQ (awq), HQQ (hqq); obs is the solver GPTQ shares with SparseGPT and grid the
per-group clip search. leanops.ptq runs them over a model (quantize_ calls it)."""

from leanops.quant.common import sqnr_db
from leanops.quant.config import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from leanops.quant.gptq import gptq_int4, gptq_int8
from leanops.quant.hqq import hqq_int4
from leanops.quant.int4 import dequantize_int4, pack_int4, quantize_int4, unpack_int4
from leanops.quant.int8 import (
    dequantize_int8_per_channel,
    quantize_int8_per_channel,
    quantize_per_token_int8,
)

__all__ = [
    "Int4WeightOnlyConfig",
    "Int8DynamicConfig",
    "Int8WeightOnlyConfig",
    "QuantConfig",
    "dequantize_int4",
    "dequantize_int8_per_channel",
    "gptq_int4",
    "gptq_int8",
    "hqq_int4",
    "pack_int4",
    "quantize_int4",
    "quantize_int8_per_channel",
    "quantize_per_token_int8",
    "sqnr_db",
    "unpack_int4",
]
