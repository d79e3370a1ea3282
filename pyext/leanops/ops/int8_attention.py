"""leanops::attention_int8: attention with Q K^T in int8 (SageAttention-style: per-block scales,
K smoothed by its mean) and P V in q's 16-bit dtype, for inference. The format is
leanops.quant.int8's (`quantize_qk`); scores, masks and numerics otherwise those of
leanops.ops.attention, whose reference runs on the dequantised Q and K.
"""

from __future__ import annotations

import torch

from leanops._layout import empty_like_layout
from leanops.dispatch import OpBackends
from leanops.ops._autograd import register_inference_only
from leanops.ops._checks import check_same_device
from leanops.ops._library import register
from leanops.ops.attention import (
    _check_qkv,
    _check_scalars,
    _empty_problem,
    _softcap_value,
    normalize_window,
    out_shape,
    reference_attention,
    resolve_scale,
    sdpa_inputs,
    sdpa_output,
)
from leanops.quant import int8 as int8_format


def _check_int8(q, k, v, scale, wl, wr, softcap):
    op = "leanops.attention_int8"
    _check_qkv(op, q, k, v, varlen=False)
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"{op}: q must have dtype float16, bfloat16 (P.V runs in it); got {q.dtype}")
    _check_scalars(op, scale, wl, wr, softcap)
    check_same_device(op, q=q, k=k, v=v)


def _attention_int8_reference(q, k, v, scale, wl, wr, softcap, smooth_k):
    qc, qs, kc, ks = int8_format.quantize_qk(q, k, smooth_k)
    qd, kd = int8_format.dequantize_qk(qc, qs), int8_format.dequantize_qk(kc, ks)
    out, _ = reference_attention(qd, kd, v, None, scale, wl, wr, softcap)
    return out.to(q.dtype)


_int8_backends = OpBackends(
    "attention_int8",
    reference=_attention_int8_reference,
    triton="leanops.triton.attention:attention_int8",
)


def _attention_int8_impl(q, k, v, scale, wl, wr, softcap, smooth_k):
    _check_int8(q, k, v, scale, wl, wr, softcap)
    if _empty_problem(q, k):
        return _attention_int8_reference(q, k, v, scale, wl, wr, softcap, smooth_k)
    return _int8_backends(q, k, v, scale, wl, wr, softcap, smooth_k)


register(
    "attention_int8",
    "(Tensor q, Tensor k, Tensor v, float scale, int window_left, int window_right, "
    "float softcap, bool smooth_k) -> Tensor",
    _attention_int8_impl,
)


@torch.library.register_fake("leanops::attention_int8")
def _attention_int8_fake(q, k, v, scale, wl, wr, softcap, smooth_k):
    _check_int8(q, k, v, scale, wl, wr, softcap)
    return empty_like_layout(q, out_shape(q, v))


register_inference_only("attention_int8")


def attention_int8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    smooth_k: bool = True,
) -> torch.Tensor:
    """Attention with Q.K^T in int8 (per-block scales, K smoothed by its mean) and P.V in q's
    16-bit dtype, as SageAttention: for inference (no backward: requesting gradients raises).
    See leanops.quant.int8.quantize_qk for the format; the error against fp32 attention is
    measured in tests/test_attention*.py.

    Args:
        q, k, v: as in `leanops.attention` (its layouts, GQA and Dv != D), float16 or bfloat16.
        causal, scale, window, softcap: as in `leanops.attention` (defaults False, None =
            1/sqrt(D), None, None).
        smooth_k: True (default): subtract K's mean over the sequence before quantising it
            (softmax-invariant; keeps a shared key offset out of the int8 grid); False: don't.

    Returns:
        out [*, Hq, Sq, Dv] in q's dtype.

    Raises:
        ValueError: a shape, dtype or argument outside the above, naming it.
        NotImplementedError: an input requires grad.
    """
    q, k, v, batch, dims = sdpa_inputs("leanops.attention_int8", q, k, v)
    wl, wr = normalize_window(causal, window)
    scale = resolve_scale("leanops.attention_int8", scale, q)
    out = torch.ops.leanops.attention_int8.default(
        q, k, v, scale, wl, wr, _softcap_value(softcap), bool(smooth_k)
    )
    return sdpa_output(out, batch, dims)
