"""Accuracy rule and runners shared by the attention tests of every path that runs here (the
Triton kernels in the interpreter, test_attention_triton.py; the CPU path, test_attention_cpu.py),
so all are held to one bar: flash-attention's rule (DESIGN.md). The error against an fp64
evaluation of the op's definition (leanops.ops.attention.reference_*, called directly, never
through the dispatcher: the truth is never the thing under test) is at most 2x the error of the
same math done by PyTorch in the input dtype, plus a floor of one ulp of the dtype at 1.0 (1e-5 for
fp32) relative to the largest reference value. Outputs are poisoned (NaN-filled torch.empty) so an
unwritten element cannot pass by luck.
"""

import leanops
import torch
from helpers import assert_2x_rule, poisoned_memory
from leanops import ops
from leanops._layout import varlen_seq
from leanops.ops import attention as A

FLOOR = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 1e-5}


def assert_2x(got, ref64, base, dtype, what):
    # The floor is relative to the output's magnitude, but not below 1/20 of the O(1) inputs'
    # scale: a gradient that is exactly zero (dq with a single visible key) is computed from
    # cancelling O(1) terms, and its rounding noise is relative to those, not to zero.
    assert_2x_rule(got, ref64, base, dtype, what=what, rel_floor=FLOOR[dtype], floor_scale=0.05,
                   finite=True)


def dense_refs(q, k, v, do, bias, scale, wl, wr, softcap):
    """fp64 truth and PyTorch's same-dtype math: (out, lse, grads) each."""
    d64 = [t.double() for t in (q, k, v, do)]
    b64 = bias.double() if bias is not None else None
    o64, l64 = A.reference_attention(*d64[:3], b64, scale, wl, wr, softcap, dtype=torch.float64)
    g64 = A.reference_attention_bwd(d64[3], *d64[:3], o64, l64, b64, scale, wl, wr, softcap,
                                    dtype=torch.float64)
    ob, lb = A.reference_attention(q, k, v, bias, scale, wl, wr, softcap, dtype=q.dtype)
    gb = A.reference_attention_bwd(do, q, k, v, ob, lb, bias, scale, wl, wr, softcap, dtype=q.dtype)
    return (o64, l64, g64), (ob, gb)


def check_lse(lse, l64):
    assert torch.equal(torch.isinf(lse), torch.isinf(l64)), "rows that see no key must have lse -inf"
    fin = torch.isfinite(l64)
    if fin.any():
        err = (lse[fin].double() - l64[fin]).abs().max().item()
        assert err <= 1e-4 * (1 + l64[fin].abs().max().item()), f"lse error {err:.3g}"


def run_dense(backend, b, hq, hkv, sq, sk, d, dtype, wl=-1, wr=-1, softcap=0.0, bias=None,
              grad=True, layout="contiguous", dv=None):
    """leanops::attention_fwd and its backward on `backend` (None: the automatic choice, the CPU
    path for CPU tensors) against the rule; dv: the value head dim (default d)."""
    scale = d**-0.5
    dv = d if dv is None else dv
    if layout == "bshd":  # [B, S, H, D] memory seen as [B, H, S, D] (HF / MHA projections)
        q = torch.randn(b, sq, hq, d).to(dtype).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d).to(dtype).transpose(1, 2)
        v = torch.randn(b, sk, hkv, dv).to(dtype).transpose(1, 2)
    else:
        q, k = (torch.randn(b, h, s, d).to(dtype) for h, s in ((hq, sq), (hkv, sk)))
        v = torch.randn(b, hkv, sk, dv).to(dtype)
    do = torch.randn(b, hq, sq, dv).to(dtype)
    qq, kk, vv = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    with leanops.use_backend(backend), poisoned_memory():
        out, lse = ops.attention_fwd(qq, kk, vv, bias, scale=scale, window_left=wl,
                                     window_right=wr, softcap=softcap)
        grads = torch.autograd.grad(out, (qq, kk, vv), do) if grad else None
    assert out.shape == (b, hq, sq, dv)
    if dv == d:
        assert out.stride() == q.stride(), "the output keeps q's layout"
    (o64, l64, g64), (ob, gb) = dense_refs(q, k, v, do, bias, scale, wl, wr, softcap)
    assert_2x(out, o64, ob, dtype, "out")
    check_lse(lse, l64)
    if grad:
        for name, g, r, rb in zip(("dq", "dk", "dv"), grads, g64, gb, strict=True):
            assert_2x(g, r, rb, dtype, name)
    return out, lse, grads


