"""leanops.nn.MultiheadAttention: torch.nn.MultiheadAttention with leanops' fused attention.

A subclass, so the constructor, the parameters (in_proj_weight or q/k/v_proj_weight,
in_proj_bias, out_proj, bias_k/bias_v), the state_dict and isinstance checks are exactly
torch's; only forward changes. The projections run as in torch; the attention itself runs
`leanops.attention` (Triton flash-attention kernels on GPUs, PyTorch's CPU flash-attention
kernels on CPU: see leanops.ops.attention), with
`attn_mask` / `key_padding_mask` merged into one additive bias and `is_causal` (with Sq == Sk and no
padding mask) turned into the kernel's causal mode, as torch does with the hint.

Calls the fused kernel cannot serve run torch's own forward (the exact math), with a one-time
warning naming the argument, never silently:
  need_weights=True (torch's default: the fused kernel never forms the weights; pass
  need_weights=False), add_bias_kv / add_zero_attn, dropout > 0 in training, nested tensors,
  non-float dtypes, head dims above 256.
A query row whose keys are all masked returns 0 here where torch returns NaN.

`int8=True` runs `leanops.attention_int8` instead (int8 Q.K^T forward, int8 dV/dQ/dK backward:
see leanops.ops.int8_attention), for inference and training alike; the masks and fallbacks are
the same.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from leanops.ops.attention import MAX_HEAD_DIM, attention
from leanops.ops.int8_attention import attention_int8
from leanops.quant.common import FLOAT_DTYPES


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in torch.nn.MultiheadAttention (same constructor, forward and state_dict) whose
    attention runs leanops' fused kernel; see the module docstring for what falls back.

    The arguments are torch's (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn,
    kdim, vdim, batch_first, device, dtype), plus:
    int8: keyword only, default False; True runs leanops.attention_int8 (int8 Q.K^T, trainable).
    """

    _warned: set[str] = set()

    def __init__(self, *args, int8: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.int8 = bool(int8)

    def extra_repr(self) -> str:
        return "int8=True" if self.int8 else ""

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, int8: bool = False) -> MultiheadAttention:
        """A leanops MultiheadAttention with mha's configuration and (shared) parameters.

        mha: the torch.nn.MultiheadAttention to copy (its parameters are shared, not copied).
        int8: run leanops.attention_int8 (default False: leanops.attention).
        Returns the new module, in mha's training mode.
        """
        p = next(mha.parameters())
        new = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout,
            bias=mha.in_proj_bias is not None, add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn, kdim=mha.kdim, vdim=mha.vdim,
            batch_first=mha.batch_first, device="meta", dtype=p.dtype, int8=int8,
        )
        new.load_state_dict(mha.state_dict(), assign=True)
        new.train(mha.training)
        return new

    def _fallback_reason(self, query, key, value, need_weights, attn_mask, key_padding_mask):
        if need_weights:
            return ("need_weights=True (torch's default) asks for the attention weights, which "
                    "the fused kernel never forms; pass need_weights=False")
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv / add_zero_attn are not supported by the fused path"
        if self.training and self.dropout > 0:
            return "dropout > 0 in training is not supported by the fused path"
        if query.is_nested or key.is_nested or value.is_nested:
            return "nested tensors are not supported by the fused path"
        if query.dtype not in FLOAT_DTYPES:
            return f"dtype {query.dtype} is not supported by the fused path"
        if self.head_dim > MAX_HEAD_DIM:
            return f"head dim {self.head_dim} > {MAX_HEAD_DIM} is not supported by the fused path"
        return None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        reason = self._fallback_reason(query, key, value, need_weights, attn_mask,
                                       key_padding_mask)
        if reason is not None and reason not in MultiheadAttention._warned:
            MultiheadAttention._warned.add(reason)
            warnings.warn(f"leanops.nn.MultiheadAttention runs torch's attention: {reason}",
                          RuntimeWarning, stacklevel=2)
        # is_causal without attn_mask: torch's forward raises its own error
        if reason is not None or (is_causal and attn_mask is None) or query.dim() not in (2, 3):
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._fused_forward(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _fused_forward(self, query, key, value, key_padding_mask, attn_mask, is_causal):
        batched = query.dim() == 3
        if not batched:  # [L, E] -> [1, L, E]
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # [L, B, E] -> [B, L, E] (views)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, lq, e = query.shape
        lk = key.shape[1]
        h, d = self.num_heads, self.head_dim
        if key.shape[0] != b or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"leanops.nn.MultiheadAttention: key and value must have query's batch size {b} "
                f"and one length; got key {tuple(key.shape)}, value {tuple(value.shape)}"
            )

        w, bias = self.in_proj_weight, self.in_proj_bias
        if self._qkv_same_embed_dim and query is key and key is value:
            # self-attention: one GEMM for q, k, v; the heads are strided views of its output
            qkv = F.linear(query, w, bias).view(b, lq, 3, h, d)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        else:
            if self._qkv_same_embed_dim:
                wq, wk, wv = w.chunk(3)
            else:
                wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
            bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
            q = F.linear(query, wq, bq).view(b, lq, h, d).transpose(1, 2)
            k = F.linear(key, wk, bk).view(b, lk, h, d).transpose(1, 2)
            v = F.linear(value, wv, bv).view(b, lk, h, d).transpose(1, 2)

        causal = bool(is_causal) and key_padding_mask is None and lq == lk
        mask = None if causal else _merge_masks(attn_mask, key_padding_mask, b, h, lq, lk, q.dtype)
        op = attention_int8 if self.int8 else attention
        out = op(q, k, v, attn_mask=mask, causal=causal)  # [B, H, Lq, D]
        out = out.transpose(1, 2).reshape(b, lq, e)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            return out.squeeze(0)
        return out if self.batch_first else out.transpose(0, 1)


def _as_additive(mask, dtype, name):
    """torch.nn.MultiheadAttention's mask convention: bool True = NOT allowed; float = added."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(
            f"leanops.nn.MultiheadAttention: {name} must be bool or float, got {mask.dtype}"
        )
    return mask.to(dtype)


def _merge_masks(attn_mask, key_padding_mask, b, h, lq, lk, dtype):
    """attn_mask ([Lq, Lk] or [B*H, Lq, Lk]) and key_padding_mask ([B, Lk]) as one additive
    bias broadcastable to [B, H, Lq, Lk], or None."""
    bias = None
    if attn_mask is not None:
        m = _as_additive(attn_mask, dtype, "attn_mask")
        if m.dim() == 2 and tuple(m.shape) == (lq, lk):
            bias = m.view(1, 1, lq, lk)
        elif m.dim() == 3 and tuple(m.shape) == (b * h, lq, lk):
            bias = m.view(b, h, lq, lk)
        else:
            raise ValueError(
                f"leanops.nn.MultiheadAttention: attn_mask must be [L, S] = {(lq, lk)} or "
                f"[N * num_heads, L, S] = {(b * h, lq, lk)}, got {tuple(attn_mask.shape)}"
            )
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, lk):
            raise ValueError(
                f"leanops.nn.MultiheadAttention: key_padding_mask must be [N, S] = {(b, lk)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        kpm = _as_additive(key_padding_mask, dtype, "key_padding_mask").view(b, 1, 1, lk)
        bias = kpm if bias is None else bias + kpm
    return bias
