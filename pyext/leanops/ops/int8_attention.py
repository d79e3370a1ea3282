"""leanops::attention_int8 and leanops::attention_int8_bwd: attention with Q K^T in int8, forward
and backward, for inference and training.

Ops (namespace leanops; fake kernels, argument checks naming the argument, a PyTorch reference
that is the CPU path and the definition, Triton kernels):

  attention_int8(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 scale, window_left, window_right, softcap, smooth_k) -> (out, lse)
  attention_int8_bwd(grad_out, q, k, v, out, lse, <same arguments>) -> (dq, dk, dv)

Arguments, layouts (dense or varlen, GQA/MQA), masks and scores are leanops.ops.attention's;
attention_int8 has attention_int8_bwd as its registered autograd, so torch.compile traces
forward and backward without a graph break.

The definition (the reference computes it in fp32; the kernels follow it):
  Q and K as leanops.quant.int8.quantize_qk makes them (K smoothed by its mean if smooth_k, Q and
  K balanced per channel by powers of two, int8 per QK_BLOCK rows): Qd = dequantised Q (q / b),
  Kd = dequantised K ((k - mean) * b); softcap, bias and masks as in attention.
  forward   S = Qd Kd^T * scale, P = softmax(S), out = P V (P V in v's dtype), lse = logsumexp(S).
  backward  FA2's five products, chosen from measured gradient error (bench/NOTES.md, "int8
            attention that trains"):
              S  = Qd Kd^T         recomputed from the same int8 codes, so P is the forward's (a
                                   16-bit S against the int8 forward's lse: dQ error 1.8-3.6%
                                   instead of 1.3%, 10^4 % once keys share an offset)
              dP = dO V^T          16-bit (as SageBwd found: in int8 it adds the most error once
                                   keys share an offset, dQ 1.5 -> 4.4% at S = 1024)
              dV = P^T dO          int8: P per (key, QK_BLOCK queries), dO per QK_BLOCK rows
              dQ = dS Kd * scale   int8: dS per (query, QK_BLOCK keys), Kd the forward's codes
              dK = dS^T Qd * scale int8: dS^T per (key, QK_BLOCK queries), Qd the forward's codes
            dS = P * (dP - rowsum(dO * out)) (times 1 - tanh^2 through softcap); then dq = dQ / b,
            dk = dK * b (the balance, exact); GQA sums dK, dV over a kv head's q heads.
            The quantisation is treated as the identity (straight-through): this is the gradient
            of the forward's function of Qd, Kd, V, and K's mean drops out exactly (every row of
            dS sums to zero).
Rows that see no key give out 0, lse -inf and zero gradients (no NaN). The Triton backward writes
every dQ row from one program (no atomics): dq is deterministic, as in leanops.attention, with
nothing to switch on.
"""

from __future__ import annotations

import torch

from leanops._layout import empty_like_layout, varlen_seq
from leanops.dispatch import OpBackends
from leanops.ops._library import register
from leanops.ops.attention import (
    _ARGS,
    _empty_problem,
    _lse_shape,
    _mask_to_bias,
    _safe_lse,
    _softcap_value,
    _varlen_slices,
    check_attention_bwd,
    check_attention_fwd,
    normalize_window,
    out_shape,
    reference_attention,
    reference_scores,
    register_attention_autograd,
    resolve_scale,
    sdpa_inputs,
    sdpa_output,
)
from leanops.quant import int8 as int8_format

OP = "leanops.attention_int8"
BWD_OP = "leanops.attention_int8_bwd"

# ---------------------------------------------------------------------------------------------
# Reference (the definition)


def _dequantized_qk(q, k, smooth_k, cu_q=None, cu_k=None):
    """(Qd, Kd, balance): fp32 dequantised int8 Q and K in q's and k's layouts (dense or varlen)
    and the per-channel balance [B, Hkv, D] (see leanops.quant.int8.quantize_qk)."""
    c = int8_format.quantize_qk(q, k, smooth_k, cu_q, cu_k)
    return (int8_format.dequantize_qk(c.q_codes, c.q_scale, cu_q),
            int8_format.dequantize_qk(c.k_codes, c.k_scale, cu_k), c.balance)


