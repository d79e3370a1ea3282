"""The Triton attention kernels (leanops.triton.attention*, issue 5) in Triton's CPU interpreter.

Every case runs the public op under use_backend("triton"): forward and, through the registered
autograd, the backward kernels; "right" is flash-attention's rule (DESIGN.md): the error against
an fp64 evaluation of the op's definition (leanops.ops.attention.reference_*) is at most 2x the
error of the same math done by PyTorch in the input dtype, plus a floor of one fp16 ulp (fp16) or
1e-5 (fp32) relative to the largest reference value. Inputs are fp16/fp32 (the interpreter's
bf16 dot is wrong; bf16 is in tests/test_attention_cuda.py), odd lengths 1, 17, 97, 129 against
the interpreter's unequal 32 x 16 tiles (ragged tiles, all three masked / unmasked key ranges),
head dims 32/64/80 (80: padded BLOCK_D with masked loads), GQA/MQA, causal with Sq != Sk
(bottom-right: rows that see no key must give 0 and zero gradients), sliding windows, softcap,
the bias path, varlen, the split-KV decode path (3 splits: uneven and empty splits), paged KV.
Outputs are poisoned (NaN-filled torch.empty) so an unwritten element cannot pass by luck.
"""


import leanops
import pytest
import torch
from helpers import assert_attention_2x, poisoned_memory
from leanops import ops
from leanops.ops import attention as A

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from leanops.triton import attention as T  # noqa: E402
from leanops.triton import attention_decode as TD  # noqa: E402
from leanops.triton import attention_kernels as K  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")

@pytest.fixture(autouse=True)
def _interpreter_only(interpreter):
    pass


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
    assert (lse[fin].double() - l64[fin]).abs().max().item() <= 1e-4 * (1 + l64[fin].abs().max().item())


def run_dense(b, hq, hkv, sq, sk, d, dtype, wl=-1, wr=-1, softcap=0.0, bias=None, grad=True,
              layout="contiguous"):
    scale = d**-0.5
    if layout == "bshd":  # [B, S, H, D] memory seen as [B, H, S, D] (HF / MHA projections)
        q = torch.randn(b, sq, hq, d).to(dtype).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d).to(dtype).transpose(1, 2)
        v = torch.randn(b, sk, hkv, d).to(dtype).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, h, s, d).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    do = torch.randn(b, hq, sq, d).to(dtype)
    qq, kk, vv = (t.detach().clone().requires_grad_(grad) for t in (q, k, v))
    with leanops.use_backend("triton"), poisoned_memory():
        out, lse = ops.attention_fwd(qq, kk, vv, bias, scale=scale, window_left=wl,
                                     window_right=wr, softcap=softcap)
        grads = torch.autograd.grad(out, (qq, kk, vv), do) if grad else None
    assert out.stride() == q.stride(), "the output keeps q's layout"
    (o64, l64, g64), (ob, gb) = dense_refs(q, k, v, do, bias, scale, wl, wr, softcap)
    assert_attention_2x(out, o64, ob, dtype, "out")
    check_lse(lse, l64)
    if grad:
        for name, g, r, rb in zip(("dq", "dk", "dv"), grads, g64, gb, strict=True):
            assert_attention_2x(g, r, rb, dtype, name)
    return out, lse, grads


# Lengths x head dims x dtypes x masks, cycled rather than multiplied out (interpreter time).
BASIC = [
    # (sq, sk, d, dtype, causal)
    (1, 1, 32, torch.float32, False),
    (17, 17, 64, torch.float16, True),
    (97, 97, 80, torch.float16, False),
    (129, 129, 32, torch.float16, True),
    (129, 129, 80, torch.float32, True),
    (17, 97, 80, torch.float16, True),  # Sq < Sk: bottom-right diagonal
    (97, 17, 64, torch.float32, True),  # Sq > Sk: the first 80 rows see nothing
    (129, 1, 32, torch.float16, False),
]


@pytest.mark.parametrize("sq,sk,d,dtype,causal", BASIC,
                         ids=[f"{a}x{b}-d{d}-{str(t)[6:]}-{'causal' if c else 'full'}" for a, b, d, t, c in BASIC])
