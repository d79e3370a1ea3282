"""The Triton attention kernels compiled for the GPU (skipped without one).

What only a GPU shows: bf16, real tile configs and software pipelines, the autotuner, realistic
lengths and head dims (64/80/96/112/128/256), int64 offsets. Tolerance: flash-attention's rule,
against PyTorch's math SDPA in fp32 as the truth and in the input dtype as the baseline: error at
most 2x the baseline's plus a small floor. The broad sweep runs with LEANOPS_TRITON_AUTOTUNE=0
(one config per shape); every kept config is run once explicitly, and the autotuned path once.
Every output and gradient is allocated over poisoned memory (NaN where unwritten) and judged by
the rule (helpers.assert_2x_rule, which also fails on any non-finite value). The `sanitize` cases
are what bench/gpu_check.sh runs under compute-sanitizer, and they check their results too.
"""


import leanops
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_2x_rule, poisoned_memory
from leanops._layout import varlen_seq
from leanops.ops import attention as A
from leanops.ops import decode_attention as D
from torch.nn.attention import SDPBackend, sdpa_kernel

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.usefixtures("compiled_triton"),
    pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated"),
]

DEV = "cuda"
FLOOR = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _math(q, k, v, mask, scale, dtype):
    """PyTorch's math SDPA in `dtype` (the truth in fp32, the baseline in q's dtype)."""
    group = q.shape[1] // k.shape[1]
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(
            q.to(dtype), k.to(dtype).repeat_interleave(group, 1), v.to(dtype).repeat_interleave(group, 1),
            attn_mask=mask, scale=scale)


def assert_2x(got, ref, base, dtype, what):
    assert_2x_rule(got, ref, base, dtype, what=what, rel_floor=FLOOR[dtype], floor_scale=1e-3,
                   finite=True)


def check(b, hq, hkv, sq, sk, d, dtype, causal=False, window=None, grad=True):
    scale = d**-0.5
    q = torch.randn(b, hq, sq, d, device=DEV, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, device=DEV, dtype=dtype)
    wl, wr = A.normalize_window(causal, window)
    vis = A.visible(sq, sk, wl, wr, DEV)
    rows = vis.any(-1)
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    with leanops.use_backend("triton"), poisoned_memory():
        out = leanops.attention(*leaves, causal=causal, window=window)
    ref_leaves = [t.float().clone().requires_grad_(grad) for t in (q, k, v)]
    ref = _math(*ref_leaves, vis, scale, torch.float32)
    base_leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    base = _math(*base_leaves, vis, scale, dtype)
    assert_2x(out[:, :, rows], ref[:, :, rows], base[:, :, rows], dtype, "out")
    if grad:
        do = torch.randn_like(out)
        do[:, :, ~rows] = 0  # SDPA's NaN rows (no visible key) carry no gradient
        with leanops.use_backend("triton"), poisoned_memory():
            g = torch.autograd.grad(out, leaves, do)
        gr = torch.autograd.grad(ref, ref_leaves, do.float())
        gb = torch.autograd.grad(base, base_leaves, do)
        for name, x, r, bb in zip(("dq", "dk", "dv"), g, gr, gb, strict=True):
            if name == "dq":
                x, r, bb = x[:, :, rows], r[:, :, rows], bb[:, :, rows]
            assert_2x(x, r.nan_to_num(), bb.nan_to_num(), dtype, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 80, 96, 112, 128, 256])
@pytest.mark.parametrize("s,causal", [(127, False), (1024, True), (2048, False)])
def test_parity(no_autotune, dtype, d, s, causal):
    check(2, 8, 2, s, s, d, dtype, causal=causal)


@pytest.mark.parametrize("sq,sk", [(1, 4096), (16, 4096), (100, 1000), (1000, 100), (4096, 4097)])
def test_causal_unequal_lengths(no_autotune, sq, sk):
    check(1, 8, 1, sq, sk, 128, torch.bfloat16, causal=True)


