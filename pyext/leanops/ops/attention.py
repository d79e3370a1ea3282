"""Attention op family (issue 5): fused scaled-dot-product attention, forward and backward.

Ops (namespace leanops; every one has a fake kernel, argument checks naming the argument, a
PyTorch fp32 reference that is the CPU path and the definition, and a Triton kernel):

  attention_fwd(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                scale, window_left, window_right, softcap) -> (out, lse)
  attention_bwd(grad_out, q, k, v, out, lse, <same arguments>) -> (dq, dk, dv)
  attention_decode(q, k_cache, v_cache, cache_seqlens, block_table,
                   scale, window_left, window_right, softcap) -> out          (inference only)
  attention_int8(q, k, v, <attention_fwd's arguments>, smooth_k) -> (out, lse)
  attention_int8_bwd(grad_out, q, k, v, out, lse, <same>, smooth_k) -> (dq, dk, dv)

This module is the home of the definitions they all share (layouts, scores, masks, the argument
checks and the reference) and of attention_fwd / attention_bwd with the public `attention` and
`attention_varlen`; leanops.ops.decode_attention and leanops.ops.int8_attention hold the other
ops and their public functions.

attention_fwd has a registered autograd whose backward is attention_bwd (another op), so
torch.compile traces forward and backward without a graph break.

Layouts. Dense: q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D] (any strides; the output has q's
layout), lse fp32 [B, Hq, Sq]. Varlen (cu_seqlens given): q [Tq, Hq, D], k/v [Tk, Hkv, D] hold
B packed sequences, sequence b being rows cu_seqlens[b] .. cu_seqlens[b+1]; lse fp32 [Hq, Tq].
GQA / MQA: Hq a multiple of Hkv, q head h reads kv head h // (Hq / Hkv); k and v are never
repeated in memory.

Scores, in this order (the definition every backend follows; `reference_scores`):
  s = (q . k) * scale
  s = softcap * tanh(s / softcap)            if softcap > 0 (Gemma 2's logit soft-capping)
  s = s + bias                               additive bias/mask, broadcast to [B, Hq, Sq, Sk]
  s = -inf where the key is not visible      (`visible`, below: causal / sliding window)
  p = softmax(s) over keys, out = p @ v, lse = logsumexp(s) (natural log)
A query row that sees no key at all (e.g. causal with Sq > Sk, or a fully masked bias row) gets
out = 0 and lse = -inf (flash-attention's convention; PyTorch's math SDPA returns NaN there).

Mask semantics (the one home: `normalize_window` and `visible`; kernels implement the same
inequalities and are tested against them). Causal masks are aligned to the bottom-right corner
when Sq != Sk, as in flash-attention >= 2.1 and torch.nn.attention.bias.causal_lower_right: query
i is the token at position i + Sk - Sq, so the last query sees every key; this is what a KV cache
needs (F.scaled_dot_product_attention's is_causal is top-left aligned instead; the two agree when
Sq == Sk). A sliding window (left, right) lets query i see keys j with
    i + Sk - Sq - left <= j <= i + Sk - Sq + right,    -1 meaning unbounded on that side;
causal is window_right = 0. For varlen and the decode path, Sq and Sk are per sequence.

Numerics: the reference computes in fp32 (inputs are converted, the output rounded once to q's
dtype); the Triton kernels use the flash-attention-2 algorithm (online softmax in fp32 with the
base-2 exponent, P rounded to v's dtype before P @ V, lse saved, backward recomputes P) and are
held to "error vs an fp32/fp64 reference at most 2x the error of PyTorch's same-dtype math".
"""

from __future__ import annotations

import math

import torch

from leanops.dispatch import OpBackends
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


