"""A small Llama-style decoder with random weights, built in (no download): the model the demo,
the tests and the model-level benchmarks quantise. Pre-norm blocks of RMSNorm, causal
self-attention with rotary position embeddings (PyTorch SDPA) and a SwiGLU MLP; the linear
layers carry the Hugging Face Llama names (q_proj ... down_proj, lm_head).

Decoding: `model(tokens, kv_cache=cache, start_pos=p)` with a `KVCache` writes the new keys and
values at positions p.. and attends over everything cached so far (prefill with p = 0, then one
token per step). `set_attention_fn(model, fn)` swaps the attention kernel (fn(q, k, v, causal)),
e.g. for leanops' fused attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TinyLlamaConfig:
    vocab_size: int = 4096
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    hidden_dim: int = 1408
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0


# "demo": large enough for the GPU to be the bottleneck and to show int4 sizes (all in/out
# features divisible by 128); "test": seconds on a CPU, with a 160-wide MLP (divisible by 32 but
# not by 128, so int4 g128 must skip down_proj with a logged reason).
PRESETS = {
    "demo": TinyLlamaConfig(),
    "test": TinyLlamaConfig(vocab_size=256, dim=128, n_layers=2, n_heads=4, hidden_dim=160, max_seq_len=128),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of every layer, preallocated: k and v are [n_layers, B, H, max_len, D].
    Positions are written before they are read, so the initial contents never matter."""

    def __init__(self, cfg: TinyLlamaConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        if max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds max_seq_len={cfg.max_seq_len}")
        shape = (cfg.n_layers, batch, cfg.n_heads, max_len, cfg.dim // cfg.n_heads)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def sdpa_attention(q, k, v, causal: bool):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class Attention(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, layer: int = 0):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.layer = layer
        self.attention_fn = sdpa_attention  # fn(q, k, v, causal) -> [B, H, S, D]
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0):
        b, s, _ = x.shape
        shape = (b, s, self.n_heads, self.head_dim)
        q = _rope(self.q_proj(x).view(shape).transpose(1, 2), cos, sin)
        k = _rope(self.k_proj(x).view(shape).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        if kv_cache is None or start_pos == 0:
            if kv_cache is not None:
                kv_cache.k[self.layer, :, :, :s] = k
                kv_cache.v[self.layer, :, :, :s] = v
            out = self.attention_fn(q, k, v, True)
        else:
            end = start_pos + s
            kv_cache.k[self.layer, :, :, start_pos:end] = k
            kv_cache.v[self.layer, :, :, start_pos:end] = v
            k, v = kv_cache.k[self.layer, :, :, :end], kv_cache.v[self.layer, :, :, :end]
            if s == 1:  # one new token sees every cached position: no mask
                out = self.attention_fn(q, k, v, False)
            else:  # query i (position start_pos + i) sees keys 0 .. start_pos + i
                mask = torch.ones(s, end, dtype=torch.bool, device=x.device).tril(start_pos)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_cache=None, start_pos=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, start_pos)
        return x + self.mlp(self.mlp_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, cfg: TinyLlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        head_dim = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(cfg.max_seq_len).float(), inv_freq)
        # Recomputed from the config, so kept out of the state_dict.
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        """tokens [B, S] int64 -> logits [B, S, vocab_size]. With `kv_cache`, the tokens are at
        positions start_pos .. start_pos + S - 1 and attend to the cached ones before them."""
        s = tokens.shape[1]
        end = start_pos + s
        limit = self.config.max_seq_len if kv_cache is None else kv_cache.max_len
        if end > limit:
            raise ValueError(f"positions up to {end} exceed the limit {limit} (max_seq_len or the cache's max_len)")
        if start_pos and kv_cache is None:
            raise ValueError("start_pos > 0 needs the kv_cache that holds the earlier positions")
        cos, sin = self.rope_cos[start_pos:end], self.rope_sin[start_pos:end]
        x = self.embed_tokens(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, start_pos)
        return self.lm_head(self.norm(x))

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        ref = self.rope_cos
        dtype = self.embed_tokens.weight.dtype
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, dtype, ref.device)


def tiny_llama(
    preset: str = "demo", seed: int = 0, dtype: torch.dtype = torch.float32, device=None
) -> TinyLlama:
    """A TinyLlama of a named preset with reproducible random weights.

    Weights are N(0, 0.02) like a freshly initialised LLM, plus a few input channels of each
    block scaled up 20x in its norms, imitating the activation outlier channels of trained LLMs
    that make per-token int8 activation quantisation hard (what SmoothQuant addresses).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    cfg = PRESETS[preset]
    gen = torch.Generator().manual_seed(seed)
    model = TinyLlama(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                outliers = torch.randperm(cfg.dim, generator=gen)[: max(1, cfg.dim // 64)]
                p[outliers] = 20.0
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.to(device=device, dtype=dtype).eval()
