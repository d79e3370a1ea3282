"""The Triton attention kernels compiled for the GPU (skipped without one).

What only a GPU shows: bf16, real tile configs and software pipelines, the autotuner, realistic
lengths and head dims (64/80/96/112/128/256), int64 offsets. Tolerance: flash-attention's rule,
against PyTorch's math SDPA in fp32 as the truth and in the input dtype as the baseline: error at
most 2x the baseline's plus a small floor. The broad sweep runs with LEANOPS_TRITON_AUTOTUNE=0
(one config per shape); every kept config is run once explicitly, and the autotuned path once.
The `sanitize` cases are what bench/gpu_check.sh runs under compute-sanitizer.
"""


import leanops
import pytest
import torch
import torch.nn.functional as F
from leanops.ops import attention as A
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
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got.float() - ref).abs().max().item()
    b = (base.float() - ref).abs().max().item()
    floor = FLOOR[dtype] * max(ref.abs().max().item(), 1e-3)
    assert err <= 2 * b + floor, f"{what}: error {err:.3g} vs PyTorch {dtype} {b:.3g} (+ floor {floor:.3g})"


def check(b, hq, hkv, sq, sk, d, dtype, causal=False, window=None, grad=True):
    scale = d**-0.5
    q = torch.randn(b, hq, sq, d, device=DEV, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, device=DEV, dtype=dtype)
    wl, wr = A.normalize_window(causal, window)
    vis = A.visible(sq, sk, wl, wr, DEV)
    rows = vis.any(-1)
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    with leanops.use_backend("triton"):
        out = leanops.attention(*leaves, causal=causal, window=window)
    ref_leaves = [t.float().clone().requires_grad_(grad) for t in (q, k, v)]
    ref = _math(*ref_leaves, vis, scale, torch.float32)
    base_leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
    base = _math(*base_leaves, vis, scale, dtype)
    assert_2x(out[:, :, rows], ref[:, :, rows], base[:, :, rows], dtype, "out")
    if grad:
        do = torch.randn_like(out)
        do[:, :, ~rows] = 0  # SDPA's NaN rows (no visible key) carry no gradient
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