@pytest.mark.parametrize("window", [(256, 0), (127, 64)])
def test_sliding_window(no_autotune, window):
    check(1, 4, 4, 2048, 2048, 128, torch.bfloat16, window=window)


def test_autotuned_path():
    check(1, 8, 8, 1000, 1000, 128, torch.bfloat16, causal=True)


@pytest.mark.slow
def test_every_kept_config_is_correct():
    """Each config keep() admits for one D=128 shape, run explicitly (forward, dK/dV, dQ), over
    poisoned memory, each held to the 2x rule against fp64 (PyTorch's bf16 math as baseline)."""
    from leanops.triton import attention as T

    dt, scale = torch.bfloat16, 128**-0.5
    q, k, v = (torch.randn(1, 4, 300, 128, device=DEV, dtype=dt) for _ in range(3))
    do = torch.randn_like(q)
    args = (None, None, None, 0, 0, scale, -1, 0, 0.0)  # bias, cu_q, cu_k, max_q, max_k, ...
    o64, l64 = A.reference_attention(q.double(), k.double(), v.double(), None, scale, -1, 0, 0.0,
                                     dtype=torch.float64)
    g64 = A.reference_attention_bwd(do.double(), q.double(), k.double(), v.double(), o64, l64,
                                    None, scale, -1, 0, 0.0, dtype=torch.float64)
    ob, lb = A.reference_attention(q, k, v, None, scale, -1, 0, 0.0, dtype=dt)
    gb = A.reference_attention_bwd(do, q, k, v, ob, lb, None, scale, -1, 0, 0.0, dtype=dt)
    ref, lse = A._attention_fwd_reference(q, k, v, *args)  # the backward's saved (out, lse)
    sb = T.seq_bucket(300)
    for kind, configs in (("fwd", T.FWD_CONFIGS), ("dkdv", T.DKDV_CONFIGS), ("dq", T.DQ_CONFIGS)):
        for i in sorted(T._kept(kind, 128, 2, sb, sb, q.device)):
            cfg = configs[i]
            with poisoned_memory():
                if kind == "fwd":
                    out, _ = T._fwd(q, k, v, *args, cfg=cfg, path="flash")
                else:
                    kw = {"cfg_dkdv" if kind == "dkdv" else "cfg_dq": cfg}
                    g = T._bwd(do, q, k, v, ref, lse, *args, **kw)
            torch.cuda.synchronize()
            if kind == "fwd":
                assert_2x(out, o64, ob, dt, f"out {cfg}")
                continue
            for name, x, r, rb in zip(("dq", "dk", "dv"), g, g64, gb, strict=True):
                assert_2x(x, r, rb, dt, f"{name} ({kind} forced to {cfg})")


def test_varlen_matches_padded(no_autotune):
    lens = [1, 517, 2048, 33]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    q = torch.randn(sum(lens), 8, 128, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens), 2, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    with leanops.use_backend("triton"):
        out = leanops.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True)
        for i in range(len(lens)):
            rows = slice(int(cu[i]), int(cu[i + 1]))
            want = leanops.attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)), causal=True)
            torch.testing.assert_close(out[rows], want[0].transpose(0, 1), rtol=0, atol=0)


