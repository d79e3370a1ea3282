"""Small built-in models with random weights (no download) for the demo, tests and benchmarks."""

from leanops.models.llama import PRESETS, TinyLlama, TinyLlamaConfig, tiny_llama

__all__ = ["PRESETS", "TinyLlama", "TinyLlamaConfig", "tiny_llama"]
