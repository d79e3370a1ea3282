"""What `leanops.sparsify_` does to a model: SemiSparseConfig."""

from __future__ import annotations

from dataclasses import dataclass

from leanops.quant.config import Int4WeightOnlyConfig
from leanops.sparsity.pruning import METHODS

KERNELS = ("leanops", "torch")


@dataclass(frozen=True)
class SemiSparseConfig:
    """2:4 structured sparsity: prune every selected nn.Linear to 2 of every 4 inputs and swap in
    a SparseLinear holding the compressed weight (leanops.sparsity.sparse24).

    method: how the kept entries are chosen (leanops.sparsity.pruning): "magnitude" (|W|, no
        data), "wanda" (|W| * ||X_j||, needs calibrate=) or "sparsegpt" (OBS solver that also
        updates the kept weights to compensate, needs calibrate=).
    quantize: None (kept values stay in the weight's dtype, leanops::sparse24_mm) or
        Int4WeightOnlyConfig(group_size, symmetric, algorithm=...): kept values int4 with
        group_size a multiple of 64, or -1 per output channel (leanops::sparse24_int4_mm).
        algorithm "rtn" rounds the pruned weight's kept values; "gptq" (with
        method="sparsegpt") prunes and quantises in one solver pass, as the SparseGPT paper's
        joint mode: masks and each group's grid are chosen as the solver reaches them and
        every kept weight's rounding error is spread like a pruned one's (the solve runs in
        column order with this config's blocksize and damp, so quantize's act_order does not
        apply and its damp and sequential must stay at their defaults).
    kernel: "leanops" (our ops: Triton on GPUs, reference elsewhere) or "torch" (PyTorch's
        SparseSemiStructuredTensor + F.linear: cuSPARSELt or CUTLASS, CUDA only, float16/bfloat16,
        no int4), the baseline.
    blocksize, damp: SparseGPT's column block and relative Hessian damping.

    Wanda and SparseGPT gather their statistics in one calibration pass over the dense model
    (not block by block on the already pruned one, as the papers do). SparseGPT then holds one
    fp32 [in, in] Hessian per selected layer at once: ~28 GB for every projection of a 7B Llama,
    so on large models run it over a few blocks at a time with filter_fn.
    """

    method: str = "magnitude"
    quantize: Int4WeightOnlyConfig | None = None
    kernel: str = "leanops"
    blocksize: int = 128
    damp: float = 0.01

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.quantize is not None:
            if not isinstance(self.quantize, Int4WeightOnlyConfig):
                raise ValueError(
                    "quantize must be None or leanops.Int4WeightOnlyConfig(...), got "
                    f"{type(self.quantize).__name__}"
                )
            q = self.quantize
            if q.algorithm not in ("rtn", "gptq"):
                raise ValueError(
                    f"quantize: 2:4 + int4 supports algorithm 'rtn' or 'gptq', got {q.algorithm!r}"
                )
            if q.algorithm == "gptq" and self.method != "sparsegpt":
                raise ValueError(
                    "quantize: algorithm='gptq' runs inside SparseGPT's solver: it needs "
                    f"method='sparsegpt', got method={self.method!r}"
                )
            if q.algorithm == "gptq" and (q.damp is not None or q.sequential):
                raise ValueError(
                    "quantize: with 2:4 the joint SparseGPT pass uses SemiSparseConfig's damp and "
                    "runs in one calibration pass; leave Int4WeightOnlyConfig's damp=None and "
                    "sequential=False"
                )
            g = self.quantize.group_size
            if g != -1 and g % 64 != 0:
                raise ValueError(
                    "quantize: 2:4 + int4 needs group_size a multiple of 64 (each group of g "
                    f"inputs keeps g/2 values, a multiple of 32) or -1, got {g}"
                )
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.kernel == "torch" and self.quantize is not None:
            raise ValueError("kernel='torch' (PyTorch's semi-structured sparsity) has no int4 variant; use kernel='leanops'")
        if not isinstance(self.blocksize, int) or self.blocksize <= 0 or self.blocksize % 4:
            raise ValueError(f"blocksize must be a positive multiple of 4, got {self.blocksize!r}")
        if not (isinstance(self.damp, (int, float)) and self.damp > 0):
            raise ValueError(f"damp must be a positive number, got {self.damp!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("wanda", "sparsegpt")