def visible(sq: int, sk: int, window_left: int, window_right: int, device=None) -> torch.Tensor:
    """Bool [sq, sk]: may query i see key j (bottom-right aligned, see the module docstring)."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    rel = j - (i + (sk - sq))  # key position relative to the query's own position
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if window_left >= 0:
        ok &= rel >= -window_left
    if window_right >= 0:
        ok &= rel <= window_right
    return ok


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# ---------------------------------------------------------------------------------------------
# Argument checks (metadata only: they run in the fake kernels too)


def _check_head_dim(op, d):
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"{op}: q has head dim {d}, which is not supported; leanops attention supports head "
            f"dims 1 to {MAX_HEAD_DIM}"
        )


def _check_scalars(op, scale, window_left, window_right, softcap):
    if not (isinstance(scale, float | int) and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be a finite float, got {scale!r}")
    for name, w in (("window_left", window_left), ("window_right", window_right)):
        if w < -1:
            raise ValueError(f"{op}: {name} must be >= 0 or -1 (unbounded), got {w}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{op}: softcap must be >= 0 (0 turns it off), got {softcap!r}")


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
    _check_head_dim(op, d)
    if k.shape[-1] != d:
        raise ValueError(f"{op}: k must have q's head dim {d}, got shape {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"{op}: v must have k's shape {tuple(k.shape)} (same heads, length and head dim), "
            f"got {tuple(v.shape)}"
        )
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(
            f"{op}: the number of heads of q ({hq}) must be a multiple of that of k and v ({hkv}) "
            "(GQA/MQA)"
        )
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


def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])


def check_attention_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap, op="leanops.attention_bwd"):
    check_attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, op=op)
    check_tensor(op, "grad_out", grad_out, dtypes=(q.dtype,), shape=tuple(q.shape))
    check_tensor(op, "out", out, dtypes=(q.dtype,), shape=tuple(q.shape))
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
        b, hq, sk, d = dk.shape
        dk = dk.view(b, hq // group, group, sk, d).sum(2)
        dv = dv.view(b, hq // group, group, sk, d).sum(2)
    return dq, dk, dv


def _varlen_slices(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        yield slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])


def _seq(x, rows):
    """[T, H, D] rows -> [1, H, S, D] (a view)."""
    return x[rows].transpose(0, 1).unsqueeze(0)


def _attention_fwd_reference(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap):
    out = torch.empty_like(q)  # q's layout (and so the fake kernel's)
    if cu_q is None:
        o, lse = reference_attention(q, k, v, bias, scale, wl, wr, softcap)
        out.copy_(o)
        return out, lse.contiguous()
    lse = torch.empty(_lse_shape(q, True), dtype=torch.float32, device=q.device)
    for rq, rk in _varlen_slices(cu_q, cu_k):
        o, l_ = reference_attention(_seq(q, rq), _seq(k, rk), _seq(v, rk), None, scale, wl, wr, softcap)
        out[rq] = o[0].transpose(0, 1)
        lse[:, rq] = l_[0]
    return out, lse


def _attention_bwd_reference(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale,
                             wl, wr, softcap):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if cu_q is None:
        g = reference_attention_bwd(grad_out, q, k, v, out, lse, bias, scale, wl, wr, softcap)
        for dst, src in zip((dq, dk, dv), g, strict=True):
            dst.copy_(src)
        return dq, dk, dv
    dk.zero_()
    dv.zero_()
    for rq, rk in _varlen_slices(cu_q, cu_k):
        g = reference_attention_bwd(
            _seq(grad_out, rq), _seq(q, rq), _seq(k, rk), _seq(v, rk), _seq(out, rq),
            lse[:, rq].unsqueeze(0), None, scale, wl, wr, softcap,
        )
        dq[rq] = g[0][0].transpose(0, 1)
        dk[rk] = g[1][0].transpose(0, 1)
        dv[rk] = g[2][0].transpose(0, 1)
    return dq, dk, dv


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
    check_attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    if _empty_problem(q, k):
        return _attention_fwd_reference(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    return _fwd_backends(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)


def _attention_bwd_impl(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap):
    args = (grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    check_attention_bwd(*args)
    if _empty_problem(q, k):
        return _attention_bwd_reference(*args)
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
    return torch.empty_like(q), lse


@torch.library.register_fake("leanops::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap):
    check_attention_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fwd_setup(ctx, inputs, output):
    q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap = inputs
    if bias is not None and bias.requires_grad:
        raise NotImplementedError(
            "leanops.attention: attn_mask/bias requires grad, but leanops attention does not "
            "compute a bias gradient; detach it (masks, ALiBi) or use "
            "F.scaled_dot_product_attention for a learned bias"
        )
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, wl, wr, softcap)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_out, grad_lse):
    # lse is an auxiliary output for the backward (and for users merging partial attentions);
    # it is not differentiated, as in flash-attention.
    if grad_out is None:
        return (None,) * 12
    q, k, v, out, lse, bias, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.leanops.attention_bwd.default(
        grad_out.contiguous(), q, k, v, out, lse, bias, cu_q, cu_k, *ctx.args
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("leanops::attention_fwd", _fwd_backward, setup_context=_fwd_setup)


def attention_fwd(q, k, v, bias=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
                  max_seqlen_k=0, scale=None, window_left=-1, window_right=-1, softcap=0.0):
    """The raw op leanops::attention_fwd, returning the log-sum-exp too; `leanops.attention` and
    `leanops.attention_varlen` are the friendly entry points. Differentiable in q, k, v.

    Arguments:
        q, k, v: dense [B, H, S, D] or, with cu_seqlens, varlen [T, H, D] (module docstring).
        bias: None or a float tensor broadcastable to [B, Hq, Sq, Sk] added to the scores (-inf
            masks); size-1 dims are read with stride 0. Dense only.
        cu_seqlens_q, cu_seqlens_k: None (dense) or int32 [B + 1] (varlen), given together.
        max_seqlen_q, max_seqlen_k: the longest sequences (varlen only; size the grid).
        scale: score multiplier, default 1 / sqrt(D).
        window_left, window_right: the sliding window in keys, inclusive, -1 = unbounded;
            causal is window_right = 0 (bottom-right aligned).
        softcap: 0 (off) or > 0: scores become softcap * tanh(s / softcap).

    Returns: (out, lse): out with q's shape and dtype; lse fp32, natural log, [B, Hq, Sq] dense
    or [Hq, Tq] varlen, -inf for rows that see no key (whose out is 0). lse gets no gradient.
    """
    if scale is None:
        scale = default_scale(q.shape[-1])
    return torch.ops.leanops.attention_fwd.default(
        q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(scale),
        int(window_left), int(window_right), float(softcap),
    )


# ---------------------------------------------------------------------------------------------
# Public functions


def _mask_to_bias(attn_mask, q, k):
    """SDPA's attn_mask (bool: True = may attend; float: added to the scores), of any shape
    broadcastable to [B, Hq, Sq, Sk], as the op's 4-D additive bias (size-1 dims stay size 1:
    the kernels read them with stride 0)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"{OP}: attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dim() > 4 or attn_mask.dim() < 1:
        raise ValueError(
            f"{OP}: attn_mask must be broadcastable to [B, Hq, Sq, Sk], got shape "
            f"{tuple(attn_mask.shape)}"
        )
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    if m.dtype == torch.bool:
        zero = torch.zeros((), dtype=q.dtype, device=m.device)
        m = torch.where(m, zero, torch.full((), float("-inf"), dtype=q.dtype, device=m.device))
    elif m.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{OP}: attn_mask must be bool (True = attend) or float (additive), got {m.dtype}"
        )
    return m


