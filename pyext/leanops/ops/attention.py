"""Attention op family (issue 5): fused scaled-dot-product attention, forward and backward.

Ops (namespace leanops; every one has a fake kernel, argument checks naming the argument, a
PyTorch reference that is the definition and the tests' ground truth, and a Triton kernel):

  attention_fwd(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale, window_left, window_right, softcap) -> (out, lse)
  attention_bwd(grad_out, q, k, v, out, lse, <same arguments>) -> (dq, dk, dv)
  attention_decode(q, k_cache, v_cache, cache_seqlens, block_table,
                   scale, window_left, window_right, softcap) -> out          (inference only)
  attention_int8(q, k, v, <attention_fwd's arguments>, smooth_k) -> (out, lse)
  attention_int8_bwd(grad_out, q, k, v, out, lse, <same>, smooth_k) -> (dq, dk, dv)

This module is the home of the definitions they all share (layouts, scores, masks, the argument
checks, the reference and the CPU path) and of attention_fwd / attention_bwd with the public
`attention` and `attention_varlen`; leanops.ops.decode_attention and leanops.ops.int8_attention
hold the other ops and their public functions.

attention_fwd has a registered autograd whose backward is attention_bwd (another op), so
torch.compile traces forward and backward without a graph break.

Layouts. Dense: q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] (any strides; the output
[B, Hq, Sq, Dv] has q's layout, see leanops._layout), lse fp32 [B, Hq, Sq]. Varlen (cu_seqlens
given): q [Tq, Hq, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv] hold B packed sequences, sequence b being
rows cu_seqlens[b] .. cu_seqlens[b+1]; lse fp32 [Hq, Tq]. The value head dim Dv may differ from
the query/key head dim D (DeepSeek's multi-head latent attention uses 192/128); both are 1 to
MAX_HEAD_DIM. GQA / MQA: Hq a multiple of Hkv, q head h reads kv head h // (Hq / Hkv); k and v
are never repeated in memory. The public `attention` also takes SDPA's layouts (3-D [H, S, D],
2-D [S, D], several or broadcast batch dims) and brings them to the dense one.

Scores, in this order (the definition every backend follows; `reference_scores`):
  s = (q . k) * scale
  s = softcap * tanh(s / softcap)            if softcap > 0 (Gemma 2's logit soft-capping)
  s = s + bias                               additive bias/mask, broadcast to [B, Hq, Sq, Sk]
  s = -inf where the key is not visible      (`visible`, below: causal / sliding window)
  p = softmax(s) over keys, out = p @ v, lse = logsumexp(s) (natural log)
A query row that sees no key at all (e.g. causal with Sq > Sk, or a fully masked bias row) gets
out = 0 and lse = -inf (flash-attention's convention; PyTorch's math SDPA returns NaN there).

Mask semantics (the one home: `normalize_window`, `key_range` and `visible`; kernels implement
the same inequalities and are tested against them). Causal masks are aligned to the bottom-right
corner when Sq != Sk, as in flash-attention >= 2.1 and torch.nn.attention.bias.causal_lower_right:
query i is the token at position i + Sk - Sq, so the last query sees every key; this is what a
KV cache needs (F.scaled_dot_product_attention's is_causal is top-left aligned instead; the two
agree when Sq == Sk). A sliding window (left, right) lets query i see keys j with
    i + Sk - Sq - left <= j <= i + Sk - Sq + right,    -1 meaning unbounded on that side;
causal is window_right = 0. For varlen and the decode path, Sq and Sk are per sequence.

Numerics: the reference computes in fp32 (inputs are converted, the output rounded once to q's
dtype); the Triton kernels use the flash-attention-2 algorithm (online softmax in fp32 with the
base-2 exponent, P rounded to v's dtype before P @ V, lse saved, backward recomputes P) and are
held to "error vs an fp32/fp64 reference at most 2x the error of PyTorch's same-dtype math".

CPU tensors (no backend forced) take the CPU path (`_cpu_attention`, `_cpu_attention_bwd`), not
the reference: PyTorch's CPU flash-attention kernels (aten::_scaled_dot_product_flash_attention_
for_cpu and its backward: blocked online softmax in fp32, P rounded to the input dtype as in the
Triton kernels, GQA without repeating k/v, no Sq x Sk buffer) wherever their math is the
definition's, which is everything but softcap; held to the same 2x rule (tests/
test_attention_cpu.py). How a call is split:
  - no window: one call (a bias goes in as SDPA's additive attn_mask);
  - a causal-like window (left unbounded) without a bias: one call when every row sees every
    key (decode) or it is SDPA's top-left is_causal (Sq = Sk); otherwise the rows that see no
    key are cut off, the keys every other row sees go to one call and the causal rest to a
    second, top-left causal one, the two merged by their lse;
  - a window with a left edge, or causal with a bias: query blocks, each against only the keys
    it can see, with a [rows, keys] additive mask (at most _CPU_ELEMS elements per block);
  - Dv != D: the smaller side padded with zeros (exact: a zero column changes no dot product);
    a bias of another dtype than q: the call runs in their promoted dtype;
  - softcap (SDPA has none): the reference's math over the same query blocks, so memory stays
    bounded by the blocks, not Sq x Sk.
`use_backend("reference")` runs the definition itself; the tests compare both with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leanops._layout import empty_like_layout, varlen_seq
from leanops.dispatch import OpBackends, forced_backend
from leanops.ops._checks import FLOAT_DTYPES, check_same_device, check_tensor
from leanops.ops._library import register

OP = "leanops.attention"
MAX_HEAD_DIM = 256  # the kernels keep a [BLOCK_M, head_dim] fp32 accumulator in registers
INT32 = (torch.int32,)

# ---------------------------------------------------------------------------------------------
# Mask semantics: the one home


def normalize_window(causal: bool, window) -> tuple[int, int]:
    """(window_left, window_right) with -1 = unbounded, from the public (causal, window) pair.
    causal caps the right side at 0 (a causal sliding window is window=(w, 0) or causal=True
    with window=(w, -1)), as flash-attention does."""
    if window is None:
        left, right = -1, -1
    else:
        try:
            left, right = (int(w) for w in window)
        except (TypeError, ValueError):
            raise ValueError(f"{OP}: window must be a pair (left, right) of ints, got {window!r}") from None
        if left < -1 or right < -1:
            raise ValueError(
                f"{OP}: window must be (left, right) with each >= 0 or -1 (unbounded); got {window!r}"
            )
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def key_range(rows, sq: int, sk: int, window_left: int, window_right: int):
    """(lo, hi) of query i = `rows` (an int, or an int tensor of rows) of sq against sk keys: it
    sees exactly the keys lo <= j < hi, none when hi <= lo (bottom-right aligned, see the module
    docstring). lo is clipped at 0 and hi at sk, hi not below: it grows by exactly one per row
    until it reaches sk, and the rows that see nothing are those with hi <= 0, a first run."""
    pos = rows + (sk - sq)  # the query's own position among the keys
    if isinstance(pos, torch.Tensor):
        lo = (pos - window_left).clamp(min=0) if window_left >= 0 else torch.zeros_like(pos)
        hi = (pos + window_right + 1).clamp(max=sk) if window_right >= 0 else torch.full_like(pos, sk)
    else:
        lo = max(pos - window_left, 0) if window_left >= 0 else 0
        hi = min(pos + window_right + 1, sk) if window_right >= 0 else sk
    return lo, hi


def visible(sq: int, sk: int, window_left: int, window_right: int, device=None, rows=None,
            keys=None) -> torch.Tensor:
    """Bool [sq, sk]: may query i see key j. rows=(i0, i1) / keys=(j0, j1): only that block."""
    i0, i1 = rows if rows is not None else (0, sq)
    j0, j1 = keys if keys is not None else (0, sk)
    lo, hi = key_range(torch.arange(i0, i1, device=device), sq, sk, window_left, window_right)
    j = torch.arange(j0, j1, device=device)[None, :]
    return (j >= lo[:, None]) & (j < hi[:, None])


def resolve_scale(op: str, scale, q) -> float:
    """scale as a float, or the default 1/sqrt(D) once q is checked to have a head dim D the
    kernels take (so a head dim of 0 is named, not a ZeroDivisionError)."""
    if scale is not None:
        try:
            return float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}") from None
    check_tensor(op, "q", q, dtypes=FLOAT_DTYPES)
    if q.dim() == 0:
        raise ValueError(f"{op}: q must have a head dim (its last dim), got a 0-d tensor")
    _check_head_dim(op, "q", q.shape[-1])
    return 1.0 / math.sqrt(q.shape[-1])


# ---------------------------------------------------------------------------------------------
# Argument checks (metadata only: they run in the fake kernels too)


def _check_head_dim(op, name, d):
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: {name} has head dim {d}, which is not supported; leanops attention supports "
            f"head dims 1 to {MAX_HEAD_DIM}"
        )


def _check_scalars(op, scale, window_left, window_right, softcap):
    if not (isinstance(scale, float | int) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite float, got {scale!r}")
    for name, w in (("window_left", window_left), ("window_right", window_right)):
        if w < -1:
            raise ValueError(f"{op}: {name} must be >= 0 or -1 (unbounded), got {w}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{op}: softcap must be >= 0 (0 turns it off), got {softcap!r}")


def _check_kv_heads(op, hq, hkv):
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: the number of heads of q ({hq}) must be a multiple of that of k and v ({hkv}) "
            "(GQA/MQA)"
        )


def _check_qkv(op, q, k, v, varlen: bool):
    dim = 3 if varlen else 4
    layout = "[T, H, D] (varlen)" if varlen else "[B, H, S, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
        if t.dim() != dim:
            raise ValueError(f"{op}: {name} must be {dim}-D {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: {name} must have q's dtype {q.dtype}, got {t.dtype}")
    h_axis = 1
    hq, hkv, d = q.shape[h_axis], k.shape[h_axis], q.shape[-1]
    _check_head_dim(op, "q", d)
    _check_head_dim(op, "v", v.shape[-1])
    if k.shape[-1] != d:
        raise ValueError(f"{op}: k must have q's head dim {d}, got shape {tuple(k.shape)}")
    if tuple(v.shape[:-1]) != tuple(k.shape[:-1]):
        raise ValueError(
            f"{op}: v must have k's shape but for the head dim, {tuple(k.shape[:-1])} (same "
            f"batch, heads and length), got {tuple(v.shape)}"
        )
    _check_kv_heads(op, hq, hkv)
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"{op}: k must have q's batch size {q.shape[0]}, got shape {tuple(k.shape)}")


def _check_bias(op, bias, q, k):
    if bias is None:
        return
    check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, dim=4)
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if any(b != 1 and b != f for b, f in zip(bias.shape, full, strict=True)):
        raise ValueError(
            f"{op}: bias (attn_mask) must be broadcastable to [B, Hq, Sq, Sk] = {full} (each dim 1 "
            f"or full), got shape {tuple(bias.shape)}"
        )


def _check_cu(op, cu_q, cu_k):
    check_tensor(op, "cu_seqlens_q", cu_q, dtypes=INT32, dim=1)
    check_tensor(op, "cu_seqlens_k", cu_k, dtypes=INT32, dim=1)
    if cu_q.shape[0] < 2 or cu_k.shape[0] != cu_q.shape[0]:
        raise ValueError(
            f"{op}: cu_seqlens_q and cu_seqlens_k must both be [B + 1] with B >= 1; got "
            f"{tuple(cu_q.shape)} and {tuple(cu_k.shape)}"
        )


def check_attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap,
                        op="leanops.attention_fwd"):
    varlen = cu_q is not None or cu_k is not None
    if varlen and (cu_q is None or cu_k is None):
        raise ValueError(f"{op}: cu_seqlens_q and cu_seqlens_k must be given together")
    _check_qkv(op, q, k, v, varlen)
    if varlen:
        _check_cu(op, cu_q, cu_k)
        if bias is not None:
            raise ValueError(f"{op}: bias (attn_mask) is not supported with varlen (cu_seqlens)")
        if max_q < 0 or max_k < 0:
            raise ValueError(f"{op}: max_seqlen_q and max_seqlen_k must be >= 0")
    _check_bias(op, bias, q, k)
    _check_scalars(op, scale, wl, wr, softcap)
    check_same_device(op, q=q, k=k, v=v, bias=bias, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def out_shape(q, v):
    """The output's shape: q's with v's head dim."""
    return (*q.shape[:-1], v.shape[-1])


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])


