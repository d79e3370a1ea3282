"""Training with cheaper matmuls: Int8TrainingLinear (SwitchBack int8 forward and grad-input
matmuls, 16-bit master weights), made by leanops.quantize_(model, leanops.Int8TrainingConfig())."""

from leanops.training.linear import Int8TrainingLinear

__all__ = ["Int8TrainingLinear"]