def reference_attention_int8(q, k, v, bias, cu_q, cu_k, scale, wl, wr, softcap, smooth_k,
                             dtype=torch.float32):
    """The definition's forward: leanops.ops.attention's reference on the dequantised int8 Q, K.

    q, k, v, bias, cu_q, cu_k, scale, wl, wr, softcap: as leanops::attention_int8 takes them
        (dense [B, H, S, D] or varlen [T, H, D] with cu_q/cu_k int32 [B + 1] and bias None).
    smooth_k: bool, as the op. dtype: what the math runs in (default float32; tests use
        float64 for the truth and the inputs' dtype for the 2x rule's baseline).
    Returns (out in `dtype`, q's shape; lse in `dtype`, [B, H, S] or [H, T]).
    """
    qd, kd, _ = _dequantized_qk(q, k, smooth_k, cu_q, cu_k)
    if cu_q is None:
        return reference_attention(qd, kd, v, bias, scale, wl, wr, softcap, dtype)
    out = torch.zeros(out_shape(q, v), dtype=dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, True), dtype=dtype, device=q.device)
    for rq, rk in _varlen_slices(cu_q, cu_k):
        o, l_ = reference_attention(varlen_seq(qd, rq), varlen_seq(kd, rk), varlen_seq(v, rk), None, scale, wl, wr,
                                    softcap, dtype)
        out[rq] = o[0].transpose(0, 1)
        lse[:, rq] = l_[0]
    return out, lse


def _attention_int8_reference(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap,
                              smooth_k):
    o, lse = reference_attention_int8(q, k, v, bias, cu_q, cu_k, scale, wl, wr, softcap, smooth_k)
    out = empty_like_layout(q, out_shape(q, v))  # q's layout and dtype
    out.copy_(o)
    return out, lse.float().contiguous()


def _bwd_math(grad_out, grad_out_d, qd, kd, balance, v, out, lse, bias, scale, wl, wr, softcap,
              dtype=torch.float32):
    """(dq, dk, dv) in `dtype` of the definition's backward (module docstring) for dense
    [B, H, S, D] tensors whose int8 operands are already dequantised: qd, kd (the forward's Q and
    K), grad_out_d (dO's int8 copy, used by dV); balance [B, Hkv, D]. The int8 rounding of P and
    dS happens here (leanops.quant.int8.fake_quantize_row_tiles) on values computed in `dtype`."""
    f = dtype
    s, t = reference_scores(qd, kd, bias, scale, wl, wr, softcap, f)
    p = torch.exp(s - _safe_lse(lse.to(f))[..., None])  # rows that see nothing: all zeros
    group = qd.shape[1] // kd.shape[1]

    def rep(x):
        x = x.to(f)
        return x.repeat_interleave(group, dim=1) if group > 1 else x

    kf, vf, bal = rep(kd), rep(v), rep(balance)[:, :, None]

    def fq(x):  # P / dS rounded to int8 per row tile, then back in `dtype`
        return int8_format.fake_quantize_row_tiles(x).to(f)

    do = grad_out.to(f)
    dv = fq(p.transpose(-1, -2)) @ grad_out_d.to(f)
    dp = do @ vf.transpose(-1, -2)
    ds = p * (dp - (do * out.to(f)).sum(-1, keepdim=True))
    if t is not None:
        ds = ds * (1 - t * t)
    dq = (fq(ds) @ kf) * scale / bal
    dk = (fq(ds.transpose(-1, -2)) @ qd.to(f)) * scale * bal
    if group > 1:
        b, hq, sk = dk.shape[:3]
        dk = dk.view(b, hq // group, group, sk, dk.shape[-1]).sum(2)
        dv = dv.view(b, hq // group, group, sk, dv.shape[-1]).sum(2)
    return dq, dk, dv


def reference_attention_int8_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, scale, wl, wr,
                                 softcap, smooth_k, dtype=torch.float32):
    """The definition's backward (module docstring): int8 operands quantised from q, k and
    grad_out exactly as the kernels do, the rest computed in `dtype`.

    grad_out: q's shape. q, k, v, bias, cu_q, cu_k, scale, wl, wr, softcap, smooth_k: as the op.
    out, lse: the forward's (any float dtype: they are converted to `dtype`).
    dtype: what the math runs in (default float32; tests: float64 as the truth, the inputs'
        dtype as "PyTorch's same-dtype implementation").
    Returns (dq, dk, dv) in `dtype`, shaped as q, k, v.
    """
    qd, kd, balance = _dequantized_qk(q, k, smooth_k, cu_q, cu_k)
    dod = int8_format.dequantize_qk(*int8_format.quantize_blocks(grad_out, cu_q), cu_q)
    if cu_q is None:
        return _bwd_math(grad_out, dod, qd, kd, balance, v, out, lse, bias, scale, wl, wr,
                         softcap, dtype)
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)
    dk = torch.zeros(k.shape, dtype=dtype, device=q.device)
    dv = torch.zeros(v.shape, dtype=dtype, device=q.device)
    for b, (rq, rk) in enumerate(_varlen_slices(cu_q, cu_k)):
        g = _bwd_math(
            varlen_seq(grad_out, rq), varlen_seq(dod, rq), varlen_seq(qd, rq), varlen_seq(kd, rk), balance[b : b + 1],
            varlen_seq(v, rk), varlen_seq(out, rq), lse[:, rq].unsqueeze(0), None, scale, wl, wr, softcap,
            dtype,
        )
        dq[rq] = g[0][0].transpose(0, 1)
        dk[rk] = g[1][0].transpose(0, 1)
        dv[rk] = g[2][0].transpose(0, 1)
    return dq, dk, dv