def _softcap_value(softcap):
    if softcap is None:
        return 0.0
    softcap = float(softcap)
    if not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"{OP}: softcap must be a positive float or None, got {softcap!r}")
    return softcap


def public_call_args(q, k, attn_mask, causal, scale, window, softcap):
    """(bias, scale, window_left, window_right, softcap) as the ops take them, from the public
    functions' (attn_mask, causal, scale, window, softcap); shared by attention and
    attention_int8 so both read their arguments alike."""
    wl, wr = normalize_window(causal, window)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return _mask_to_bias(attn_mask, q, k), float(scale), wl, wr, _softcap_value(softcap)


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
    F.scaled_dot_product_attention's layout. Differentiable in q, k and v.

    Arguments:
        q: [B, Hq, Sq, D] float16, bfloat16 or float32, any strides; D (head dim) 1 to 256.
        k, v: [B, Hkv, Sk, D], q's dtype and device. Hkv < Hq is GQA/MQA (Hq a multiple of Hkv;
            q head h reads kv head h // (Hq / Hkv)), never repeated in memory.
        attn_mask: None, or bool (True = may attend) or float (added to the scores), of a shape
            broadcastable to [B, Hq, Sq, Sk]. The slower general path (a mask tile is read per
            score tile); it gets no gradient (raises if it requires one).
        causal: mask keys after the query. Aligned bottom-right when Sq != Sk: query i is the
            token at position i + Sk - Sq, so the last query sees every key (flash-attention
            >= 2.1, a KV cache's convention). SDPA's is_causal aligns top-left instead; the two
            agree only when Sq == Sk.
        scale: the score multiplier; default 1 / sqrt(D).
        window: None, or (left, right): query i sees keys j with
            i + Sk - Sq - left <= j <= i + Sk - Sq + right, both ends inclusive, -1 = unbounded
            on that side; causal=True caps right at 0.
        softcap: None, or a positive float: scores become softcap * tanh(s / softcap) (Gemma 2),
            before the mask is added.

    Returns: [B, Hq, Sq, D] in q's dtype. A query row that sees no key (causal with Sq > Sk, a
    fully masked row) gets 0, as flash-attention (SDPA's math path gives NaN).

    Raises: ValueError naming the argument for a wrong shape, dtype, device, head dim, window or
    softcap. On CUDA tensors the Triton kernels run (sm_80+); on CPU tensors the fp32 PyTorch
    reference. See leanops.ops.attention for the exact definition.
    """
    bias, scale, wl, wr, cap = public_call_args(q, k, attn_mask, causal, scale, window, softcap)
    out, _ = attention_fwd(q, k, v, bias, scale=scale, window_left=wl, window_right=wr,
                           softcap=cap)
    return out


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
    """Attention over a batch of variable-length sequences packed along the first dim, without
    padding (flash-attention's varlen layout). Differentiable in q, k and v.

    Arguments:
        q: [Tq, Hq, D] float16, bfloat16 or float32: the B sequences' queries, one after another.
        k, v: [Tk, Hkv, D], q's dtype and device (GQA/MQA as in `attention`).
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1], starting at 0 and non-decreasing: sequence b
            is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q and cu_seqlens_k[b] ..
            cu_seqlens_k[b + 1] - 1 of k and v. Values are not checked (that would synchronise
            with the GPU).
        max_seqlen_q, max_seqlen_k: the longest query / key sequence. They size the launch grid:
            a value smaller than the truth leaves rows unwritten.
        causal, scale, window, softcap: as in `attention`, applied per sequence (causal and
            window aligned bottom-right within each sequence).

    Returns: [Tq, Hq, D] in q's dtype.

    Raises: ValueError naming the argument for a wrong shape, dtype or device.
    """
    _, scale, wl, wr, cap = public_call_args(q, k, None, causal, scale, window, softcap)
    out, _ = attention_fwd(q, k, v, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                           int(max_seqlen_k), scale, wl, wr, cap)
    return out
