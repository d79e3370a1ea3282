"""Drop-in nn.Module replacements backed by leanops ops.

The rule: every module that takes the place of a layer in a user's model lives here, whatever
workflow puts it there (quantize_, sparsify_, leanops.qat.prepare_ / convert_, or the user by
hand): the quantised and sparse linears, the int8-training linear, the QAT linear and
MultiheadAttention. The packages that drive a workflow over a model (leanops.api,
leanops.qat) only find, build and swap these modules; leanops.sparsity.SparseMask is a weight
parametrization for sparse fine-tuning, not a layer.

  quantized.py   Int8Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear (frozen packed weights)
  sparse.py      SparseLinear (2:4 compressed weights, optionally int4)
  training.py    Int8TrainingLinear (int8 matmuls in forward and backward, 16-bit master weight)
  qat.py         QATLinear (fake quantisation of an inference format, straight-through)
  attention.py   MultiheadAttention (torch's, on leanops.attention)
  packed.py      PackedLinear, the base of the packed layers, and their serialisation spec
  swap.py        finding the nn.Linear layers a workflow may replace, and replacing them
"""

from leanops.nn.attention import MultiheadAttention
from leanops.nn.packed import PackedLinear, packed_linear_from_spec, register_packed_linear
from leanops.nn.qat import QATLinear
from leanops.nn.quantized import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.nn.sparse import SparseLinear
from leanops.nn.training import Int8TrainingLinear

__all__ = [
    "Int4WeightOnlyLinear",
    "Int8Linear",
    "Int8TrainingLinear",
    "Int8WeightOnlyLinear",
    "MultiheadAttention",
    "PackedLinear",
    "QATLinear",
    "SparseLinear",
    "packed_linear_from_spec",
    "register_packed_linear",
]
