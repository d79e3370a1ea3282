"""A MiniLM-sized BERT-style encoder with random weights, built in (no download): the encoder of
the model-level benchmarks (sentence embeddings, rerankers and classifiers are this shape).

Default preset "minilm" has the shape of all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads of 32,
MLP 1536, vocabulary 30522, 512 positions. Post-LN blocks as in BERT
(x = LN(x + attn(x)); x = LN(x + MLP(x)), GELU MLP, biases everywhere), word + position +
token-type embeddings with a LayerNorm, bidirectional self-attention through PyTorch SDPA (an
optional key padding mask). The output is the last hidden state [B, S, hidden].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from leanops.models.llama import sdpa_attention


@dataclass(frozen=True)
class MiniEncoderConfig:
    vocab_size: int = 30522
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    hidden_dim: int = 1536
    max_seq_len: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12


# "minilm": all-MiniLM-L6-v2's shape (every in_features divisible by 128, so int4 g128 applies
# to all linears); "test": seconds on a CPU.
PRESETS = {
    "minilm": MiniEncoderConfig(),
    "test": MiniEncoderConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, hidden_dim=256, max_seq_len=128),
}


class EncoderAttention(nn.Module):
    def __init__(self, cfg: MiniEncoderConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.attention_fn = sdpa_attention  # fn(q, k, v, causal) -> [B, H, S, D]
        self.query = nn.Linear(cfg.dim, cfg.dim)
        self.key = nn.Linear(cfg.dim, cfg.dim)
        self.value = nn.Linear(cfg.dim, cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, key_mask=None):
        b, s, _ = x.shape
        q, k, v = (proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))
        if key_mask is None:
            out = self.attention_fn(q, k, v, False)
        else:  # [B, S] True = a real token: every query may attend to it
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.out(out.transpose(1, 2).reshape(b, s, -1))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: MiniEncoderConfig):
        super().__init__()
        self.attn = EncoderAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.intermediate = nn.Linear(cfg.dim, cfg.hidden_dim)
        self.output = nn.Linear(cfg.hidden_dim, cfg.dim)
        self.mlp_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)

    def forward(self, x, key_mask=None):
        x = self.attn_norm(x + self.attn(x, key_mask))
        return self.mlp_norm(x + self.output(F.gelu(self.intermediate(x))))


class MiniEncoder(nn.Module):
    def __init__(self, cfg: MiniEncoderConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.position_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layers))

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] int64 (attention_mask [B, S], 1 = token, 0 = padding) -> [B, S, dim]."""
        s = tokens.shape[1]
        if s > self.config.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds max_seq_len={self.config.max_seq_len}")
        pos = torch.arange(s, device=tokens.device)
        types = torch.zeros_like(tokens) if token_type_ids is None else token_type_ids
        x = self.word_embeddings(tokens) + self.position_embeddings(pos)[None] + self.token_type_embeddings(types)
        x = self.embed_norm(x)
        key_mask = None if attention_mask is None else attention_mask.bool()
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


def mini_encoder(preset: str = "minilm", seed: int = 0, dtype: torch.dtype = torch.float32,
                 device=None) -> MiniEncoder:
    """A MiniEncoder of a named preset with reproducible random weights: N(0, 0.02) weights and
    embeddings, small random biases, and (as in tiny_llama) a few channels of every LayerNorm
    scaled up 20x, imitating the activation outlier channels of trained transformers."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = PRESETS[preset]
    gen = torch.Generator().manual_seed(seed)
    model = MiniEncoder(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
                outliers = torch.randperm(cfg.dim, generator=gen)[: max(1, cfg.dim // 64)]
                p[outliers] = 20.0
            elif "norm" in name:  # LayerNorm bias
                p.zero_()
            else:  # linear weights and biases, embeddings
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval()
