"""2:4 (and N:M) structured sparsity: masks, pruning (magnitude, Wanda, SparseGPT), the
compressed format, sparse fine-tuning, and the model-level entry points.

    leanops.sparsify_(model, leanops.SemiSparseConfig(method="wanda"), calibrate=lambda m: m(batch))

Modules: format (the compressed layout, conversions to/from torch's semi-structured tensors),
masks (N:M masks), pruning (scores and the SparseGPT solver), training (masked / SR-STE
fine-tuning), config (SemiSparseConfig), api (prune_, sparsify_).
"""

from leanops.sparsity.config import SemiSparseConfig
from leanops.sparsity.format import (
    compress_24,
    compress_24_int4,
    decompress_24,
    decompress_24_int4,
    from_torch_semi_structured,
    to_torch_semi_structured,
)
from leanops.sparsity.masks import is_nm_sparse, nm_mask
from leanops.sparsity.pruning import prune_magnitude, prune_sparsegpt, prune_wanda
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
    "prune_",
    "prune_magnitude",
    "prune_sparsegpt",
    "prune_wanda",
    "sparsify_",
    "to_torch_semi_structured",
]


def __getattr__(name):
    # prune_ / sparsify_ reach the op and module layers, which import this package's format
    # module while leanops.ops is still being defined: load them on first use instead.
    if name in ("prune_", "sparsify_"):
        from leanops.sparsity import api

        return getattr(api, name)
    raise AttributeError(f"module 'leanops.sparsity' has no attribute {name!r}")
