"""leanops: GPU kernels for cheaper AI (int8/int4 quantised matmul, 2:4 sparsity, fused
attention) as PyTorch custom ops and drop-in modules, measured for speed and energy.

    import leanops
    leanops.quantize_(model, leanops.Int4WeightOnlyConfig(group_size=128))
    leanops.save_quantized(model, "m.safetensors")
    leanops.qat.prepare_(model, leanops.Int4WeightOnlyConfig(group_size=128))  # then train, then
    leanops.qat.convert_(model)                                                   # real int4 layers
    leanops.quantize_(model, leanops.Int8TrainingConfig())   # int8 matmuls in forward and backward
"""

import sys

# ops defines torch.ops.leanops.*; qat: prepare_/convert_; integrations: register_transformers
from leanops import integrations, ops, qat  # noqa: F401
from leanops._version import __version__
from leanops.api import load_quantized, quantize_, save_quantized
from leanops.dispatch import backends, use_backend
from leanops.nn import (
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8TrainingLinear,
    Int8WeightOnlyLinear,
    SparseLinear,
)
from leanops.ops.attention import attention, attention_decode, attention_int8, attention_varlen
from leanops.quant.config import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8TrainingConfig,
    Int8WeightOnlyConfig,
)
from leanops.sparsity.api import prune_, sparsify_
from leanops.sparsity.config import SemiSparseConfig

# attn_implementation="leanops" for Hugging Face models, at no import cost: only when the user's
# program has already imported transformers (otherwise call integrations.register_transformers()).
if "transformers" in sys.modules:
    integrations.register_transformers()

__all__ = [
    "Int4WeightOnlyConfig",
    "Int4WeightOnlyLinear",
    "Int8DynamicConfig",
    "Int8Linear",
    "Int8TrainingConfig",
    "Int8TrainingLinear",
    "Int8WeightOnlyConfig",
    "Int8WeightOnlyLinear",
    "SemiSparseConfig",
    "SparseLinear",
    "__version__",
    "attention",
    "attention_decode",
    "attention_int8",
    "attention_varlen",
    "backends",
    "integrations",
    "load_quantized",
    "ops",
    "prune_",
    "qat",
    "quantize_",
    "save_quantized",
    "sparsify_",
    "use_backend",
]