def check_attention_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap, op="leanops.attention_bwd"):
    check_attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, op=op)
    check_tensor(op, "grad_out", grad_out, dtypes=(q.dtype,), shape=out_shape(q, v))
    check_tensor(op, "out", out, dtypes=(q.dtype,), shape=out_shape(q, v))
    check_tensor(op, "lse", lse, dtypes=(torch.float32,), shape=_lse_shape(q, cu_q is not None))
    check_same_device(op, q=q, grad_out=grad_out, out=out, lse=lse)


# ---------------------------------------------------------------------------------------------
# Reference (PyTorch math; fp32 by default, `dtype` lets tests run the same math in fp16/fp64)


def reference_scores(q, k, bias, scale, wl, wr, softcap, dtype=torch.float32):
    """s [B, Hq, Sq, Sk] (masked entries -inf) and tanh(s0 / softcap) (None without softcap) of
    dense q [B, Hq, Sq, D], k [B, Hkv, Sk, D], in `dtype`."""
    group = q.shape[1] // k.shape[1]
    qf = q.to(dtype)
    kf = k.to(dtype)
    if group > 1:
        kf = kf.repeat_interleave(group, dim=1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    t = None
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = t * softcap
    if bias is not None:
        s = s + bias.to(dtype)
    mask = visible(q.shape[2], k.shape[2], wl, wr, q.device)
    return s.masked_fill(~mask, float("-inf")), t


def _safe_lse(lse):
    return torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)