def test_every_kept_config_is_correct(monkeypatch):
    """Each config keep() admits for one D=128 shape, run explicitly (forward, dK/dV, dQ)."""
    from leanops.triton import attention as T

    q, k, v = (torch.randn(1, 4, 300, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    ref, lse = A._attention_fwd_reference(q, k, v, None, None, None, 0, 0, 128**-0.5, -1, 0, 0.0)
    do = torch.randn_like(q)
    gref = A._attention_bwd_reference(do, q, k, v, ref, lse, None, None, None, 0, 0, 128**-0.5, -1, 0, 0.0)
    sb = T.seq_bucket(300)
    for kind, configs in (("fwd", T.FWD_CONFIGS), ("dkdv", T.DKDV_CONFIGS), ("dq", T.DQ_CONFIGS)):
        for i in sorted(T._kept(kind, 128, 2, sb, sb, q.device)):
            cfg = configs[i]
            if kind == "fwd":
                out, _ = T._fwd(q, k, v, None, None, None, 0, 0, 128**-0.5, -1, 0, 0.0, cfg=cfg, path="flash")
                torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=2e-2, msg=str(cfg))
            else:
                kw = {"cfg_dkdv" if kind == "dkdv" else "cfg_dq": cfg}
                g = T._bwd(do, q, k, v, ref, lse, None, None, None, 0, 0, 128**-0.5, -1, 0, 0.0, **kw)
                for x, r in zip(g, gref, strict=True):
                    torch.testing.assert_close(x.float(), r.float(), rtol=0, atol=5e-2, msg=str(cfg))


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


@pytest.mark.parametrize("paged", [False, True])
def test_decode_long_cache_gqa(no_autotune, paged):
    b, hq, hkv, d, s = 4, 32, 4, 128, 32768
    q = torch.randn(b, hq, 1, d, device=DEV, dtype=torch.bfloat16)
    k, v = (torch.randn(b, hkv, s, d, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([s, 1, 4097, 20000], device=DEV, dtype=torch.int32)
    cache = (k, v, lens, None)
    if paged:
        page = 256
        table = torch.randperm(b * s // page, device=DEV, dtype=torch.int32).view(b, s // page)
        kp = torch.empty(b * s // page, hkv, page, d, device=DEV, dtype=torch.bfloat16)
        vp = torch.empty_like(kp)
        kp[table.long()] = k.view(b, hkv, s // page, page, d).transpose(1, 2)
        vp[table.long()] = v.view(b, hkv, s // page, page, d).transpose(1, 2)
        cache = (kp, vp, lens, table)
    with leanops.use_backend("triton"):
        out = leanops.attention_decode(q, *cache)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal,window,hq,hkv,d", [(True, None, 8, 2, 128), (False, (64, 32), 4, 4, 64),
                                                   (True, None, 4, 1, 80)])
def test_int8_backward_matches_the_definition(dtype, causal, window, hq, hkv, d):
    """attention_int8's forward and backward in bf16/fp16 against the definition in fp64 (int8
    operands quantised from the same inputs; leanops.ops.int8_attention), the 2x rule against
    PyTorch evaluating the same definition in the input dtype (see tests/test_attention_int8.py)."""
    from leanops.ops import int8_attention as I

    b, sq, sk = 2, 1000, 1037
    q, k, v, do = (torch.randn(b, h, s, d, device=DEV, dtype=dtype)
                   for h, s in ((hq, sq), (hkv, sk), (hkv, sk), (hq, sq)))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with leanops.use_backend("triton"):
        out = leanops.attention_int8(*leaves, causal=causal, window=window)
        got = (out, *torch.autograd.grad(out, leaves, do))
    wl, wr = A.normalize_window(causal, window)
    refs = []
    for f in (torch.float64, dtype):
        o, lse = I.reference_attention_int8(q, k, v, None, None, None, d**-0.5, wl, wr, 0.0, True, f)
        refs.append((o, *I.reference_attention_int8_bwd(do, q, k, v, o, lse, None, None, None,
                                                        d**-0.5, wl, wr, 0.0, True, f)))
    for name, g, r, rb in zip(("out", "dq", "dk", "dv"), got, *refs, strict=True):
        assert_2x(g, r, rb, dtype, name)


def test_int8_backward_every_kept_config():
    """Every int8 backward config the keep() rules admit (BLOCK_M / BLOCK_N of the reduced axis
    pinned to the format's 64) gives the same gradients as the default one."""
    from leanops.triton import attention as T

    q, k, v, do = (torch.randn(1, 4, 777, 128, device=DEV, dtype=torch.bfloat16) for _ in range(4))
    out, lse = torch.ops.leanops.attention_int8(q, k, v, None, None, None, 0, 0, 128**-0.5, -1, 0,
                                                0.0, True)
    args = (do, q, k, v, out, lse, None, None, None, 0, 0, 128**-0.5, -1, 0, 0.0, True)
    want = T.attention_int8_bwd(*args)
    meta = dict(BLOCK_D=128, V=v, SQ_BUCKET=1024, SK_BUCKET=1024, HAS_BIAS=False, QK_INT8=True)
    for kind, kw in (("dkdv", "cfg_dkdv"), ("dq", "cfg_dq")):
        for i in sorted(T._kept_for_call(kind, meta)):
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


@pytest.mark.sanitize
@pytest.mark.parametrize("case", ["fwd-bwd", "varlen", "decode-paged", "bias", "int8", "int8-varlen"])
def test_sanitize_small(case):
    """Ragged small shapes through every kernel: compute-sanitizer looks for out-of-bounds and
    uninitialised accesses at the edges."""
    t = torch.bfloat16
    if case == "fwd-bwd":
        check(1, 4, 2, 37, 53, 80, t, causal=True)
    elif case == "varlen":
        cu = torch.tensor([0, 5, 5, 40], device=DEV, dtype=torch.int32)
        q, k, v = (torch.randn(40, 2, 64, device=DEV, dtype=t, requires_grad=True) for _ in range(3))
        out = leanops.attention_varlen(q, k, v, cu, cu, 35, 35, causal=True, window=(7, 0))
        out.sum().backward()
    elif case == "decode-paged":
        q = torch.randn(2, 8, 3, 96, device=DEV, dtype=t)
        kp, vp = (torch.randn(9, 2, 16, 96, device=DEV, dtype=t) for _ in range(2))
        table = torch.tensor([[3, 1, 7], [0, 8, 2]], device=DEV, dtype=torch.int32)
        leanops.attention_decode(q, kp, vp, torch.tensor([40, 17], device=DEV, dtype=torch.int32), table)
    elif case == "bias":
        q, k, v = (torch.randn(2, 2, 29, 32, device=DEV, dtype=t, requires_grad=True) for _ in range(3))
        mask = torch.rand(2, 1, 29, 29, device=DEV) > 0.5
        leanops.attention(q, k, v, attn_mask=mask).sum().backward()
    elif case == "int8":
        q, k, v = (torch.randn(1, 2, 77, 64, device=DEV, dtype=t, requires_grad=True) for _ in range(3))
        leanops.attention_int8(q, k, v, causal=True).sum().backward()
    else:  # int8-varlen
        cu = torch.tensor([0, 5, 5, 140], device=DEV, dtype=torch.int32)
        q, k, v = (torch.randn(140, 4, 80, device=DEV, dtype=t, requires_grad=True) for _ in range(3))
        out = leanops.attention_int8_varlen(q, k, v, cu, cu, 135, 135, causal=True, window=(70, 0))
        out.sum().backward()
    torch.cuda.synchronize()