def test_forward_and_gradients(sq, sk, d, dtype, causal):
    out, lse, grads = run_dense(2 if sq < 100 else 1, 2, 2, sq, sk, d, dtype, wr=0 if causal else -1)
    if causal and sq > sk:  # rows that see no key: out 0, lse -inf, dq 0
        blind = sq - sk
        assert (out[:, :, :blind] == 0).all() and torch.isinf(lse[:, :, :blind]).all()
        assert (grads[0][:, :, :blind] == 0).all()


@pytest.mark.parametrize("hq,hkv", [(4, 2), (4, 1)], ids=["gqa", "mqa"])
@pytest.mark.parametrize("sq,sk,causal", [(33, 33, True), (17, 40, False), (40, 17, True)])
def test_gqa(hq, hkv, sq, sk, causal):
    run_dense(1, hq, hkv, sq, sk, 32, torch.float16, wr=0 if causal else -1)


@pytest.mark.parametrize(
    "sq,sk,wl,wr",
    [(97, 97, 16, 0), (40, 40, 5, 3), (33, 70, 7, -1), (70, 33, -1, 4), (50, 50, 0, 0)],
    ids=["causal-window16", "window5-3", "left7-q<k", "right4-q>k", "diagonal-only"],
)
def test_sliding_window(sq, sk, wl, wr):
    run_dense(1, 2, 1, sq, sk, 64, torch.float16, wl=wl, wr=wr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_softcap(dtype):
    # scores up to ~15 with softcap 5: tanh is far into saturation for many of them
    run_dense(1, 2, 2, 45, 45, 32, dtype, wr=0, softcap=5.0)


@pytest.mark.parametrize("kind", ["float-per-head", "bool-broadcast", "padding-rows-blind"])
def test_bias_path(kind):
    b, h, sq, sk = 2, 2, 33, 47
    if kind == "float-per-head":
        bias = torch.randn(b, h, sq, sk).to(torch.float16)
        wr = -1
    elif kind == "bool-broadcast":  # SDPA-style bool mask [Sq, Sk], True = attend
        mask = torch.rand(sq, sk) > 0.3
        bias = A._mask_to_bias(mask, torch.empty(0, dtype=torch.float16), None)
        wr = 0
    else:  # key padding [B, 1, 1, Sk] with a batch entry whose keys are all masked
        pad = torch.zeros(b, 1, 1, sk)
        pad[0, ..., 30:] = float("-inf")
        pad[1] = float("-inf")
        bias = pad.to(torch.float16)
        wr = -1
    out, lse, grads = run_dense(b, h, h, sq, sk, 32, torch.float16, wr=wr, bias=bias)
    if kind == "padding-rows-blind":
        assert (out[1] == 0).all() and (grads[1][:, :, 30:] == 0).all()


def test_strided_bshd_layout():
    """q/k/v as [B, S, H, D] memory (transposed views): no copy, output in the same layout."""
    run_dense(2, 3, 3, 19, 23, 32, torch.float16, wr=0, layout="bshd")


# ---------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
def test_varlen(causal, hq, hkv):
    lens_q = [1, 17, 0, 40]
    lens_k = [5, 17, 3, 29] if not causal else [1, 30, 0, 40]
    d, dtype, scale = 32, torch.float16, 32**-0.5
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens_q), hq, d).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d).to(dtype)
    do = torch.randn_like(q)
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    wr = 0 if causal else -1
    with leanops.use_backend("triton"), poisoned_memory():
        out = ops.attention_varlen(qq, kk, vv, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
    parts = {n: ([], []) for n in ("o", "dq", "dk", "dv")}
    for rq, rk in A._varlen_slices(cu_q, cu_k):
        def seq(x, rows):
            return x[rows].transpose(0, 1).unsqueeze(0)

        (o64, _, g64), (ob, gb) = dense_refs(seq(q, rq), seq(k, rk), seq(v, rk), seq(do, rq),
                                             None, scale, -1, wr, 0.0)
        for n, r, rb in zip(("o", "dq", "dk", "dv"), (o64, *g64), (ob, *gb), strict=True):
            parts[n][0].append(r[0].transpose(0, 1))
            parts[n][1].append(rb[0].transpose(0, 1))
    for n, got in zip(("o", "dq", "dk", "dv"), (out, dq, dk, dv), strict=True):
        assert_attention_2x(got, torch.cat(parts[n][0]), torch.cat(parts[n][1]), dtype, n)


# ------------------------------------------------------------------------- decode (split-KV)


@pytest.mark.parametrize(
    "sq,sk,hq,hkv,d,wl,softcap",
    [(1, 129, 8, 2, 80, -1, 0.0), (3, 50, 4, 4, 32, -1, 0.0), (16, 97, 4, 1, 64, -1, 0.0),
     (1, 1, 2, 1, 32, -1, 0.0), (2, 70, 4, 2, 32, 9, 3.0)],
    ids=["q1-gqa4", "q3-mha", "q16-mqa", "k1", "window-softcap"],
)
def test_decode_path_of_attention_fwd(sq, sk, hq, hkv, d, wl, softcap):
    """Sq <= 16 routes leanops::attention_fwd to the split-KV kernel (GQA-packed rows, 3 splits:
    the chunks are uneven and some are empty for short caches); its lse feeds the backward."""
    assert TD.use_decode_path(torch.empty(1, hq, 1, 1), torch.empty(1, hkv, 1, 1), None, False, sq, sk)
    run_dense(2, hq, hkv, sq, sk, d, torch.float16, wl=wl, wr=0, softcap=softcap)


def test_flash_and_decode_kernels_agree():
    """Both forward kernels on the same short-query problem (the path choice is only speed)."""
    q = torch.randn(2, 4, 5, 64, dtype=torch.float16)
    k = torch.randn(2, 2, 77, 64, dtype=torch.float16)
    v = torch.randn(2, 2, 77, 64, dtype=torch.float16)
    flash = T._fwd(q, k, v, None, None, None, 0, 0, 0.125, -1, 0, 0.0, path="flash")
    decode = T._fwd(q, k, v, None, None, None, 0, 0, 0.125, -1, 0, 0.0, path="decode")
    torch.testing.assert_close(decode[0], flash[0], rtol=0, atol=2e-3)
    torch.testing.assert_close(decode[1], flash[1], rtol=0, atol=1e-5)


def _paged(k_dense, v_dense, lens, page):
    """Scatter dense caches [B, Hkv, S, D] into shuffled pages [P, Hkv, page, D]."""
    b, hkv, s, d = k_dense.shape
    per = (s + page - 1) // page
    total = b * per + 3
    perm = torch.randperm(total)[: b * per].view(b, per)
    kp = torch.randn(total, hkv, page, d).to(k_dense.dtype)  # garbage in unused slots
    vp = torch.randn(total, hkv, page, d).to(k_dense.dtype)
    for i in range(b):
        for j in range(per):
            rows = slice(j * page, min((j + 1) * page, s))
            n = rows.stop - rows.start
            kp[perm[i, j], :, :n] = k_dense[i, :, rows]
            vp[perm[i, j], :, :n] = v_dense[i, :, rows]
    return kp, vp, perm.to(torch.int32)


@pytest.mark.parametrize("paged,page", [(False, 0), (True, 16), (True, 5)], ids=["dense", "page16", "page5"])
def test_attention_decode_kv_cache(paged, page):
    b, hq, hkv, sq, s_max, d = 3, 8, 2, 2, 60, 32
    lens = torch.tensor([60, 1, 37], dtype=torch.int32)
    q = torch.randn(b, hq, sq, d, dtype=torch.float16)
    k = torch.randn(b, hkv, s_max, d, dtype=torch.float16)
    v = torch.randn(b, hkv, s_max, d, dtype=torch.float16)
    cache = (k, v, lens, None)
    if paged:
        kp, vp, table = _paged(k, v, lens, page)
        cache = (kp, vp, lens, table)
    with leanops.use_backend("triton"), poisoned_memory():
        out = leanops.attention_decode(q, *cache)
    for i in range(b):
        n = int(lens[i])
        kk, vv = k[i : i + 1, :, :n], v[i : i + 1, :, :n]
        o64, _ = A.reference_attention(q[i : i + 1].double(), kk.double(), vv.double(), None,
                                       d**-0.5, -1, 0, 0.0, dtype=torch.float64)
        ob, _ = A.reference_attention(q[i : i + 1], kk, vv, None, d**-0.5, -1, 0, 0.0,
                                      dtype=torch.float16)
        assert_attention_2x(out[i : i + 1], o64, ob, torch.float16, f"batch {i}")
    with leanops.use_backend("reference"):
        ref = leanops.attention_decode(q, *cache)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-3)


