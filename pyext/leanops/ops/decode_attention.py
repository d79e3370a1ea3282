"""leanops::attention_decode: attention of a few new tokens against a (paged) KV cache, split
across programs along the cache (split-KV) for inference. Scores, masks and numerics are those of
leanops.ops.attention (the new tokens are the last Sq positions of each sequence); the kernel is
leanops.triton.attention_decode. On CPU tensors (no backend forced) each sequence runs the CPU
path of leanops.ops.attention against a view of its cache (a gathered copy of its pages when
paged): memory stays O(one sequence's context), never [B, H, Sq, S_max].
"""

from __future__ import annotations

import torch

from leanops._layout import empty_like_layout
from leanops.dispatch import OpBackends
from leanops.ops._autograd import register_inference_only
from leanops.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from leanops.ops._library import register
from leanops.ops.attention import (
    INT32,
    _check_head_dim,
    _check_kv_heads,
    _check_scalars,
    _cpu_attention,
    _softcap_value,
    normalize_window,
    out_shape,
    reference_attention,
    resolve_scale,
    use_cpu_path,
)


def _check_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    op = "leanops.attention_decode"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES, dim=4)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    b, hq, sq, d = q.shape
    _check_head_dim(op, "q", d)
    _check_head_dim(op, "v_cache", v_cache.shape[3])
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise ValueError(
            f"{op}: v_cache must have k_cache's shape but for the head dim, "
            f"{tuple(k_cache.shape[:3])}, got {tuple(v_cache.shape)}"
        )
    if k_cache.shape[3] != d:
        raise ValueError(f"{op}: k_cache must have q's head dim {d}, got shape {tuple(k_cache.shape)}")
    _check_kv_heads(op, hq, k_cache.shape[1])
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
    """Sequence b of a (paged) cache as dense [1, Hkv, len, D] k and v: views of a dense cache, a
    copy of the sequence's pages (the reference, the CPU path and tests)."""
    if block_table is None:
        n = k_cache.shape[2] if cache_seqlens is None else int(cache_seqlens[b])
        return k_cache[b : b + 1, :, :n], v_cache[b : b + 1, :, :n]
    n = int(cache_seqlens[b])
    page = k_cache.shape[2]
    pages = block_table[b, : (n + page - 1) // page].long()

    def gather(c):
        return c[pages].transpose(0, 1).reshape(c.shape[1], -1, c.shape[3])[:, :n].unsqueeze(0)

    return gather(k_cache), gather(v_cache)


def _decode_with(attend, q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    """attention_decode's output from attend(q, k, v, None, scale, wl, wr, softcap) -> (o, lse)
    on each sequence and its part of the cache."""
    out = empty_like_layout(q, out_shape(q, v_cache))
    for b in range(q.shape[0]):
        k, v = gather_cache(k_cache, v_cache, cache_seqlens, block_table, b)
        o, _ = attend(q[b : b + 1], k, v, None, scale, wl, wr, softcap)
        out[b] = o[0]
    return out


def _attention_decode_reference(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr,
                                softcap):
    return _decode_with(reference_attention, q, k_cache, v_cache, cache_seqlens, block_table,
                        scale, wl, wr, softcap)


def _attention_decode_cpu(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    if cache_seqlens is None and block_table is None:  # one dense cache: the batch in one call
        out = empty_like_layout(q, out_shape(q, v_cache))
        out.copy_(_cpu_attention(q, k_cache, v_cache, None, scale, wl, wr, softcap)[0])
        return out
    return _decode_with(_cpu_attention, q, k_cache, v_cache, cache_seqlens, block_table, scale,
                        wl, wr, softcap)


_decode_backends = OpBackends(
    "attention_decode",
    reference=_attention_decode_reference,
    triton="leanops.triton.attention_decode:attention_decode",
)


def _attention_decode_impl(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    args = (q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap)
    _check_decode(*args)
    if q.numel() == 0 or k_cache.numel() == 0:
        return _attention_decode_reference(*args)
    if use_cpu_path(q):
        return _attention_decode_cpu(*args)
    return _decode_backends(*args)


register(
    "attention_decode",
    "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? cache_seqlens, Tensor? block_table, "
    "float scale, int window_left, int window_right, float softcap) -> Tensor",
    _attention_decode_impl,
)


@torch.library.register_fake("leanops::attention_decode")
def _attention_decode_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap):
    _check_decode(q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr, softcap)
    return empty_like_layout(q, out_shape(q, v_cache))


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
    """Attention of a few new tokens against a KV cache, split across programs along the cache
    (split-KV, then a reduction) with the q heads that share a kv head packed into one program:
    for inference (no backward: requesting gradients raises).

    Args:
        q: [B, Hq, Sq, D] the new tokens (Sq typically 1-16), float16, bfloat16 or float32;
            D 1 to 256. They are the last Sq positions of each sequence (bottom-right causal
            alignment).
        k_cache: dense [B, Hkv, S_max, D] or paged [num_pages, Hkv, page_size, D], q's dtype,
            any strides (flash-attention / vLLM's [num_pages, page_size, Hkv, D] is
            `.transpose(1, 2)` of the paged one, no copy); Hq a multiple of Hkv.
        v_cache: k_cache's shape but for the head dim Dv (1 to 256, may differ from D).
        cache_seqlens: int32 [B], the valid length of each sequence; default None = S_max
            (dense); required with a block_table.
        block_table: None (dense cache, default) or int32 [B, max_pages]: the page ids of each
            sequence, in order.
        causal: True (default): bottom-right causal among the new tokens; False: none.
        scale: a finite float; default None = 1/sqrt(D).
        window: None (default) or (left, right) as in `leanops.attention`.
        softcap: None (default) or > 0, as in `leanops.attention`.

    Returns:
        out [B, Hq, Sq, Dv] in q's dtype and layout.

    Raises:
        ValueError: a shape, dtype, device or argument outside the above, naming it.
        NotImplementedError: an input requires grad.

    Values are not checked (that would synchronise with the GPU): cache_seqlens[b] must be at
    most S_max (dense) or the pages block_table[b] holds, and page ids must be valid.
    """
    wl, wr = normalize_window(causal, window)
    scale = resolve_scale("leanops.attention_decode", scale, q)
    return torch.ops.leanops.attention_decode.default(
        q, k_cache, v_cache, cache_seqlens, block_table, scale, wl, wr,
        _softcap_value(softcap),
    )