def run_varlen(backend, lens_q, lens_k, hq, hkv, d, dtype, causal, dv=None):
    """leanops.attention_varlen and its backward on `backend`, each sequence against the rule."""
    dv, scale = d if dv is None else dv, d**-0.5
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), hq, d).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d).to(dtype)
    v = torch.randn(sum(lens_k), hkv, dv).to(dtype)
    do = torch.randn(sum(lens_q), hq, dv).to(dtype)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    wr = 0 if causal else -1
    with leanops.use_backend(backend), poisoned_memory():
        out = ops.attention_varlen(qq, kk, vv, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
        dq, dk, dvv = torch.autograd.grad(out, (qq, kk, vv), do)
    parts = {n: ([], []) for n in ("o", "dq", "dk", "dv")}
    for rq, rk in A._varlen_slices(cu_q, cu_k):
        (o64, _, g64), (ob, gb) = dense_refs(varlen_seq(q, rq), varlen_seq(k, rk), varlen_seq(v, rk), varlen_seq(do, rq),
                                             None, scale, -1, wr, 0.0)
        for n, r, rb in zip(("o", "dq", "dk", "dv"), (o64, *g64), (ob, *gb), strict=True):
            parts[n][0].append(r[0].transpose(0, 1))
            parts[n][1].append(rb[0].transpose(0, 1))
    for n, got in zip(("o", "dq", "dk", "dv"), (out, dq, dk, dvv), strict=True):
        assert_2x(got, torch.cat(parts[n][0]), torch.cat(parts[n][1]), dtype, n)


def paged_cache(k_dense, v_dense, page):
    """Scatter dense caches [B, Hkv, S, D] / [B, Hkv, S, Dv] into shuffled pages
    [P, Hkv, page, D] / [P, Hkv, page, Dv] (garbage in unused slots); returns the block table."""
    b, hkv, s, d = k_dense.shape
    per = (s + page - 1) // page
    total = b * per + 3
    perm = torch.randperm(total)[: b * per].view(b, per)
    kp = torch.randn(total, hkv, page, d).to(k_dense.dtype)
    vp = torch.randn(total, hkv, page, v_dense.shape[-1]).to(k_dense.dtype)
    for i in range(b):
        for j in range(per):
            rows = slice(j * page, min((j + 1) * page, s))
            n = rows.stop - rows.start
            kp[perm[i, j], :, :n] = k_dense[i, :, rows]
            vp[perm[i, j], :, :n] = v_dense[i, :, rows]
    return kp, vp, perm.to(torch.int32)


def run_decode(backend, paged, page, dv, dtype=torch.float16):
    """leanops.attention_decode on `backend` over a dense or paged cache of three sequences
    (one of length 1), each against the rule, and against the definition run through the op."""
    b, hq, hkv, sq, s_max, d = 3, 8, 2, 2, 60, 32
    lens = torch.tensor([60, 1, 37], dtype=torch.int32)
    q = torch.randn(b, hq, sq, d).to(dtype)
    k = torch.randn(b, hkv, s_max, d).to(dtype)
    v = torch.randn(b, hkv, s_max, dv).to(dtype)
    cache = (k, v, lens, None)
    if paged:
        kp, vp, table = paged_cache(k, v, page)
        cache = (kp, vp, lens, table)
    with leanops.use_backend(backend), poisoned_memory():
        out = leanops.attention_decode(q, *cache)
    assert out.shape == (b, hq, sq, dv)
    for i in range(b):
        n = int(lens[i])
        kk, vv = k[i : i + 1, :, :n], v[i : i + 1, :, :n]
        o64, _ = A.reference_attention(q[i : i + 1].double(), kk.double(), vv.double(), None,
                                       d**-0.5, -1, 0, 0.0, dtype=torch.float64)
        ob, _ = A.reference_attention(q[i : i + 1], kk, vv, None, d**-0.5, -1, 0, 0.0,
                                      dtype=dtype)
        assert_2x(out[i : i + 1], o64, ob, dtype, f"batch {i}")
    with leanops.use_backend("reference"):
        ref = leanops.attention_decode(q, *cache)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)
