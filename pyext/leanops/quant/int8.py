"""int8 formats: RTN per-channel weights, dynamic per-token activations, and the operands of
leanops.attention_int8 (per-block Q, K and dO; per-row tiles of P and dS in its backward).

All are symmetric with codes in [-127, 127] (not -128, so negation is exact and the grid is
symmetric about zero), scale = amax / 127 in fp32, q = round-half-to-even(x / scale) with an IEEE
division: the Triton and CUDA kernels reproduce this bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from leanops._layout import varlen_seq
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
# attention_int8: the int8 operands of its forward and backward
#
# Q and K (SageAttention-style, plus a per-channel balance). Per (sequence, kv head, channel c):
#   - K is smoothed by subtracting its mean over the sequence (if smooth_k): softmax is invariant
#     to adding q.c to every score of a row, and removing the shared component leaves the int8
#     grid for what differs between keys;
#   - Q and the smoothed K are balanced: q_c / b_c and k_c * b_c with b_c the power of two
#     nearest sqrt(amax|q_c| / amax|k_c|) (amax over the sequence and, for q, the kv head's GQA
#     group). Every score q.k is unchanged, and exactly so: a power of two multiplies without
#     rounding. An outlier channel of Q (or K) alone otherwise sets the block scale and leaves
#     the ordinary channels a handful of codes: with 4 channels of Q and 4 of K x50 the int8
#     gradients were off by >100% without it, ~12% with it (bench/NOTES.md, "int8 attention");
#   - then each is quantised symmetrically to int8 per block of QK_BLOCK rows of each (sequence,
#     head), over the whole block: scale = max(amax / 127, FP32_TINY) (IEEE division),
#     code = round-half-even(x / scale). Products of codes accumulate exactly in int32;
#     scores = acc * q_scale * k_scale * softmax scale.
# dO (for dV = P^T dO) is quantised the same way without smoothing or balance (`quantize_blocks`).
# Dense layouts [B, H, S, D] have scales [B, H, ceil(S / QK_BLOCK)]; varlen [T, H, D] ones
# [H, T // QK_BLOCK + B], block j of sequence b in slot cu_seqlens[b] // QK_BLOCK + b + j
# (`block_slot`: disjoint for consecutive sequences, since floor(c / n) + ceil(l / n) <=
# floor((c + l) / n) + 1, and computable by a kernel from cu_seqlens without a prefix sum).
#
# P and dS (the backward's on-the-fly operands, `fake_quantize_row_tiles`): one scale per row per
# QK_BLOCK consecutive entries of the reduction axis (keys for dQ = dS K, queries for
# dV = P^T dO and dK = dS^T Q, counted from each sequence's first row), the finest a single int8
# MMA tile allows: the scale may vary along the output's rows, not along the reduced axis.
# The Triton kernels (leanops.triton.attention_kernels: quantize_blocks_kernel bit-exact, the
# backward's row tiles up to fp32 rounding of P and dS) follow these definitions.

QK_BLOCK = 64


class QKCodes(NamedTuple):
    """attention_int8's quantised Q and K (see the comment above)."""

    q_codes: torch.Tensor  # int8, q's shape
    q_scale: torch.Tensor  # fp32 [B, Hq, ceil(Sq / QK_BLOCK)] (dense) or [Hq, Tq // QK_BLOCK + B]
    k_codes: torch.Tensor  # int8, k's shape
    k_scale: torch.Tensor  # fp32, as q_scale for k
    k_mean: torch.Tensor | None  # fp32 [B, Hkv, D] (None without smoothing)
    balance: torch.Tensor  # fp32 [B, Hkv, D], powers of two: q / balance, (k - mean) * balance