def _attention_int8_bwd_reference(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k,
                                  scale, wl, wr, softcap, smooth_k):
    g = reference_attention_int8_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, scale, wl, wr,
                                     softcap, smooth_k)
    grads = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for dst, src in zip(grads, g, strict=True):
        dst.copy_(src)
    return grads


# ---------------------------------------------------------------------------------------------
# The ops


_fwd_backends = OpBackends(
    "attention_int8",
    reference=_attention_int8_reference,
    triton="leanops.triton.attention:attention_int8",
)
_bwd_backends = OpBackends(
    "attention_int8_bwd",
    reference=_attention_int8_bwd_reference,
    triton="leanops.triton.attention:attention_int8_bwd",
)


def _attention_int8_impl(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap,
                         smooth_k):
    args = (q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    check_attention_fwd(*args, op=OP)
    if _empty_problem(q, k):
        return _attention_int8_reference(*args, smooth_k)
    return _fwd_backends(*args, smooth_k)


def _attention_int8_bwd_impl(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale,
                             wl, wr, softcap, smooth_k):
    args = (grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap)
    check_attention_bwd(*args, op=BWD_OP)
    if _empty_problem(q, k):
        return _attention_int8_bwd_reference(*args, smooth_k)
    return _bwd_backends(*args, smooth_k)


register("attention_int8",
         f"(Tensor q, Tensor k, Tensor v, {_ARGS}, bool smooth_k) -> (Tensor, Tensor)",
         _attention_int8_impl)
register(
    "attention_int8_bwd",
    f"(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_ARGS}, "
    "bool smooth_k) -> (Tensor, Tensor, Tensor)",
    _attention_int8_bwd_impl,
)


@torch.library.register_fake("leanops::attention_int8")
def _attention_int8_fake(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap,
                         smooth_k):
    check_attention_fwd(q, k, v, bias, cu_q, cu_k, max_q, max_k, scale, wl, wr, softcap, op=OP)
    lse = q.new_empty(_lse_shape(q, cu_q is not None), dtype=torch.float32)
    return empty_like_layout(q, out_shape(q, v)), lse


@torch.library.register_fake("leanops::attention_int8_bwd")
def _attention_int8_bwd_fake(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale,
                             wl, wr, softcap, smooth_k):
    check_attention_bwd(grad_out, q, k, v, out, lse, bias, cu_q, cu_k, max_q, max_k, scale, wl,
                        wr, softcap, op=BWD_OP)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


register_attention_autograd("attention_int8", "attention_int8_bwd", "leanops.attention_int8")


# ---------------------------------------------------------------------------------------------
# Public functions


def attention_int8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float | None = None,
    smooth_k: bool = True,
) -> torch.Tensor:
    """Attention with Q K^T in int8 and P V in v's dtype (SageAttention-style), differentiable
    in q, k and v with an int8 backward: the definition, which backward products run in int8
    and why are in leanops.ops.int8_attention. Q and K are quantised per block of
    leanops.quant.int8.QK_BLOCK rows after K's mean is subtracted (smooth_k) and both are balanced
    per channel by powers of two (leanops.quant.int8.quantize_qk): an approximation of
    `leanops.attention`, whose gradient error is measured in bench/NOTES.md ("int8 attention").

    Args:
        q, k, v: as in `leanops.attention` (its layouts, GQA/MQA and Dv != D), float16, bfloat16
            or float32 (P V runs in it).
        attn_mask: None (default), or bool (True = may attend) or additive float, broadcastable
            to [*, Hq, Sq, Sk]; not differentiable (requires_grad raises).
        causal, scale, window, softcap: as in `leanops.attention` (defaults False, None =
            1/sqrt(D), None, None; causal bottom-right aligned).
        smooth_k: True (default): subtract K's mean over the sequence before quantising it
            (softmax-invariant; keeps a shared key offset out of the int8 grid); False: don't.

    Returns:
        out [*, Hq, Sq, Dv] in q's dtype (q's layout for 4-D inputs). A row that sees no key
        gets 0 and zero gradients.

    Raises:
        ValueError: a shape, dtype, device, window, scale or softcap outside the above, naming
            the argument (the checks of `leanops.attention`).
        TypeError: an argument that is not a Tensor where one is required.
        NotImplementedError: attn_mask requires grad.

    Backends: Triton kernels on CUDA tensors (sm_80+); on CPU tensors the PyTorch reference,
    which computes the kernels' int8 numerics (the same codes and scales).
    """
    q, k, v, batch, dims = sdpa_inputs(OP, q, k, v)
    wl, wr = normalize_window(causal, window)
    bias = _mask_to_bias(attn_mask, q, k, batch)
    out, _ = torch.ops.leanops.attention_int8.default(
        q, k, v, bias, None, None, 0, 0, resolve_scale(OP, scale, q), wl, wr,
        _softcap_value(softcap), bool(smooth_k))
    return sdpa_output(out, batch, dims)