def _paged(k, v, page):
    """The dense caches k [B, Hkv, S, D], v [B, Hkv, S, Dv] as a paged cache: pages
    [B*S/page, Hkv, page, D or Dv] in a random order, and the block table [B, S/page] that finds
    them."""
    b, hkv, s, _ = k.shape
    table = torch.randperm(b * s // page, device=k.device, dtype=torch.int32).view(b, s // page)

    def pages(x):
        out = torch.empty(b * s // page, hkv, page, x.shape[-1], device=x.device, dtype=x.dtype)
        out[table.long()] = x.view(b, hkv, s // page, page, x.shape[-1]).transpose(1, 2)
        return out

    return pages(k), pages(v), table


@pytest.mark.parametrize("paged", [False, True])
def test_decode_long_cache_gqa(no_autotune, paged):
    b, hq, hkv, d, s = 4, 32, 4, 128, 32768
    q = torch.randn(b, hq, 1, d, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, s, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([s, 1, 4097, 20000], device=DEV, dtype=torch.int32)
    kp, vp, table = _paged(k, v, 256) if paged else (k, v, None)
    with leanops.use_backend("triton"), poisoned_memory():
        out = leanops.attention_decode(q, kp, vp, lens, table)
    for i in range(b):
        n = int(lens[i])
        ref = _math(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], None, d**-0.5, torch.float32)
        base = _math(q[i : i + 1], k[i : i + 1, :, :n], v[i : i + 1, :, :n], None, d**-0.5, torch.bfloat16)
        assert_2x(out[i : i + 1], ref, base, torch.bfloat16, f"batch {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_error_against_fp32(dtype):
    """The int8 Q K^T variant's error against fp32 attention (SQNR, printed for the report;
    ~38-40 dB on CPU for random inputs, where exact fp16 attention is ~55 dB)."""
    q, k, v = (torch.randn(2, 16, 4096, 128, device=DEV, dtype=dtype) for _ in range(3))
    k = k + 0.5 * torch.randn(1, 16, 1, 128, device=DEV, dtype=dtype)  # a per-channel offset
    with torch.no_grad():
        got = leanops.attention_int8(q, k, v, causal=True)
        exact = leanops.attention(q, k, v, causal=True)
    ref = _math(q, k, v, A.visible(4096, 4096, -1, 0, DEV), 128**-0.5, torch.float32)

    def sqnr(x):
        return (20 * torch.log10(ref.norm() / (ref - x.float()).norm())).item()

    print(f"int8 QK ({dtype}): SQNR vs fp32 {sqnr(got):.1f} dB (exact kernel {sqnr(exact):.1f} dB), "
          f"max abs error {(got.float() - ref).abs().max().item():.3g}")
    assert sqnr(got) >= 33.0


def run_int8(q, k, v, cu=None, max_len=0, causal=False, window=None):
    """attention_int8 forward and backward on the Triton kernels (poisoned memory) against its
    definition in fp64 (int8 operands quantised from the same inputs; leanops.ops.int8_attention),
    the 2x rule against PyTorch evaluating the same definition in q's dtype (as
    tests/test_attention_int8.py does in the interpreter)."""
    from leanops.ops import int8_attention as I

    do = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with leanops.use_backend("triton"), poisoned_memory():
        if cu is None:
            out = leanops.attention_int8(*leaves, causal=causal, window=window)
        else:
            out = leanops.attention_int8_varlen(*leaves, cu, cu, max_len, max_len, causal=causal,
                                                window=window)
        got = (out, *torch.autograd.grad(out, leaves, do))
    torch.cuda.synchronize()
    wl, wr = A.normalize_window(causal, window)
    scale = q.shape[-1] ** -0.5
    refs = []
    for f in (torch.float64, q.dtype):
        o, lse = I.reference_attention_int8(q, k, v, None, cu, cu, scale, wl, wr, 0.0, True, f)
        refs.append((o, *I.reference_attention_int8_bwd(do, q, k, v, o, lse, None, cu, cu, scale,
                                                        wl, wr, 0.0, True, f)))
    for name, g, r, rb in zip(("out", "dq", "dk", "dv"), got, *refs, strict=True):
        assert_2x(g, r, rb, q.dtype, f"int8 {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal,window,hq,hkv,d", [(True, None, 8, 2, 128), (False, (64, 32), 4, 4, 64),
                                                   (True, None, 4, 1, 80)])
def test_int8_backward_matches_the_definition(no_autotune, dtype, causal, window, hq, hkv, d):
    """attention_int8's forward and backward in bf16/fp16 on realistic lengths (run_int8)."""
    q = torch.randn(2, hq, 1000, d, device=DEV, dtype=dtype)
    k, v = (torch.randn(2, hkv, 1037, d, device=DEV, dtype=dtype) for _ in range(2))
    run_int8(q, k, v, causal=causal, window=window)


@pytest.mark.slow
def test_int8_backward_every_kept_config_is_correct():
    """Every int8 backward config the keep() rules admit (the reduced axis' tile pinned to the
    format's 64) gives the default config's gradients (up to accumulation order)."""
    from leanops.triton import attention as T

    q, k, v, do = (torch.randn(1, 4, 777, 128, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    out, lse = torch.ops.leanops.attention_int8(q, k, v, None, None, None, 0, 0, 128**-0.5, -1, 0,
                                                0.0, True)
    args = (do, q, k, v, out, lse, None, None, None, 0, 0, 128**-0.5, -1, 0, 0.0, True)
    want = T.attention_int8_bwd(*args)
    meta = dict(BLOCK_D=128, BLOCK_DV=128, V=v, SQ_BUCKET=1024, SK_BUCKET=1024, HAS_BIAS=False, QK_INT8=True)
    for kind, kw in (("dkdv", "cfg_dkdv"), ("dq", "cfg_dq")):
        for i in sorted(T._kept_for(kind, meta)):
            with poisoned_memory():
                got = T.attention_int8_bwd(*args, **{kw: T._CONFIGS[kind][i]})
            for g, w in zip(got, want, strict=True):
                torch.testing.assert_close(g, w, rtol=0, atol=2e-2 * w.abs().max().item())


@pytest.mark.slow
def test_int64_offsets():
    """More than 2**31 elements per tensor: offsets computed in int32 would wrap."""
    b, h, s, d = 1, 64, 2**17 + 3, 256  # 64 * 131075 * 256 > 2**31 elements (4.3 GB per tensor)
    try:
        q = torch.randn(b, h, 16, d, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(b, h, s, d, device=DEV, dtype=torch.bfloat16)
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    k[:, :, -7:] = 0
    v = torch.zeros_like(k)
    v[:, :, -1] = 1.0  # the last key's value: only reachable through a 64-bit offset
    with torch.no_grad(), leanops.use_backend("triton"):
        out = leanops.attention(q, k, v, causal=True, window=(0, 0))  # query i sees key i + Sk - Sq
    assert torch.isfinite(out).all()
    assert (out[:, :, -1] == 1).all()


# --------------------------------------------------------------------------------------------
# Masks, softcap, varlen backward and windowed decode against an fp64 evaluation of the op's own
# definition (leanops.ops.attention.reference_attention), PyTorch's same-dtype math as baseline.


def run_general(q, k, v, attn_mask=None, causal=False, window=None, softcap=None, grad=True):
    """leanops.attention (Triton) forward and, if grad, backward over poisoned memory, each output
    held to the 2x rule; returns (out, grads)."""
    dt, scale = q.dtype, q.shape[-1] ** -0.5
    wl, wr = A.normalize_window(causal, window)
    bias = A._mask_to_bias(attn_mask, q, k)
    sc = softcap or 0.0
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    do = torch.randn(q.shape[:-1] + v.shape[-1:], device=q.device, dtype=q.dtype)  # like out
    with leanops.use_backend("triton"), poisoned_memory():
        out = leanops.attention(*leaves, attn_mask=attn_mask, causal=causal, window=window,
                                softcap=softcap)
        grads = torch.autograd.grad(out, leaves, do) if grad else None
    torch.cuda.synchronize()
    q64, k64, v64, do64 = (t.double() for t in (q, k, v, do))
    b64 = None if bias is None else bias.double()
    o64, l64 = A.reference_attention(q64, k64, v64, b64, scale, wl, wr, sc, dtype=torch.float64)
    ob, lb = A.reference_attention(q, k, v, bias, scale, wl, wr, sc, dtype=dt)
    assert_2x(out, o64, ob, dt, "out")
    if grad:
        g64 = A.reference_attention_bwd(do64, q64, k64, v64, o64, l64, b64, scale, wl, wr, sc,
                                        dtype=torch.float64)
        gb = A.reference_attention_bwd(do, q, k, v, ob, lb, bias, scale, wl, wr, sc, dtype=dt)
        for name, g, r, rb in zip(("dq", "dk", "dv"), grads, g64, gb, strict=True):
            assert_2x(g, r, rb, dt, name)
    return out, grads


def _qkv(b, hq, hkv, sq, sk, d, dtype=torch.bfloat16):
    return (torch.randn(b, h, s, d, device=DEV, dtype=dtype)
            for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_softcap(no_autotune, dtype):
    # scores up to ~20 with softcap 5: tanh is deep in saturation for many of them
    q, k, v = _qkv(2, 8, 2, 300, 300, 128, dtype)
    run_general(q * 2, k * 2, v, causal=True, softcap=5.0)


@pytest.mark.parametrize("kind", ["additive-per-head", "bool-broadcast", "key-padding"])
def test_masks_forward_and_backward(no_autotune, kind):
    b, h, sq, sk = 2, 4, 257, 301
    q, k, v = _qkv(b, h, h, sq, sk, 64)
    if kind == "additive-per-head":
        mask = torch.randn(b, h, sq, sk, device=DEV, dtype=torch.bfloat16)
    elif kind == "bool-broadcast":  # [Sq, Sk], True = attend
        mask = torch.rand(sq, sk, device=DEV) > 0.3
    else:  # [B, 1, 1, Sk], one batch entry blind (every key masked)
        mask = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=DEV)
        mask[0, ..., 200:] = False
        mask[1] = False
    out, grads = run_general(q, k, v, attn_mask=mask)
    if kind == "key-padding":
        assert (out[1] == 0).all() and (grads[1][:, :, 200:] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_backward(no_autotune, causal):
    lens = [1, 300, 0, 77]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEV, dtype=torch.int32)
    dt, d, scale = torch.bfloat16, 128, 128**-0.5
    q = torch.randn(sum(lens), 8, d, device=DEV, dtype=dt)
    k, v = (torch.randn(sum(lens), 2, d, device=DEV, dtype=dt) for _ in range(2))
    do = torch.randn_like(q)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with leanops.use_backend("triton"), poisoned_memory():
        out = leanops.attention_varlen(*leaves, cu, cu, max(lens), max(lens), causal=causal)
        grads = torch.autograd.grad(out, leaves, do)
    torch.cuda.synchronize()
    wl, wr = A.normalize_window(causal, None)
    want = {n: ([], []) for n in ("out", "dq", "dk", "dv")}
    for rq, rk in A._varlen_slices(cu, cu):
        sq_, sk_, sv_, sdo = (varlen_seq(t, r) for t, r in ((q, rq), (k, rk), (v, rk), (do, rq)))
        d64 = [t.double() for t in (sq_, sk_, sv_, sdo)]
        o64, l64 = A.reference_attention(*d64[:3], None, scale, wl, wr, 0.0, dtype=torch.float64)
        g64 = A.reference_attention_bwd(d64[3], *d64[:3], o64, l64, None, scale, wl, wr, 0.0,
                                        dtype=torch.float64)
        ob, lb = A.reference_attention(sq_, sk_, sv_, None, scale, wl, wr, 0.0, dtype=dt)
        gb = A.reference_attention_bwd(sdo, sq_, sk_, sv_, ob, lb, None, scale, wl, wr, 0.0,
                                       dtype=dt)
        for name, r, rb in zip(want, (o64, *g64), (ob, *gb), strict=True):
            want[name][0].append(r[0].transpose(0, 1))
            want[name][1].append(rb[0].transpose(0, 1))
    for name, got in zip(want, (out, *grads), strict=True):
        assert_2x(got, torch.cat(want[name][0]), torch.cat(want[name][1]), dt, name)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_with_window_and_softcap(no_autotune, paged):
    b, hq, hkv, sq, d, s = 3, 16, 4, 4, 128, 4096
    window, softcap, scale = (300, 0), 8.0, 128**-0.5
    q = torch.randn(b, hq, sq, d, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, s, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([s, sq, 1000], device=DEV, dtype=torch.int32)
    kp, vp, table = _paged(k, v, 64) if paged else (k, v, None)
    with leanops.use_backend("triton"), poisoned_memory():
        out = leanops.attention_decode(q, kp, vp, lens, table, window=window, softcap=softcap)
    torch.cuda.synchronize()
    wl, wr = A.normalize_window(True, window)
    for i in range(b):
        n = int(lens[i])
        kk, vv = k[i : i + 1, :, :n], v[i : i + 1, :, :n]
        o64, _ = A.reference_attention(q[i : i + 1].double(), kk.double(), vv.double(), None,
                                       scale, wl, wr, softcap, dtype=torch.float64)
        ob, _ = A.reference_attention(q[i : i + 1], kk, vv, None, scale, wl, wr, softcap,
                                      dtype=torch.bfloat16)
        assert_2x(out[i : i + 1], o64, ob, torch.bfloat16, f"batch {i}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,dv", [(192, 128), (64, 128)], ids=["d192-dv128", "d64-dv128"])
def test_value_head_dim_other_than_qk(no_autotune, dtype, d, dv):
    """Dv != D (DeepSeek's multi-head latent attention: 192/128), GQA, ragged lengths: forward
    and backward (the split BLOCK_D / BLOCK_DV tiles) against float64."""
    q = torch.randn(2, 8, 300, d, device=DEV, dtype=dtype)
    k = torch.randn(2, 2, 333, d, device=DEV, dtype=dtype)
    v = torch.randn(2, 2, 333, dv, device=DEV, dtype=dtype)
    out, grads = run_general(q, k, v, causal=True)
    assert out.shape == (2, 8, 300, dv) and grads[2].shape == v.shape


@pytest.mark.parametrize("paged", [False, True])
def test_decode_value_head_dim_other_than_qk(no_autotune, paged):
    b, hq, hkv, sq, d, dv, s = 3, 16, 4, 2, 192, 128, 4096
    scale = d**-0.5
    q = torch.randn(b, hq, sq, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(b, hkv, s, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(b, hkv, s, dv, device=DEV, dtype=torch.bfloat16)
    lens = torch.tensor([s, sq, 1000], device=DEV, dtype=torch.int32)
    kp, vp, table = _paged(k, v, 64) if paged else (k, v, None)
    with leanops.use_backend("triton"), poisoned_memory():
        out = leanops.attention_decode(q, kp, vp, lens, table)
    torch.cuda.synchronize()
    assert out.shape == (b, hq, sq, dv)
    wl, wr = A.normalize_window(True, None)
    for i in range(b):
        n = int(lens[i])
        kk, vv = k[i : i + 1, :, :n], v[i : i + 1, :, :n]
        o64, _ = A.reference_attention(q[i : i + 1].double(), kk.double(), vv.double(), None,
                                       scale, wl, wr, 0.0, dtype=torch.float64)
        ob, _ = A.reference_attention(q[i : i + 1], kk, vv, None, scale, wl, wr, 0.0,
                                      dtype=torch.bfloat16)
        assert_2x(out[i : i + 1], o64, ob, torch.bfloat16, f"batch {i}")


# --------------------------------------------------------------------------------------------
# compute-sanitizer's cases (bench/gpu_check.sh): small ragged shapes through every kernel,
# results checked too, one default config each (no autotuning: hundreds of compiles otherwise).


@pytest.mark.sanitize
@pytest.mark.parametrize("case", ["fwd-bwd", "varlen", "decode-paged", "bias", "int8", "int8-bwd",
                                  "int8-varlen"])
def test_sanitize_small(no_autotune, case):
    """Ragged small shapes through every kernel: compute-sanitizer looks for out-of-bounds and
    uninitialised accesses at the edges; the results are held to the same rules as above."""
    t = torch.bfloat16
    if case == "fwd-bwd":
        check(1, 4, 2, 37, 53, 80, t, causal=True)
    elif case == "varlen":
        cu = torch.tensor([0, 5, 5, 40], device=DEV, dtype=torch.int32)
        q, k, v = (torch.randn(40, 2, 64, device=DEV, dtype=t) for _ in range(3))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with leanops.use_backend("triton"), poisoned_memory():
            out = leanops.attention_varlen(*leaves, cu, cu, 35, 35, causal=True, window=(7, 0))
            grads = torch.autograd.grad(out.float().sum(), leaves)
        for rq, rk in A._varlen_slices(cu, cu):
            if rq.stop == rq.start:
                continue
            want = run_general(*(varlen_seq(x, r) for x, r in ((q, rq), (k, rk), (v, rk))),
                               causal=True, window=(7, 0), grad=False)[0]
            torch.testing.assert_close(out[rq], want[0].transpose(0, 1), rtol=0, atol=0)
        assert all(torch.isfinite(g).all() for g in grads)
    elif case == "decode-paged":
        q = torch.randn(2, 8, 3, 96, device=DEV, dtype=t)
        kp, vp = (torch.randn(9, 2, 16, 96, device=DEV, dtype=t) for _ in range(2))
        table = torch.tensor([[3, 1, 7], [0, 8, 2]], device=DEV, dtype=torch.int32)
        lens = torch.tensor([40, 17], device=DEV, dtype=torch.int32)
        with leanops.use_backend("triton"), poisoned_memory():
            out = leanops.attention_decode(q, kp, vp, lens, table)
        for i in range(2):
            kk, vv = D.gather_cache(kp, vp, lens, table, i)
            o64, _ = A.reference_attention(q[i : i + 1].double(), kk.double(), vv.double(), None,
                                           96**-0.5, -1, 0, 0.0, dtype=torch.float64)
            ob, _ = A.reference_attention(q[i : i + 1], kk, vv, None, 96**-0.5, -1, 0, 0.0, dtype=t)
            assert_2x(out[i : i + 1], o64, ob, t, f"batch {i}")
    elif case == "bias":
        q, k, v = _qkv(2, 2, 2, 29, 29, 32)
        run_general(q, k, v, attn_mask=torch.rand(2, 1, 29, 29, device=DEV) > 0.5)
    elif case == "int8":
        q, k, v = _qkv(1, 2, 2, 77, 77, 64)
        with torch.no_grad(), poisoned_memory():
            got = leanops.attention_int8(q, k, v, causal=True)
        o64, _ = A.reference_attention(q.double(), k.double(), v.double(), None, 64**-0.5, -1, 0,
                                       0.0, dtype=torch.float64)
        sqnr = 20 * torch.log10(o64.norm() / (o64 - got.double()).norm())
        assert torch.isfinite(got).all() and sqnr > 33.0, f"int8 attention SQNR {sqnr:.1f} dB"
    elif case == "int8-bwd":
        run_int8(*_qkv(1, 4, 2, 77, 53, 64), causal=True)
    else:  # int8-varlen
        cu = torch.tensor([0, 5, 5, 140], device=DEV, dtype=torch.int32)
        run_int8(*(torch.randn(140, 4, 80, device=DEV, dtype=t) for _ in range(3)), cu=cu,
                 max_len=135, causal=True, window=(70, 0))
    torch.cuda.synchronize()
