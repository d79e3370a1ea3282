"""leanops: GPU kernels for cheaper AI (int8/int4 quantised matmul, 2:4 sparsity, fused
attention) as PyTorch custom ops and drop-in modules, measured for speed and energy.

    import leanops
    leanops.quantize_(model, leanops.Int4WeightOnlyConfig(group_size=128))
    leanops.save_quantized(model, "m.safetensors")
    leanops.qat.prepare_(model, leanops.Int4WeightOnlyConfig(group_size=128))  # then train, then
    leanops.qat.convert_(model)                                                   # real int4 layers
    leanops.quantize_(model, leanops.Int8TrainingConfig())   # int8 matmuls in forward and backward

Layers, top to bottom. A module imports only from its own layer or the layers below it, and no
two modules import each other, directly or round a loop (tests/test_structure.py checks every
import in the package against this list, which is its only copy):

    leanops, cli, bench                this file (the public names), the command, benchmarks
    api, qat, ptq                      whole-model entry points: quantize_, prune_, sparsify_,
                                       save/load, QAT prepare_/convert_, calibrated PTQ
                                       (GPTQ/AWQ/HQQ layer by layer)
    nn, integrations, models           drop-in modules (every one, see leanops.nn), the
                                       Hugging Face hook, the built-in test models
    ops                                the custom ops: checks, fake kernels, autograd, references
    dispatch                           which backend runs a call; loads the kernels by name
    triton                             Triton kernels and their launchers (the compiled
                                       leanops._C sits here too; dispatch loads it)
    quant, sparsity, calibration       formats, algorithms and configs; N:M masks and the 2:4
                                       format; calibration hooks
    _env, _version, _layout            leaf helpers
"""

import sys

# ops defines torch.ops.leanops.*; qat: prepare_/convert_; integrations: register_transformers
from leanops import integrations, ops, qat  # noqa: F401
from leanops._version import __version__
from leanops.api import load_quantized, prune_, quantize_, save_quantized, sparsify_
from leanops.dispatch import backends, use_backend
from leanops.nn import (
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8TrainingLinear,
    Int8WeightOnlyLinear,
    SparseLinear,
)
from leanops.ops.attention import attention, attention_varlen
from leanops.ops.decode_attention import attention_decode
from leanops.ops.int8_attention import attention_int8, attention_int8_varlen
from leanops.quant.config import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8TrainingConfig,
    Int8WeightOnlyConfig,
)
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
    "attention_int8_varlen",
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