def test_attention_decode_paged_fa_layout_view():
    """flash-attention / vLLM page layout [P, page, Hkv, D] passed as .transpose(1, 2) (no copy)."""
    k = torch.randn(2, 2, 24, 32, dtype=torch.float16)
    v = torch.randn(2, 2, 24, 32, dtype=torch.float16)
    lens = torch.tensor([24, 10], dtype=torch.int32)
    kp, vp, table = _paged(k, v, lens, 8)
    kp_fa, vp_fa = kp.transpose(1, 2).contiguous(), vp.transpose(1, 2).contiguous()
    q = torch.randn(2, 4, 1, 32, dtype=torch.float16)
    with leanops.use_backend("triton"):
        a = leanops.attention_decode(q, kp, vp, lens, table)
        b = leanops.attention_decode(q, kp_fa.transpose(1, 2), vp_fa.transpose(1, 2), lens, table)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# -------------------------------------------------------------------------- config rules


@triton.jit
def _ranges_kernel(out_ptr, q_len, k_len, window_left, window_right, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                   KEYS: tl.constexpr):
    """Stores what the kernels' range helpers return for block program_id(0): _key_ranges of
    query rows [pid * BLOCK_M, +BLOCK_M) (KEYS), else _query_ranges of keys [pid * BLOCK_N, ...)."""
    pid = tl.program_id(0)
    if KEYS:
        lo, full_lo, full_hi, hi = K._key_ranges(pid * BLOCK_M, q_len, k_len, window_left,
                                                 window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT,
                                                 WINDOW_RIGHT)
    else:
        lo, full_lo, full_hi, hi = K._query_ranges(pid * BLOCK_N, q_len, k_len, window_left,
                                                   window_right, BLOCK_M, BLOCK_N, WINDOW_LEFT,
                                                   WINDOW_RIGHT)
    tl.store(out_ptr + pid * 4 + 0, lo)
    tl.store(out_ptr + pid * 4 + 1, full_lo)
    tl.store(out_ptr + pid * 4 + 2, full_hi)
    tl.store(out_ptr + pid * 4 + 3, hi)


