"""Small built-in models with random weights (no download) for the demo, tests and benchmarks:
a Llama-style decoder (`tiny_llama`) and a MiniLM-sized BERT-style encoder (`mini_encoder`)."""

from leanops.models.encoder import MiniEncoder, MiniEncoderConfig, mini_encoder
from leanops.models.llama import (
    PRESETS,
    KVCache,
    TinyLlama,
    TinyLlamaConfig,
    sdpa_attention,
    tiny_llama,
)


def set_attention_fn(model, fn) -> None:
    """Make every attention layer of a built-in model call `fn(q, k, v, causal)` ([B, H, S, D]
    tensors) instead of F.scaled_dot_product_attention (masked calls keep SDPA)."""
    for module in model.modules():
        if hasattr(module, "attention_fn"):
            module.attention_fn = fn


__all__ = [
    "PRESETS",
    "KVCache",
    "MiniEncoder",
    "MiniEncoderConfig",
    "TinyLlama",
    "TinyLlamaConfig",
    "mini_encoder",
    "sdpa_attention",
    "set_attention_fn",
    "tiny_llama",
]
