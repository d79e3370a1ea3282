"""Hugging Face transformers: leanops attention as an attention implementation.

    import leanops
    leanops.integrations.register_transformers()       # automatic if transformers was imported first
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="leanops")
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="leanops_int8")

"leanops" runs leanops.attention, "leanops_int8" leanops.attention_int8 (int8 Q.K^T forward and
int8 dV/dQ/dK backward: it trains). Registers `leanops_attention_forward` and
`leanops_int8_attention_forward` with transformers.AttentionInterface and, for the masks,
transformers' own SDPA mask builder with AttentionMaskInterface (boolean [B, 1, Sq, Sk] masks, or
None when the mask is purely causal), so a model builds exactly the masks it builds for "sdpa".
transformers is not a leanops dependency: without it, registration returns False.

What the attention function does with the call transformers makes:
- query [B, Hq, Sq, D], key [B, Hkv, Sk, D], value [B, Hkv, Sk, Dv]: GQA runs natively (no
  repeat_kv); Dv may differ from D (DeepSeek-V3's multi-head latent attention, 192/128);
- mask None: causal kernel when the module is causal and Sq > 1 (as the SDPA integration, with
  keys past Sq cropped when Sk > Sq: that only happens for a prefill into an empty static cache,
  where SDPA's top-left causal alignment is what makes those keys invisible); a 4-D mask runs
  the kernel's bias path (padding, sliding windows, chunked prefill);
- scaling and softcap (Gemma 2's attn_logit_softcapping) go to the kernel;
- dropout > 0 in training, position_bias (T5-style), or output_attentions fall back to
  transformers' SDPA implementation with a one-time warning.
Returns (attn_output [B, Sq, Hq, Dv], None) like every transformers attention function.
"""

from __future__ import annotations

import warnings

import torch

from leanops.ops.attention import attention
from leanops.ops.int8_attention import attention_int8

NAME = "leanops"
INT8_SUFFIX = "_int8"
_warned: set[str] = set()


def _fallback(reason, module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"leanops attention for transformers runs SDPA instead: {reason}",
                      RuntimeWarning, stacklevel=3)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _forward(op, module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap,
             **kwargs):
    reason = None
    if dropout > 0 and module.training:
        reason = "attention dropout in training"
    elif kwargs.get("position_bias") is not None:
        reason = "position_bias (T5-style relative attention bias)"
    elif kwargs.get("output_attentions", False):
        reason = "output_attentions=True"
    if reason is not None:
        if softcap is not None:
            raise ValueError(f"leanops attention cannot run {reason} with softcap")
        return _fallback(reason, module, query, key, value, attention_mask, dropout=dropout,
                         scaling=scaling, is_causal=is_causal, **kwargs)

    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != kv_len:
        mask = mask[..., :kv_len]
    causal = bool(is_causal) and mask is None and q_len > 1
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = op(query, key, value, attn_mask=mask, causal=causal, scale=scaling, softcap=softcap)
    return out.transpose(1, 2).contiguous(), None


def leanops_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for attn_implementation="leanops" (module docstring)."""
    return _forward(attention, module, query, key, value, attention_mask, dropout, scaling,
                    is_causal, softcap, **kwargs)


def leanops_int8_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention function for attn_implementation="leanops_int8": as
    leanops_attention_forward, with leanops.attention_int8 (int8 Q K^T forward, int8 dV/dQ/dK
    backward: it trains).

    Arguments:
        module: the calling attention layer (its `is_causal` and `training` are read).
        query: [B, Hq, Sq, D]; key: [B, Hkv, Sk, D]; value: [B, Hkv, Sk, Dv] (float16, bfloat16
            or float32).
        attention_mask: None, or the 4-D boolean/additive mask of transformers' SDPA mask
            builder (padding, sliding windows): the kernels' bias path.
        dropout: must be 0 in training (else SDPA runs, with a one-time warning); default 0.
        scaling: the score scale; default 1 / sqrt(D).
        is_causal: default the module's `is_causal` (True if it has none).
        softcap: None, or > 0 (Gemma 2's attn_logit_softcapping).
        kwargs: position_bias or output_attentions=True make SDPA run instead (one warning).

    Returns: (attn_output [B, Sq, Hq, Dv], None).

    Raises: ValueError for a fallback reason combined with softcap, or bad tensors (as the op).
    """
    return _forward(attention_int8, module, query, key, value, attention_mask, dropout, scaling,
                    is_causal, softcap, **kwargs)


def register_transformers(name: str = NAME) -> bool:
    """Register leanops attention with transformers under `name` and the int8 variant
    (leanops.attention_int8) under `name + "_int8"` (idempotent). Returns False, registering
    nothing, when transformers (>= 4.48, which has AttentionInterface) is missing."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    names = {name: leanops_attention_forward, name + INT8_SUFFIX: leanops_int8_attention_forward}
    for n, fn in names.items():
        AttentionInterface.register(n, fn)
    try:  # transformers >= 4.53 builds masks per attention implementation
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return True
    for n in names:
        AttentionMaskInterface.register(n, sdpa_mask)
    return True