def _ranges(keys, q_len, k_len, wl, wr, bm, bn):
    blocks = triton.cdiv(q_len if keys else k_len, bm if keys else bn)
    out = torch.full((blocks, 4), -99, dtype=torch.int32)
    _ranges_kernel[(blocks,)](out, q_len, k_len, max(wl, 0), max(wr, 0), BLOCK_M=bm, BLOCK_N=bn,
                              WINDOW_LEFT=wl >= 0, WINDOW_RIGHT=wr >= 0, KEYS=keys)
    return out.tolist()


RANGE_CASES = [(q, k, wl, wr) for q, k in ((17, 17), (5, 40), (40, 5), (33, 70), (1, 1))
               for wl, wr in ((-1, -1), (-1, 0), (3, 0), (6, 2), (-1, 5), (0, 0))]


@pytest.mark.parametrize("bm,bn", [(8, 4), (16, 32)])
def test_key_ranges_cover_exactly_the_visible_tiles(bm, bn):
    """The jit helper _key_ranges (forward and dQ): every key a row of the query block can see
    is in [lo, hi); lo, full_lo and full_hi are whole key tiles; the unmasked tiles
    [full_lo, full_hi) lie inside the keys and every real row of the block sees all of them."""
    for q_len, k_len, wl, wr in RANGE_CASES:
        vis = A.visible(q_len, k_len, wl, wr)
        for b, (lo, full_lo, full_hi, hi) in enumerate(_ranges(True, q_len, k_len, wl, wr, bm, bn)):
            case = (q_len, k_len, wl, wr, b, (lo, full_lo, full_hi, hi))
            rows = vis[b * bm : (b + 1) * bm]
            seen = rows.any(0).nonzero().flatten()
            if len(seen):
                assert lo <= seen.min() and seen.max() < hi, case
            assert 0 <= lo <= full_lo <= full_hi <= hi <= k_len, case
            assert lo % bn == 0 and (full_lo % bn == 0 or full_lo == hi), case
            if full_hi > full_lo:
                assert full_hi % bn == 0 and rows[:, full_lo:full_hi].all(), case


