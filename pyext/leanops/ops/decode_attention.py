"""leanops::attention_decode: attention of a few new tokens against a (paged) KV cache, split
across programs along the cache (split-KV) for inference. Scores, masks and numerics are those of
leanops.ops.attention (the new tokens are the last Sq positions of each sequence); the kernel is
leanops.triton.attention_decode.
"""

from __future__ import annotations

import torch

from leanops.dispatch import OpBackends
from leanops.ops._autograd import register_inference_only
from leanops.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from leanops.ops._library import register
from leanops.ops.attention import (
    INT32,
    _check_head_dim,
    _check_scalars,
    _softcap_value,
    default_scale,
    normalize_window,
    reference_attention,
)


def _check_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    op = "leanops.attention_decode"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, dim=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    b, hq, sq, d = q.shape
    _check_head_dim(op, d)
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(
            f"{op}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
        )
    hkv = k_cache.shape[1]
    if k_cache.shape[3] != d:
        raise ValueError(f"{op}: k_cache must have q's head dim {d}, got shape {tuple(k_cache.shape)}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: the number of heads of q ({hq}) must be a multiple of that of k_cache ({hkv})"
        )
    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(
                f"{op}: k_cache must be [B, Hkv, S, D] with q's batch {b} (or pages with a "
                f"block_table), got shape {tuple(k_cache.shape)}"
            )
    else:
        check_tensor(op, "block_table", block_table, dtypes=INT32, dim=2)
        if block_table.shape[0] != b:
            raise ValueError(
                f"{op}: block_table must be [B, max_pages] with q's batch {b}, got "
                f"{tuple(block_table.shape)}"
            )
        if cache_seqlens is None:
            raise ValueError(f"{op}: cache_seqlens is required with a block_table")
    if cache_seqlens is not None:
        check_tensor(op, "cache_seqlens", cache_seqlens, dtypes=INT32, shape=(b,))
    _check_scalars(op, scale, wl, wr, softcap)
    check_same_device(op, q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                      block_table=block_table)


def gather_cache(k_cache, v_cache, cache_seqlens, block_table, b):
    """Sequence b of a (paged) cache as dense [1, Hkv, len, D] k and v (reference and tests)."""
    if block_table is None:
        n = k_cache.shape[2] if cache_seqlens is None else int(cache_seqlens[b])
        return k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
    n = int(cache_seqlens[b])
    page = k_cache.shape[2]
    pages = block_table[b, : (n + page - 1) // page].long()

    def gather(c):
        return c[pages].transpose(0, 1).reshape(c.shape[1], -1, c.shape[3])[:, :n].unsqueeze(0)

    return gather(k_cache), gather(v_cache)


def _attention_decode_reference(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr,
                                softcap):
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        k, v = gather_cache(k_cache, v_cache, cache_seqlens, block_table, b)
        o, _ = reference_attention(q[b : b + 1], k, v, None, scale, wl, wr, softcap)
        out[b] = o[0]
    return out


_decode_backends = OpBackends(
    "attention_decode",
    reference=_attention_decode_reference,
    triton="leanops.triton.attention_decode:attention_decode",
)


def _attention_decode_impl(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    _check_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap)
    if q.numel() == 0 or k_cache.numel() == 0:
        return _attention_decode_reference(q, k_cache, v_cache, cache_seqlens, block_table, scale,
                                           wl, wr, softcap)
    return _decode_backends(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap)


register(
    "attention_decode",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? cache_seqlens, Tensor? block_table, "
    "float scale, int window_left, int window_right, float softcap) -> Tensor",
    _attention_decode_impl,
)


@torch.library.register_fake("leanops::attention_decode")
def _attention_decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    _check_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap)
    return torch.empty_like(q)


register_inference_only("attention_decode")


def attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of a few new tokens against a KV cache, for inference (no backward: asking for
    gradients raises). The cache is split across programs (split-KV, then a reduction) and the
    q heads that share a kv head are packed into one program.

    Arguments:
        q: [B, Hq, Sq, D] float16, bfloat16 or float32, Sq typically 1-16: the new tokens, which
            are the last Sq positions of each sequence (bottom-right alignment).
        k_cache, v_cache: q's dtype, any strides. Dense: [B, Hkv, S_max, D]. Paged:
            [num_pages, Hkv, page_size, D] (flash-attention / vLLM's [num_pages, page_size,
            Hkv, D] is `.transpose(1, 2)` of it, no copy).
        cache_seqlens: None (dense: every sequence is S_max long) or int32 [B], the valid
            length of each sequence including the new tokens; required when paged.
        block_table: None (dense) or int32 [B, max_pages]: the page ids of each sequence, in
            order (any page size).
        causal: default True here (the new tokens attend to the cache and to each other
            causally).
        scale, window, softcap: as in `leanops.attention`.

    Returns: [B, Hq, Sq, D] in q's dtype.

    Raises: ValueError naming the argument for a wrong shape, dtype or device. Values are not
    checked (that would synchronise with the GPU): cache_seqlens[b] must be at most S_max
    (dense) or what the pages of block_table[b] hold, and page ids must be valid.
    """
    wl, wr = normalize_window(causal, window)
    if scale is None:
        scale = default_scale(q.shape[-1])
    return torch.ops.leanops.attention_decode.default(
        q, k_cache, v_cache, cache_seqlens, block_table, float(scale), wl, wr,
        _softcap_value(softcap),
    )
