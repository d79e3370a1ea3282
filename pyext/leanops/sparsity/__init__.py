"""2:4 (and N:M) structured sparsity: masks, pruning (magnitude, Wanda, SparseGPT), the
compressed format and sparse fine-tuning, one weight or one model's masks at a time.

Modules: sparse24 (the compressed 2:4 layout, conversions to/from torch's semi-structured
tensors), masks (N:M masks), pruning (scores and the SparseGPT solver), training (masked /
SR-STE fine-tuning), config (SemiSparseConfig). The whole-model entry points that swap layers,
leanops.prune_ and leanops.sparsify_, live beside quantize_ in leanops.api: they sit above the
ops and modules, which this package's 2:4 format sits below.

    leanops.sparsify_(model, leanops.SemiSparseConfig(method="wanda"), calibrate=lambda m: m(batch))
"""

from leanops.sparsity.config import SemiSparseConfig
from leanops.sparsity.masks import is_nm_sparse, nm_mask
from leanops.sparsity.pruning import prune_magnitude, prune_sparsegpt, prune_wanda
from leanops.sparsity.sparse24 import (
    compress_24,
    compress_24_int4,
    decompress_24,
    decompress_24_int4,
    from_torch_semi_structured,
    to_torch_semi_structured,
)
from leanops.sparsity.training import (
    SparseMask,
    enable_sparse_training,
    finalize_sparse_training,
)

__all__ = [
    "SemiSparseConfig",
    "SparseMask",
    "compress_24",
    "compress_24_int4",
    "decompress_24",
    "decompress_24_int4",
    "enable_sparse_training",
    "finalize_sparse_training",
    "from_torch_semi_structured",
    "is_nm_sparse",
    "nm_mask",
    "prune_magnitude",
    "prune_sparsegpt",
    "prune_wanda",
    "to_torch_semi_structured",
]