@pytest.mark.parametrize("bm,bn", [(8, 4), (16, 32)])
def test_query_ranges_cover_exactly_the_visible_tiles(bm, bn):
    """The jit helper _query_ranges (dK/dV), the mirror image: every query that sees a key of
    the block is in [lo, hi); the unmasked query tiles [full_lo, full_hi) are whole tiles of
    real queries that see every key of the block, and a ragged key block has none."""
    for q_len, k_len, wl, wr in RANGE_CASES:
        vis = A.visible(q_len, k_len, wl, wr)
        for b, (lo, full_lo, full_hi, hi) in enumerate(_ranges(False, q_len, k_len, wl, wr, bm, bn)):
            case = (q_len, k_len, wl, wr, b, (lo, full_lo, full_hi, hi))
            cols = vis[:, b * bn : (b + 1) * bn]
            seen = cols.any(1).nonzero().flatten()
            if len(seen):
                assert lo <= seen.min() and seen.max() < hi, case
            assert 0 <= lo <= full_lo <= full_hi <= hi <= q_len, case
            assert lo % bm == 0 and (full_lo % bm == 0 or full_lo == hi), case
            if full_hi > full_lo:
                assert full_hi % bm == 0 and (b + 1) * bn <= k_len, case
                assert cols[full_lo:full_hi].all(), case


def test_autotune_keep_rules():
    dev = torch.device("cpu")
    for kind, configs in (("fwd", T.FWD_CONFIGS), ("dkdv", T.DKDV_CONFIGS), ("dq", T.DQ_CONFIGS)):
        for bd in (16, 32, 64, 128, 256):
            for sq, sk in ((1, 1), (16, 4096), (4096, 4096)):
                kept = T._kept(kind, bd, 2, T.seq_bucket(sq), T.seq_bucket(sk), dev)
                assert kept, (kind, bd, sq, sk)
                for i in kept:
                    assert T._smem(configs[i], kind, bd, 2) <= T.common.NOMINAL_SMEM or len(kept) == 1
    # configs ptxas showed spilling hundreds of bytes on sm_90 are never kept; clean ones are
    def kept(kind, bd, bm, bn, w, st):
        configs = {"fwd": T.FWD_CONFIGS, "dkdv": T.DKDV_CONFIGS}[kind]
        i = next(i for i, c in enumerate(configs) if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                     c.num_warps, c.num_stages) == (bm, bn, w, st))
        return i in T._kept(kind, bd, 2, 4096, 4096, dev)

    assert not kept("fwd", 128, 64, 128, 4, 2) and not kept("fwd", 256, 128, 128, 8, 2)
    assert not kept("dkdv", 128, 64, 64, 4, 2) and not kept("dkdv", 256, 64, 128, 8, 2)
    assert kept("fwd", 128, 128, 128, 8, 2) and kept("fwd", 256, 128, 64, 8, 2)
    assert kept("dkdv", 128, 16, 128, 8, 2)


def test_default_configs_without_autotuning_are_kept_ones():
    """LEANOPS_TRITON_AUTOTUNE=0 picks one kept config per call (forward, backward, decode)."""
    for bd in (32, 128, 256):
        for has_bias in (False, True):
            args = {"BLOCK_D": bd, "V": torch.empty(0, dtype=torch.float16), "SQ_BUCKET": 4096,
                    "SK_BUCKET": 4096, "HAS_BIAS": has_bias}
            for kind, configs in (("fwd", T.FWD_CONFIGS), ("dkdv", T.DKDV_CONFIGS), ("dq", T.DQ_CONFIGS)):
                cfg = T._default(kind, args)
                assert configs.index(cfg) in T._kept(kind, bd, 2, 4096, 4096, torch.device("cpu"), has_bias)
    assert TD._kept(128, 16, 2, 32768, torch.device("cpu"))