def reference_attention(q, k, v, bias, scale, wl, wr, softcap, dtype=torch.float32):
    """(out, lse) of dense inputs, computed in `dtype` (out stays in `dtype`, lse too)."""
    s, _ = reference_scores(q, k, bias, scale, wl, wr, softcap, dtype)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - _safe_lse(lse)[..., None])  # rows that see nothing: all zeros
    group = q.shape[1] // k.shape[1]
    vf = v.to(dtype)
    if group > 1:
        vf = vf.repeat_interleave(group, dim=1)
    return p @ vf, lse


def reference_attention_bwd(grad_out, q, k, v, out, lse, bias, scale, wl, wr, softcap,
                            dtype=torch.float32):
    """(dq, dk, dv) in `dtype` of dense inputs: flash-attention's backward in plain math.
    dV = P^T dO; dP = dO V^T; dS = P * (dP - rowsum(dO * O)); through softcap dS *= 1 - t^2;
    dQ = dS K * scale; dK = dS^T Q * scale; GQA sums dK, dV over the q heads of a kv head."""
    f = dtype
    s, t = reference_scores(q, k, bias, scale, wl, wr, softcap, f)
    p = torch.exp(s - _safe_lse(lse.to(f))[..., None]).to(f)
    group = q.shape[1] // k.shape[1]
    kf, vf = k.to(f), v.to(f)
    if group > 1:
        kf, vf = kf.repeat_interleave(group, dim=1), vf.repeat_interleave(group, dim=1)
    do = grad_out.to(f)
    dv = p.transpose(-1, -2) @ do
    dp = do @ vf.transpose(-1, -2)
    delta = (do * out.to(f)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    if t is not None:
        ds = ds * (1 - t * t)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ q.to(f)) * scale
    if group > 1:
        b, hq, sk = dk.shape[:3]
        dk = dk.view(b, hq // group, group, sk, dk.shape[-1]).sum(2)
        dv = dv.view(b, hq // group, group, sk, dv.shape[-1]).sum(2)
    return dq, dk, dv


def _varlen_slices(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        yield slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])


def _fwd_with(attend, q, k, v, bias, cu_q, cu_k, scale, wl, wr, softcap):
    """attention_fwd's (out, lse) from attend(q, k, v, bias, scale, wl, wr, softcap) -> (o, lse)
    on dense [B, H, S, D] inputs: once, or per sequence of a varlen batch."""
    out = empty_like_layout(q, out_shape(q, v))  # q's layout (and so the fake kernel's)
    if cu_q is None:
        o, lse = attend(q, k, v, bias, scale, wl, wr, softcap)
        out.copy_(o)
        return out, lse.contiguous()
    lse = torch.empty(_lse_shape(q, True), dtype=torch.float32, device=q.device)
    for rq, rk in _varlen_slices(cu_q, cu_k):
        o, l_ = attend(varlen_seq(q, rq), varlen_seq(k, rk), varlen_seq(v, rk), None, scale, wl, wr, softcap)
        out[rq] = o[0].transpose(0, 1)
        lse[:, rq] = l_[0]
    return out, lse


def _bwd_with(attend_bwd, grad_out, q, k, v, out, lse, bias, cu_q, cu_k, scale, wl, wr, softcap):
    """attention_bwd's (dq, dk, dv) from attend_bwd(grad_out, q, k, v, out, lse, bias, scale, wl,
    wr, softcap) on dense inputs: once, or per sequence of a varlen batch."""
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if cu_q is None:
        g = attend_bwd(grad_out, q, k, v, out, lse, bias, scale, wl, wr, softcap)
        for dst, src in zip((dq, dk, dv), g, strict=True):
            dst.copy_(src)
        return dq, dk, dv
    dk.zero_()
    dv.zero_()
    for rq, rk in _varlen_slices(cu_q, cu_k):
        g = attend_bwd(
            varlen_seq(grad_out, rq), varlen_seq(q, rq), varlen_seq(k, rk), varlen_seq(v, rk), varlen_seq(out, rq),
            lse[:, rq].unsqueeze(0), None, scale, wl, wr, softcap,
        )
        dq[rq] = g[0][0].transpose(0, 1)
        dk[rk] = g[1][0].transpose(0, 1)
        dv[rk] = g[2][0].transpose(0, 1)
    return dq, dk, dv


def _attention_fwd_reference(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    return _fwd_with(reference_attention, q, k, v, bias, cu_q, cu_k, scale, wl, wr, softcap)


def _attention_bwd_reference(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale,
                             wl, wr, softcap):
    return _bwd_with(reference_attention_bwd, grad_out, q, k, v, out, lse, bias, cu_q, cu_k,
                     scale, wl, wr, softcap)


# ---------------------------------------------------------------------------------------------
# CPU path (see the module docstring): PyTorch's CPU flash-attention kernels where exact


_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_CPU_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
# Elements a query block may materialise (its additive mask, or the softcap path's fp32 scores):
# 4M (16 MB in fp32) keeps the blocks in the hundreds of rows for contexts of 8k-32k.
_CPU_ELEMS = 1 << 22
_MIN_BLOCK_ROWS = 16


def _cpu_flash(q, k, v, mask, causal, scale):
    """(out, lse fp32) of aten's CPU flash forward; causal is SDPA's top-left is_causal; mask
    additive in q's dtype. Never called with Sq or Sk = 0 (it divides by them)."""
    return _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)


def _cpu_flash_bwd(do, q, k, v, out, lse, mask, causal, scale):
    """(dq, dk, dv) of aten's CPU flash backward (lse finite: it recomputes P = exp(s - lse))."""
    return _CPU_FLASH_BWD(do, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)


def _cpu_plan(q, k, bias, wl, wr, softcap):
    """How the CPU path splits a dense problem (int arithmetic on key_range, no tensors): ("two",
    r0, c) for a causal-like window without a bias or softcap (rows from r0 on see keys
    [0, c + i - r0); rows above none), else ("blocks", ranges) with ranges a list of
    (i0, i1, lo, hi, band): query rows [i0, i1) against keys [lo, hi), band the bool
    [rows, keys] visibility or None where every row sees them all."""
    sq, sk = q.shape[2], k.shape[2]
    r0 = min(sq, max(0, 1 - key_range(0, sq, sk, wl, wr)[1]))  # the rows with hi <= 0
    if wl < 0 and bias is None and softcap == 0:
        return "two", r0, key_range(r0, sq, sk, wl, wr)[1] if r0 < sq else sk
    if wl < 0 and wr < 0 and softcap == 0:  # no window: the bias as one mask, one call
        return "blocks", [(0, sq, 0, sk, None)]
    # elements one query row materialises: its mask row (the bias' broadcast batch and heads) or,
    # for softcap, its fp32 scores over every head of every batch entry
    width = q.shape[0] * q.shape[1] if softcap > 0 else (
        1 if bias is None else bias.shape[0] * bias.shape[1])
    rows = max(_MIN_BLOCK_ROWS, _CPU_ELEMS // max(1, width * sk))
    ranges = []
    for i0 in range(r0, sq, rows):
        i1 = min(i0 + rows, sq)
        (j0, hi_first), (lo_last, j1) = key_range(i0, sq, sk, wl, wr), key_range(i1 - 1, sq, sk, wl, wr)
        full = lo_last <= j0 and hi_first >= j1
        band = None if full else visible(sq, sk, wl, wr, q.device, rows=(i0, i1), keys=(j0, j1))
        ranges.append((i0, i1, j0, j1, band))
    return "blocks", ranges


def _block_mask(bias, band, i0, i1, lo, hi, dtype, device):
    """The additive mask of a query block: the bias' rows and keys (size-1 dims stay size 1)
    with -inf where the band hides a key; None when there is neither."""
    m = None
    if bias is not None:
        rows = slice(i0, i1) if bias.shape[2] > 1 else slice(None)
        keys = slice(lo, hi) if bias.shape[3] > 1 else slice(None)
        m = bias[:, :, rows, keys]
        if m.shape[3] != hi - lo:  # a size-1 key dim, as a stride-0 view of the block's width
            m = m.expand(*m.shape[:3], hi - lo)
    if band is None:
        return m
    if m is None:
        m = torch.zeros(band.shape, dtype=dtype, device=device)
    return m.masked_fill(~band, float("-inf"))


def _blind(mask, shape):
    """Bool `shape` [B, H, rows]: rows of the additive mask with every key at -inf, which the CPU
    kernels return as out 0, lse 0 (the definition's lse is -inf). A max over keys: no bool copy
    of the mask; a NaN row stays NaN, not blind."""
    return (mask.amax(-1) == float("-inf")).expand(shape)


def _cpu_operands(q, k, v, bias, softcap):
    """(q, k, v, bias) in one dtype the kernels take: the promoted one of q and the bias (so
    neither is rounded), and, for the flash kernels, one head dim (the smaller side padded with
    zeros: exact, a zero column adds 0 to every dot product and to nothing else)."""
    if bias is not None and bias.dtype != q.dtype:
        work = torch.promote_types(q.dtype, bias.dtype)
        q, k, v, bias = q.to(work), k.to(work), v.to(work), bias.to(work)
    d, dv = q.shape[-1], v.shape[-1]
    if softcap == 0 and dv < d:
        v = F.pad(v, (0, d - dv))
    elif softcap == 0 and d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    return q, k, v, bias


def _merge(oa, la, ob, lb):
    """Two partial attentions over disjoint key sets combined by their lse (fp32)."""
    lse = torch.logaddexp(la, lb)
    out = oa.float() * (la - lse).exp()[..., None] + ob.float() * (lb - lse).exp()[..., None]
    return out, lse


def _cpu_attention(q, k, v, bias, scale, wl, wr, softcap):
    """(out, lse) of dense CPU inputs, the definition's, computed by the CPU path (see the module
    docstring); out [B, Hq, Sq, Dv] in q's or a wider dtype."""
    dv = v.shape[-1]
    b, hq, sq = q.shape[:3]
    sk = k.shape[2]
    if q.numel() == 0 or sk == 0:  # (the kernels divide by the lengths)
        return q.new_zeros((b, hq, sq, dv)), q.new_full((b, hq, sq), float("-inf"),
                                                         dtype=torch.float32)
    qw, kw, vw, bias = _cpu_operands(q, k, v, bias, softcap)
    plan = _cpu_plan(q, k, bias, wl, wr, softcap)
    if plan[0] == "two":
        _, r0, c = plan
        if r0 == 0 and c >= sk:  # every row sees every key (decode, full attention): one call
            o, l_ = _cpu_flash(qw, kw, vw, None, False, scale)
            return o[..., :dv], l_
        if r0 == 0 and c == 1:  # causal with Sq = Sk: SDPA's is_causal
            o, l_ = _cpu_flash(qw, kw, vw, None, True, scale)
            return o[..., :dv], l_
    out = qw.new_zeros((b, hq, sq, vw.shape[-1]))  # rows that see no key stay 0
    lse = q.new_full((b, hq, sq), float("-inf"), dtype=torch.float32)
    if plan[0] == "two":
        _, r0, c = plan
        if r0 == sq:
            return out[..., :dv], lse
        qr = qw[:, :, r0:]
        if c >= sk:
            o, l_ = _cpu_flash(qr, kw, vw, None, False, scale)
        else:  # keys [0, c - 1) for every row, then a top-left causal triangle
            p = c - 1
            o, l_ = _cpu_flash(qr, kw[:, :, p:], vw[:, :, p:], None, True, scale)
            if p > 0:
                o, l_ = _merge(*_cpu_flash(qr, kw[:, :, :p], vw[:, :, :p], None, False, scale),
                               o, l_)
        out[:, :, r0:] = o
        lse[:, :, r0:] = l_
        return out[..., :dv], lse
    for i0, i1, lo, hi, band in plan[1]:
        mask = _block_mask(bias, band, i0, i1, lo, hi, qw.dtype, q.device)
        qb, kb, vb = qw[:, :, i0:i1], kw[:, :, lo:hi], vw[:, :, lo:hi]
        if softcap > 0:  # the reference's math on the block; the mask carries the window
            o, l_ = reference_attention(qb, kb, vb, mask, scale, -1, -1, softcap)
        else:
            o, l_ = _cpu_flash(qb, kb, vb, mask, False, scale)
            if mask is not None:
                l_ = l_.masked_fill(_blind(mask, l_.shape), float("-inf"))
        out[:, :, i0:i1] = o
        lse[:, :, i0:i1] = l_
    return out[..., :dv], lse


def _cpu_attention_bwd(grad_out, q, k, v, out, lse, bias, scale, wl, wr, softcap):
    """(dq, dk, dv) of dense CPU inputs by the CPU path, split as the forward was. dK and dV
    of keys that several query blocks see are summed in fp32."""
    d, dv = q.shape[-1], v.shape[-1]
    sk = k.shape[2]
    if q.numel() == 0 or sk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qw, kw, vw, bias = _cpu_operands(q, k, v, bias, softcap)
    do, ow = grad_out.to(qw.dtype), out.to(qw.dtype)
    if vw.shape[-1] > dv:  # padded V columns: their output and its gradient are 0
        do, ow = F.pad(do, (0, vw.shape[-1] - dv)), F.pad(ow, (0, vw.shape[-1] - dv))
    lse = _safe_lse(lse)  # rows that see nothing: every score is -inf, P = exp(-inf - 0) = 0
    plan = _cpu_plan(q, k, bias, wl, wr, softcap)
    if plan[0] == "two" and plan[1] == 0 and (plan[2] >= sk or plan[2] == 1):  # one call
        g = _cpu_flash_bwd(do, qw, kw, vw, ow, lse, None, plan[2] == 1 and sk > 1, scale)
        return g[0][..., :d], g[1][..., :d], g[2][..., :dv]
    dq = torch.zeros(qw.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(kw.shape, dtype=torch.float32, device=q.device)
    dvv = torch.zeros(vw.shape, dtype=torch.float32, device=q.device)
    if plan[0] == "two":
        _, r0, c = plan
        if r0 == q.shape[2]:
            return dq[..., :d], dk[..., :d], dvv[..., :dv]
        rows = (qw[:, :, r0:], do[:, :, r0:], ow[:, :, r0:], lse[:, :, r0:])

        def part(j0, j1, causal):
            g = _cpu_flash_bwd(rows[1], rows[0], kw[:, :, j0:j1], vw[:, :, j0:j1], rows[2],
                               rows[3], None, causal, scale)
            dq[:, :, r0:] += g[0]
            dk[:, :, j0:j1] += g[1]
            dvv[:, :, j0:j1] += g[2]

        if c >= sk:
            part(0, sk, False)
        else:
            part(c - 1, sk, True)
            if c > 1:
                part(0, c - 1, False)
        return dq[..., :d], dk[..., :d], dvv[..., :dv]
    for i0, i1, lo, hi, band in plan[1]:
        mask = _block_mask(bias, band, i0, i1, lo, hi, qw.dtype, q.device)
        args = (do[:, :, i0:i1], qw[:, :, i0:i1], kw[:, :, lo:hi], vw[:, :, lo:hi],
                ow[:, :, i0:i1], lse[:, :, i0:i1])
        if softcap > 0:
            g = reference_attention_bwd(*args, mask, scale, -1, -1, softcap)
        else:
            g = _cpu_flash_bwd(*args, mask, False, scale)
        dq[:, :, i0:i1] = g[0]
        dk[:, :, lo:hi] += g[1]
        dvv[:, :, lo:hi] += g[2]
    return dq[..., :d], dk[..., :d], dvv[..., :dv]


def _attention_fwd_cpu(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    return _fwd_with(_cpu_attention, q, k, v, bias, cu_q, cu_k, scale, wl, wr, softcap)


def _attention_bwd_cpu(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                       wr, softcap):
    return _bwd_with(_cpu_attention_bwd, grad_out, q, k, v, out, lse, bias, cu_q, cu_k, scale,
                     wl, wr, softcap)


def use_cpu_path(t: torch.Tensor) -> bool:
    """CPU tensors take the CPU path with no backend forced or with use_backend("cpu");
    use_backend("reference") gives the definition (the tests' ground truth) instead."""
    return t.device.type == "cpu" and forced_backend() in (None, "cpu")


# ---------------------------------------------------------------------------------------------
# attention_fwd / attention_bwd


_fwd_backends = OpBackends(
    "attention_fwd",
    reference=_attention_fwd_reference,
    triton="leanops.triton.attention:attention_fwd",
)
_bwd_backends = OpBackends(
    "attention_bwd",
    reference=_attention_bwd_reference,
    triton="leanops.triton.attention:attention_bwd",
)


def _empty_problem(q, k):
    return q.numel() == 0 or k.numel() == 0


def _attention_fwd_impl(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    args = (q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    check_attention_fwd(*args)
    if _empty_problem(q, k):
        return _attention_fwd_reference(*args)
    if use_cpu_path(q):
        return _attention_fwd_cpu(*args)
    return _fwd_backends(*args)


def _attention_bwd_impl(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap):
    args = (grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    check_attention_bwd(*args)
    if _empty_problem(q, k):
        return _attention_bwd_reference(*args)
    if use_cpu_path(q):
        return _attention_bwd_cpu(*args)
    return _bwd_backends(*args)


_ARGS = ("Tensor? bias, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, SymInt max_seqlen_q, "
         "SymInt max_seqlen_k, float scale, int window_left, int window_right, float softcap")

register("attention_fwd", f"(Tensor q, Tensor k, Tensor v, {_ARGS}) -> (Tensor, Tensor)",
         _attention_fwd_impl)
register(
    "attention_bwd",
    f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_ARGS}) "
    "-> (Tensor, Tensor, Tensor)",
    _attention_bwd_impl,
)


@torch.library.register_fake("leanops::attention_fwd")
def _attention_fwd_fake(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    check_attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    lse = q.new_empty(_lse_shape(q, cu_q is not None), dtype=torch.float32)
    return empty_like_layout(q, out_shape(q, v)), lse


@torch.library.register_fake("leanops::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap):
    check_attention_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def register_attention_autograd(op: str, bwd_op: str, public: str) -> None:
    """The autograd of leanops::<op>, an attention forward with inputs (q, k, v, bias, cu_q,
    cu_k, *args) and outputs (out, lse): leanops::<bwd_op>(grad_out, q, k, v, out, lse, bias,
    cu_q, cu_k, *args) gives (dq, dk, dv). A bias that requires grad is refused (`public` names
    the caller in the error); lse is an auxiliary output for the backward (and for users merging
    partial attentions), not differentiated, as in flash-attention."""

    def setup(ctx, inputs, output):
        q, k, v, bias, cu_q, cu_k = inputs[:6]
        if bias is not None and bias.requires_grad:
            raise NotImplementedError(
                f"{public}: attn_mask/bias requires grad, but leanops attention does not compute "
                "a bias gradient; detach it (masks, ALiBi) or use F.scaled_dot_product_attention "
                "for a learned bias"
            )
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, bias, cu_q, cu_k)
        ctx.args = tuple(inputs[6:])
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out, grad_lse):
        rest = (None,) * (3 + len(ctx.args))  # bias, cu_q, cu_k and the other arguments
        if grad_out is None:
            return (None, None, None) + rest
        q, k, v, out, lse, bias, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = getattr(torch.ops.leanops, bwd_op).default(
            grad_out.contiguous(), q, k, v, out, lse, bias, cu_q, cu_k, *ctx.args
        )
        return (dq, dk, dv) + rest

    torch.library.register_autograd(f"leanops::{op}", backward, setup_context=setup)


register_attention_autograd("attention_fwd", "attention_bwd", "leanops.attention")


def attention_fwd(q, k, v, bias=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                  max_seqlen_k=0, scale=None, window_left=-1, window_right=-1, softcap=0.0):
    """The raw op leanops::attention_fwd on the ops' own layouts (see the module docstring);
    `leanops.attention` is the friendly entry point. Differentiable in q, k and v.

    Args:
        q: [B, Hq, Sq, D], or [Tq, Hq, D] with cu_seqlens; float16, bfloat16 or float32.
        k: [B, Hkv, Sk, D] / [Tk, Hkv, D], q's dtype; Hq a multiple of Hkv.
        v: k's shape with head dim Dv (1 to 256, may differ from D), q's dtype.
        bias: None (default) or an additive float mask broadcastable to [B, Hq, Sq, Sk], each
            dim 1 or full (dense only); not differentiable.
        cu_seqlens_q, cu_seqlens_k: None (dense, default) or int32 [B + 1] each (varlen).
        max_seqlen_q, max_seqlen_k: ints >= 0, the longest sequences (varlen; default 0).
        scale: a finite float; default None = 1/sqrt(D).
        window_left, window_right: ints >= 0, or -1 = unbounded (default -1); causal is
            window_right = 0.
        softcap: float >= 0, 0 (default) = off.

    Returns:
        (out [B, Hq, Sq, Dv] / [Tq, Hq, Dv] in q's dtype and layout, lse float32 [B, Hq, Sq] /
        [Hq, Tq], natural log, -inf for rows that see no key).

    Raises:
        ValueError: a shape, dtype, device or argument outside the above, naming it.
    """
    scale = resolve_scale("leanops.attention_fwd", scale, q)
    return torch.ops.leanops.attention_fwd.default(
        q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
        int(window_left), int(window_right), float(softcap),
    )


# ---------------------------------------------------------------------------------------------
# Public functions


def sdpa_inputs(op, q, k, v):
    """F.scaled_dot_product_attention's inputs as the ops' dense layout: (q, k, v) as [B, H, S,
    D] (views where strides allow), the output's batch dims and its number of dims (for
    `sdpa_output`). Every shape is checked, naming the argument, before any arithmetic on it.

    Accepted (SDPA's rules; leanops GQA on the head dim): q [*, Hq, Sq, D], k [*, Hkv, Sk, D],
    v [*, Hkv, Sk, Dv], * zero or more batch dims that broadcast against each other (missing
    leading dims count as 1); a 2-D [S, D] input is one head. The head dims (-3) of k and v
    broadcast against each other (one of them 1); Hq is a multiple of Hkv (GQA/MQA) or 1 (q
    broadcast over the kv heads). Broadcast dims are read with stride 0, except where several
    batch dims must be merged into one: then the tensor is copied."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(op, name, t, dtypes=FLOAT_DTYPES)
        if t.dim() < 2:
            raise ValueError(
                f"{op}: {name} must be [..., S, D] (e.g. [B, H, S, D], [H, S, D] or [S, D]), got "
                f"shape {tuple(t.shape)}"
            )
    _check_head_dim(op, "q", q.shape[-1])
    _check_head_dim(op, "v", v.shape[-1])
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{op}: k must have q's head dim {q.shape[-1]}, got shape {tuple(k.shape)}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"{op}: v must have k's length {k.shape[-2]} (dim -2), got shape {tuple(v.shape)}")
    dims = max(q.dim(), k.dim(), v.dim())
    if (dims == q.dim() == k.dim() == v.dim() == 4 and q.shape[0] == k.shape[0] == v.shape[0]
            and k.shape[1] == v.shape[1] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0):
        return q, k, v, (q.shape[0],), 4  # already the ops' layout
    nd = max(dims, 3)

    def split(t):
        shape = (1,) * (nd - t.dim()) + tuple(t.shape)
        return shape[:-3], shape[-3]

    (qb, hq), (kb, hk), (vb, hv) = split(q), split(k), split(v)
    try:
        batch = torch.broadcast_shapes(qb, kb, vb)
    except RuntimeError:
        raise ValueError(
            f"{op}: the batch dims of q {qb}, k {kb} and v {vb} (those before [H, S, D]; missing "
            "ones count as 1) must broadcast against each other (each 1 or one common size), as "
            "in F.scaled_dot_product_attention"
        ) from None
    if hk != hv and 1 not in (hk, hv):
        raise ValueError(
            f"{op}: k and v must have the same number of heads (dim -3), or one of them 1; got "
            f"{hk} and {hv}"
        )
    hkv = max(hk, hv)
    hq = hkv if hq == 1 else hq  # one q head broadcast over the kv heads, as SDPA
    _check_kv_heads(op, hq, hkv)
    b = math.prod(batch)

    def dense(t, h):
        t = t.reshape((1,) * (nd - t.dim()) + tuple(t.shape))
        return t.expand(*batch, h, *t.shape[-2:]).reshape(b, h, *t.shape[-2:])

    return dense(q, hq), dense(k, hkv), dense(v, hkv), tuple(batch), dims


def sdpa_output(out, batch, dims):
    """The op's [B, H, Sq, Dv] output in the layout of sdpa_inputs' caller: [*batch, H, Sq, Dv],
    or [Sq, Dv] for 2-D inputs."""
    if len(batch) != 1:
        out = out.reshape(*batch, *out.shape[1:])
    return out.squeeze(0) if dims == 2 else out


def _mask_to_bias(attn_mask, q, k, batch=None):
    """SDPA's attn_mask (bool: True = may attend; float: added to the scores), of any shape
    broadcastable to [*batch, Hq, Sq, Sk], as the op's 4-D additive bias (size-1 dims stay size
    1: the kernels read them with stride 0). q, k: the dense [B, H, S, D] query and key; batch:
    the batch dims B stands for (sdpa_inputs'; default (B,))."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{OP}: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    batch = (q.shape[0],) if batch is None else batch
    full = (*batch, q.shape[1], q.shape[2], k.shape[2])
    shape = tuple(attn_mask.shape)
    padded = (1,) * (len(full) - len(shape)) + shape
    if not 1 <= len(shape) <= len(full) or any(
            m != 1 and m != f for m, f in zip(padded, full, strict=True)):
        raise ValueError(
            f"{OP}: attn_mask must be broadcastable to [*batch, Hq, Sq, Sk] = {full} (each dim 1 "
            f"or full, missing leading dims count as 1), got shape {shape}"
        )
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{OP}: attn_mask must be bool (True = attend) or float (additive), got "
            f"{attn_mask.dtype}"
        )
    m = attn_mask.reshape(padded)
    if all(x == 1 for x in padded[:-3]):
        m = m.reshape(1, *padded[-3:])
    else:  # the batch dims as the op's one
        m = m.expand(*batch, *padded[-3:]).reshape(q.shape[0], *padded[-3:])
    if m.dtype == torch.bool:
        zero = torch.zeros((), dtype=q.dtype, device=m.device)
        m = torch.where(m, zero, torch.full((), float("-inf"), dtype=q.dtype, device=m.device))
    return m


def _softcap_value(softcap):
    if softcap is None:
        return 0.0
    softcap = float(softcap)
    if not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"{OP}: softcap must be a positive float or None, got {softcap!r}")
    return softcap


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Fused attention, softmax(q k^T * scale [+ attn_mask]) v, with
    F.scaled_dot_product_attention's layouts and arguments. Differentiable in q, k and v.

    Args:
        q: [*, Hq, Sq, D] queries: float16, bfloat16 or float32; D 1 to 256; * zero or more
            batch dims ([B, H, S, D], [H, S, D], [S, D] = one head, or more batch dims).
        k: [*, Hkv, Sk, D] keys, q's dtype and head dim; Hq a multiple of Hkv (GQA/MQA, k and
            v never repeated in memory) or Hq = 1 (q broadcast over the heads, as SDPA).
        v: [*, Hkv, Sk, Dv] values, q's dtype; Dv 1 to 256, may differ from D (e.g. 192/128).
            The batch dims * of q, k and v broadcast against each other (each 1 or one common
            size; missing leading dims count as 1), and so do the head dims of k and v.
        attn_mask: None (default), or bool (True = may attend) or additive float, broadcastable
            to [*, Hq, Sq, Sk]; read per score tile (the slower general path); not
            differentiable (requires_grad raises).
        causal: False (default) or True: bottom-right aligned when Sq != Sk (query i is the
            token at position i + Sk - Sq, as flash-attention and causal_lower_right; SDPA's
            is_causal is top-left); combines with attn_mask and window.
        scale: the factor on q k^T, a finite float; default None = 1/sqrt(D).
        window: None (default) or (left, right): query i sees keys i + Sk - Sq - left to
            i + Sk - Sq + right; -1 = unbounded on that side; causal caps right at 0.
        softcap: None (default) or > 0: the logits become softcap * tanh(s / softcap) (Gemma 2).

    Returns:
        out [*, Hq, Sq, Dv] in q's dtype (q's layout for 4-D inputs; [Sq, Dv] for 2-D ones).
        Rows that see no key return 0 (SDPA's math path returns NaN).

    Raises:
        ValueError: a shape, dtype, device, window, scale or softcap outside the above, naming
            the argument (before any arithmetic on the shapes).
        TypeError: an argument that is not a Tensor where one is required.
        NotImplementedError: attn_mask requires grad.

    Backends: Triton kernels on CUDA tensors (sm_80+, float16/bfloat16/float32); on CPU tensors
    PyTorch's CPU flash-attention kernels where they compute exactly this (everything but
    softcap, which runs the reference's math over query blocks); see leanops.ops.attention.
    """
    q, k, v, batch, dims = sdpa_inputs(OP, q, k, v)
    wl, wr = normalize_window(causal, window)
    bias = _mask_to_bias(attn_mask, q, k, batch)
    out, _ = attention_fwd(q, k, v, bias, scale=resolve_scale(OP, scale, q), window_left=wl,
                           window_right=wr, softcap=_softcap_value(softcap))
    return sdpa_output(out, batch, dims)


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention over a batch of variable-length sequences packed along the first dim (no
    padding). Differentiable in q, k and v.

    Args:
        q: [Tq, Hq, D] queries of every sequence, float16, bfloat16 or float32; D 1 to 256.
        k: [Tk, Hkv, D] keys, q's dtype and head dim; Hq a multiple of Hkv (GQA/MQA).
        v: [Tk, Hkv, Dv] values, q's dtype; Dv 1 to 256, may differ from D.
        cu_seqlens_q: int32 [B + 1], starting at 0: sequence b is rows cu_seqlens_q[b] to
            cu_seqlens_q[b + 1] of q.
        cu_seqlens_k: int32 [B + 1], the same for k and v.
        max_seqlen_q: int >= 0, the longest query sequence (sizes the launch grid; a smaller
            value than the truth leaves rows unwritten).
        max_seqlen_k: int >= 0, the longest key sequence.
        causal, scale, window, softcap: as in `attention`, per sequence (defaults False, None =
            1/sqrt(D), None, None).

    Returns:
        out [Tq, Hq, Dv] in q's dtype.

    Raises:
        ValueError: a shape, dtype or argument outside the above, naming it.
    """
    wl, wr = normalize_window(causal, window)
    out, _ = attention_fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                           int(max_seqlen_k), scale, wl, wr, _softcap_value(softcap))
    return out
