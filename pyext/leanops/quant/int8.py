"""int8 formats: RTN per-channel weights, dynamic per-token activations, and the per-block Q
and K of leanops.attention_int8.

Both are symmetric with codes in [-127, 127] (not -128, so negation is exact and the grid is
symmetric about zero), scale = amax / 127 in fp32, q = round-half-to-even(x / scale) with an IEEE
division: the Triton and CUDA kernels reproduce this bit for bit.
"""

from __future__ import annotations

import torch

from leanops.quant.common import (
    ValueChecks,
    check_float_matrix,
    div_exact,
    require_positive_finite,
    safe_scale,
    value_checks,
)

INT8_QMAX = 127
# Per-token scales are clamped to the smallest normal fp32 so an all-zero row (scale 0) divides
# cleanly; the kernels use the same constant.
FP32_TINY = torch.finfo(torch.float32).tiny


def int8_channel_scale(w32: torch.Tensor) -> torch.Tensor:
    """The RTN scale of each row of w32 [N, K] (fp32): safe(amax|w[n]| / 127), fp32 [N].

    Unchecked core shared by quantize_int8_per_channel and QAT (leanops.qat): no value checks, so
    it never synchronises with the GPU and traces under torch.compile."""
    return safe_scale(div_exact(w32.abs().amax(dim=1), INT8_QMAX), torch.float32)


def int8_codes(w32: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 codes of w32 [N, K] (fp32) for the fp32 row scales [N], as fp32 integers:
    clamp(round-half-to-even(w / scale), -127, 127). Unchecked core (see int8_channel_scale)."""
    return torch.round(w32 / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX)


def quantize_int8_per_channel(
    w: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN: w [N, K] float -> (q int8 [N, K], scale fp32 [N]) with w ~= q * scale[:, None].

    `scale` [N], if given, is used as is instead of amax / 127 (a scale learnt by QAT); it must
    be positive and finite (leanops.quant.common.safe_scale makes one so)."""
    check_float_matrix(w, "weight")
    w32 = w.detach().float()
    if scale is None:
        scale = int8_channel_scale(w32)
    else:
        _check_given_scale(scale, (w.shape[0],), w.device)
        scale = scale.detach().float()
    return int8_codes(w32, scale).to(torch.int8), scale


def _check_given_scale(scale, shape, device) -> None:
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != tuple(shape):
        got = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale must be a tensor of shape {tuple(shape)}, got {got}")
    if scale.device != device:
        raise ValueError(f"scale must be on the weight's device {device}, got {scale.device}")
    with value_checks(None) as checks:
        require_positive_finite(checks, scale, "scale")


def check_int8_per_channel(
    q: torch.Tensor,
    scale: torch.Tensor,
    *,
    names: tuple[str, str] = ("q", "scale"),
    checks: ValueChecks | None = None,
) -> None:
    """Check that (q, scale) is a valid per-channel int8 weight, as stored (a file, a state_dict).

    q: int8 [N, K]; every byte is a usable code (leanops writes [-127, 127]).
    scale: float32 [N], positive and finite.
    names: how the two tensors are named in errors (e.g. "layers.0.q_proj.weight").
    checks: a leanops.quant.common.ValueChecks to add the value checks to (the caller runs it);
        None: they run here.
    Raises TypeError / ValueError naming the tensor and what is allowed.
    """
    qname, sname = names
    for t, name in ((q, qname), (scale, sname)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"{qname} must be int8 [N, K], got {q.dtype} {tuple(q.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (q.shape[0],):
        raise ValueError(
            f"{sname} must be float32 of shape ({q.shape[0]},) (one scale per row of {qname}), "
            f"got {scale.dtype} {tuple(scale.shape)}"
        )
    with value_checks(checks) as checks:
        require_positive_finite(checks, scale, sname)


def dequantize_int8_per_channel(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """q int8 [N, K], scale [N] -> float [N, K] in `dtype` (computed in fp32, rounded once)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_per_token_int8(
    x: torch.Tensor, smooth: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row (per-token) quantisation, the reference for leanops::quantize_per_token_int8.

    x [M, K] float, smooth [K] or None -> (q int8 [M, K], scale fp32 [M]) with
    x * smooth ~= q * scale[:, None]. `smooth` is the SmoothQuant factor 1/s multiplied into the
    activations before quantising (the weights were multiplied by s). A row holding NaN or Inf
    gets scale NaN (and zero codes) so the matmul output row is NaN, as it would be in dense math.
    """
    xs = x.float()
    if smooth is not None:
        xs = xs * smooth.float()
    amax = xs.abs().amax(dim=-1)
    nonfinite = ~torch.isfinite(amax)
    scale = torch.clamp(div_exact(amax, INT8_QMAX), min=FP32_TINY)
    q = torch.round(xs / scale[:, None]).clamp_(-INT8_QMAX, INT8_QMAX)
    q = torch.where(nonfinite[:, None], 0.0, q).to(torch.int8)
    scale = torch.where(nonfinite, torch.nan, scale)
    return q, scale


# ---------------------------------------------------------------------------------------------
# attention_int8's Q and K (SageAttention-style)
#
# K is smoothed by subtracting its mean over the sequence (per batch, kv head and channel:
# softmax is invariant to adding q.c to every score of a row, and removing the shared component
# leaves the int8 grid for what differs between keys); then q and the smoothed k are quantised
# symmetrically to int8 per block of QK_BLOCK rows of each (batch, head), over the whole block:
# scale = max(amax / 127, FP32_TINY) (IEEE division), code = round-half-even(x / scale). The
# product of int8 codes accumulates exactly in int32; scores = acc * q_scale * k_scale * scale.
# The Triton kernel (leanops.triton.attention_kernels.quantize_blocks_kernel) is bit-exact.

QK_BLOCK = 64


def quantize_qk(
    q: torch.Tensor, k: torch.Tensor, smooth_k: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q_int8 [B, Hq, Sq, D], q_scale fp32 [B, Hq, ceil(Sq/QK_BLOCK)], k_int8 [B, Hkv, Sk, D],
    k_scale fp32 [B, Hkv, ceil(Sk/QK_BLOCK)]) of dense q, k; k smoothed first if smooth_k."""
    if smooth_k:
        k = k.float() - k.float().mean(dim=2, keepdim=True)

    def per_block(x):
        b, h, s, d = x.shape
        nb = (s + QK_BLOCK - 1) // QK_BLOCK
        xf = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * QK_BLOCK - s))
        blocks = xf.view(b, h, nb, QK_BLOCK * d)
        amax = blocks.abs().amax(-1)
        scale = div_exact(amax, INT8_QMAX).clamp_min(FP32_TINY)
        codes = torch.round(blocks / scale[..., None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
        return codes.view(b, h, nb * QK_BLOCK, d)[:, :, :s], scale.contiguous()

    qc, qs = per_block(q)
    kc, ks = per_block(k)
    return qc.contiguous(), qs, kc.contiguous(), ks


def dequantize_qk(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 [B, H, S, D] of int8 codes [B, H, S, D] and their block scales [B, H, ceil(S/QK_BLOCK)]
    (one half of quantize_qk's output)."""
    return codes.float() * scale.repeat_interleave(QK_BLOCK, dim=2)[:, :, : codes.shape[2], None]