def attention_int8_varlen(
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
    smooth_k: bool = True,
) -> torch.Tensor:
    """`attention_int8` over a batch of variable-length sequences packed along the first dim,
    without padding (as `leanops.attention_varlen`); K's mean, the balance and the block scales
    are per sequence. Differentiable in q, k and v.

    Args:
        q, k, v: [Tq, Hq, D], [Tk, Hkv, D], [Tk, Hkv, Dv] as in `leanops.attention_varlen`,
            float16, bfloat16 or float32.
        cu_seqlens_q, cu_seqlens_k: int32 [B + 1], starting at 0: sequence b is rows
            cu_seqlens_q[b] to cu_seqlens_q[b + 1] of q (cu_seqlens_k: of k and v).
        max_seqlen_q, max_seqlen_k: ints >= 0, the longest sequences (size the launch grid; a
            smaller value than the truth leaves rows unwritten).
        causal, scale, window, softcap: as in `leanops.attention`, per sequence.
        smooth_k: as in `attention_int8` (default True).

    Returns:
        out [Tq, Hq, Dv] in q's dtype.

    Raises:
        ValueError: a shape, dtype or argument outside the above, naming it.
    """
    wl, wr = normalize_window(causal, window)
    out, _ = torch.ops.leanops.attention_int8.default(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
        resolve_scale(OP, scale, q), wl, wr, _softcap_value(softcap), bool(smooth_k))
    return out