def block_slot(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The first scale slot of each sequence of a varlen batch (see above).

    cu_seqlens: int32 [B + 1], starting at 0.
    Returns int64 [B]: cu_seqlens[b] // QK_BLOCK + b.
    """
    cu = cu_seqlens.long()
    return cu[:-1] // QK_BLOCK + torch.arange(cu.shape[0] - 1, device=cu.device)


def num_slots(total: int, batch: int) -> int:
    """Scale slots of a varlen tensor (the length of its scales' last dim).

    total: rows of the packed tensor (T); batch: sequences in it (B).
    Returns total // QK_BLOCK + batch.
    """
    return total // QK_BLOCK + batch


def _segments(x, cu, op):
    """Per-sequence reduction over dim 0 of a varlen x [T, ...]: [B, ...]; empty sequences 0."""
    lengths = (cu[1:] - cu[:-1]).long()
    if op == "max":
        return torch.segment_reduce(x, "max", lengths=lengths, axis=0, initial=0.0)
    total = torch.segment_reduce(x, "sum", lengths=lengths, axis=0, initial=0.0)
    return total / lengths.clamp_min(1).view(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def qk_stats(
    q: torch.Tensor, k: torch.Tensor, smooth_k: bool,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The smoothing statistics of the Q/K format (above), per sequence, kv head and channel.

    q: dense [B, Hq, Sq, D] or varlen [Tq, Hq, D], float16/bfloat16/float32.
    k: dense [B, Hkv, Sk, D] or varlen [Tk, Hkv, D], q's dtype; Hq a multiple of Hkv.
    smooth_k: compute K's mean (else k_mean is None and K is balanced as it is).
    cu_seqlens_q, cu_seqlens_k: int32 [B + 1] for varlen inputs; default None (dense).
    Returns (k_mean fp32 [B, Hkv, D] or None, balance fp32 [B, Hkv, D], powers of two).
    Unchecked core (the op checks its inputs): no host synchronisation, traceable.
    """
    varlen = cu_seqlens_q is not None
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]  # heads are dim 1 in both layouts
    if varlen:
        kf = k.float()
        qa = q.float().abs().view(q.shape[0], hkv, hq // hkv, d).amax(2)  # [Tq, Hkv, D]
        q_amax = _segments(qa, cu_seqlens_q, "max")
        mean = _segments(kf, cu_seqlens_k, "mean") if smooth_k else None
        if mean is not None:
            seq = torch.repeat_interleave(torch.arange(mean.shape[0], device=k.device),
                                          (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long(),
                                          output_size=k.shape[0])
            kf = kf - mean[seq]
        k_amax = _segments(kf.abs(), cu_seqlens_k, "max")
    else:
        # Reductions straight from the 16-bit tensors, no fp32 or |x| copies (on a GPU these
        # passes are a visible part of the forward at S = 4096). Exact all the same: max|x| is
        # max(max x, -min x), and since fp32 rounding of k - mean is monotonic in k,
        # max_s |fl(k_s - mean)| = max(fl(max k - mean), fl(mean - min k)).
        qg = q.unflatten(1, (hkv, hq // hkv))
        q_amax = torch.maximum(qg.amax(dim=(2, 3)), -qg.amin(dim=(2, 3))).float()
        k_max, k_min = k.amax(dim=2).float(), k.amin(dim=2).float()
        mean = k.mean(dim=2, dtype=torch.float32) if smooth_k else None
        if mean is not None:
            k_max, k_min = k_max - mean, k_min - mean
        k_amax = torch.maximum(k_max, -k_min)
    # b = 2^round(log2(sqrt(q_amax / k_amax))); 1 where either side is all zero
    ok = (q_amax > 0) & (k_amax > 0)
    e = torch.round(0.5 * (torch.log2(torch.where(ok, q_amax, 1.0))
                           - torch.log2(torch.where(ok, k_amax, 1.0))))
    return mean, torch.exp2(e.clamp(-64, 64))


def _per_block(x: torch.Tensor, shift=None, mul=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales of dense x [B, H, S, D] per QK_BLOCK rows; x first becomes
    (fp32(x) - shift) * mul, shift/mul [B, H, D] or None."""
    b, h, s, d = x.shape
    xf = x.float()
    if shift is not None:
        xf = xf - shift[:, :, None]
    if mul is not None:
        xf = xf * mul[:, :, None]
    nb = (s + QK_BLOCK - 1) // QK_BLOCK
    xf = torch.nn.functional.pad(xf, (0, 0, 0, nb * QK_BLOCK - s))
    blocks = xf.reshape(b, h, nb, QK_BLOCK * d)
    scale = div_exact(blocks.abs().amax(-1), INT8_QMAX).clamp_min(FP32_TINY)
    codes = torch.round(blocks / scale[..., None]).clamp(-INT8_QMAX, INT8_QMAX).to(torch.int8)
    return codes.view(b, h, nb * QK_BLOCK, d)[:, :, :s].contiguous(), scale.contiguous()


def _quantize(x, cu, shift=None, mul=None):
    """_per_block for dense x, or per sequence of a varlen x into the slot layout."""
    if cu is None:
        return _per_block(x, shift, mul)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    bounds = cu.tolist()
    # slots no block uses (between sequences) hold 0
    scale = torch.zeros((x.shape[1], num_slots(x.shape[0], len(bounds) - 1)), dtype=torch.float32,
                        device=x.device)
    for b, slot in enumerate(block_slot(cu).tolist()):
        rows = slice(bounds[b], bounds[b + 1])
        if rows.stop == rows.start:
            continue
        c, sc = _per_block(varlen_seq(x, rows), *(None if t is None else t[b : b + 1]
                                                   for t in (shift, mul)))
        codes[rows] = c[0].transpose(0, 1)
        scale[:, slot : slot + sc.shape[-1]] = sc[0]
    return codes, scale


def quantize_qk(
    q: torch.Tensor, k: torch.Tensor, smooth_k: bool,
    cu_seqlens_q: torch.Tensor | None = None, cu_seqlens_k: torch.Tensor | None = None,
) -> QKCodes:
    """attention_int8's int8 Q and K (the format above).

    q: dense [B, Hq, Sq, D] or varlen [Tq, Hq, D], float16/bfloat16/float32.
    k: dense [B, Hkv, Sk, D] or varlen [Tk, Hkv, D], q's dtype; Hq a multiple of Hkv.
    smooth_k: subtract K's mean (per sequence, kv head, channel) before quantising.
    cu_seqlens_q, cu_seqlens_k: int32 [B + 1] for varlen inputs; default None (dense).
    Returns a QKCodes (codes in q's and k's shapes, scales, k_mean, balance).
    """
    mean, balance = qk_stats(q, k, smooth_k, cu_seqlens_q, cu_seqlens_k)
    group = q.shape[1] // k.shape[1]
    q_mul = (1.0 / balance).repeat_interleave(group, dim=1)  # exact: powers of two
    qc, qs = _quantize(q, cu_seqlens_q, None, q_mul)
    kc, ks = _quantize(k, cu_seqlens_k, mean, balance)
    return QKCodes(qc, qs, kc, ks, mean, balance)


def quantize_blocks(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """attention_int8's dO: int8 per QK_BLOCK rows of each (sequence, head), no smoothing.

    x: dense [B, H, S, D] or varlen [T, H, D], float16/bfloat16/float32.
    cu_seqlens: int32 [B + 1] for a varlen x; default None (dense).
    Returns (int8 codes of x's shape, fp32 scales [B, H, ceil(S / QK_BLOCK)] or
    [H, num_slots(T, B)]).
    """
    return _quantize(x, cu_seqlens)


def dequantize_qk(codes: torch.Tensor, scale: torch.Tensor,
                  cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 values of block-quantised codes (one of QKCodes' halves, or quantize_blocks').

    codes: int8, dense [B, H, S, D] or varlen [T, H, D].
    scale: fp32 [B, H, ceil(S / QK_BLOCK)] or, varlen, [H, num_slots(T, B)].
    cu_seqlens: int32 [B + 1] for varlen codes; default None (dense).
    Returns fp32 of codes' shape (varlen rows of no sequence are 0).
    """
    if cu_seqlens is None:
        return codes.float() * scale.repeat_interleave(QK_BLOCK, dim=2)[:, :, : codes.shape[2], None]
    out = torch.zeros(codes.shape, dtype=torch.float32, device=codes.device)
    bounds = cu_seqlens.tolist()
    for b, slot in enumerate(block_slot(cu_seqlens).tolist()):
        rows = slice(bounds[b], bounds[b + 1])
        n = rows.stop - rows.start
        nb = (n + QK_BLOCK - 1) // QK_BLOCK
        sc = scale[:, slot : slot + nb].repeat_interleave(QK_BLOCK, dim=1)[:, :n]  # [H, n]
        out[rows] = codes[rows].float() * sc.transpose(0, 1)[..., None]
    return out


def fake_quantize_row_tiles(x: torch.Tensor) -> torch.Tensor:
    """The backward's P and dS rounded to their int8 grid: one scale per row per QK_BLOCK
    columns (counted from column 0), the columns being the reduced axis.

    x: float [..., R, C].
    Returns x quantised and dequantised, fp32 (fp64 for an fp64 x: the tests' truth rounds the
    fp64 values); all-zero rows stay zero.
    """
    *lead, r, c = x.shape
    nb = (c + QK_BLOCK - 1) // QK_BLOCK
    xf = x if x.dtype == torch.float64 else x.float()
    xf = torch.nn.functional.pad(xf, (0, nb * QK_BLOCK - c)).reshape(*lead, r, nb, QK_BLOCK)
    scale = div_exact(xf.abs().amax(-1, keepdim=True), INT8_QMAX).clamp_min(FP32_TINY)
    codes = torch.round(xf / scale).clamp(-INT8_QMAX, INT8_QMAX)
    return (codes * scale).reshape(*lead, r, nb * QK_BLOCK)[..., :c]
