"""The Triton attention kernels (leanops.triton.attention*, issue 5) in Triton's CPU interpreter.

Every case runs the public op under use_backend("triton"): forward and, through the registered
autograd, the backward kernels; "right" is flash-attention's rule (DESIGN.md, in
tests/attention_checks.py): the error against an fp64 evaluation of the op's definition
(leanops.ops.attention.reference_*) is at most 2x the error of the same math done by PyTorch in
the input dtype, plus a floor of one fp16 ulp (fp16) or 1e-5 (fp32) relative to the largest
reference value. Inputs are fp16/fp32 (the interpreter's bf16 dot is wrong; bf16 is in
tests/test_attention_cuda.py), odd lengths 1, 17, 97, 129 against the interpreter's unequal
32 x 16 tiles (ragged tiles, all three masked / unmasked key ranges), head dims 32/64/80 (80:
padded BLOCK_D with masked loads), value head dims other than the query/key one (Dv != D,
padded on either side), GQA/MQA, causal with Sq != Sk (bottom-right: rows that see no key must
give 0 and zero gradients), sliding windows, softcap, the bias path, varlen, the split-KV decode
path (3 splits: uneven and empty splits), paged KV. Outputs are poisoned (NaN-filled
torch.empty) so an unwritten element cannot pass by luck.
"""

import functools

import leanops
import pytest
import torch
from attention_checks import paged_cache, run_decode, run_dense, run_varlen
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


run_dense = functools.partial(run_dense, "triton")


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
        bias = A._mask_to_bias(mask, torch.empty(b, h, sq, 1, dtype=torch.float16), torch.empty(b, h, sk, 1))
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


# The value head dim apart from the query/key one (Dv != D; DeepSeek's MLA uses 192/128): V, O,
# dO and dV tiles have their own BLOCK_DV and masks. Each side padded in turn (80 -> 128, 48 -> 64).
DV_CASES = [
    # (b, hq, hkv, sq, sk, d, dv, dtype, wl, wr, softcap, bias, layout)
    (1, 4, 2, 33, 33, 80, 32, torch.float16, -1, 0, 0.0, False, "contiguous"),
    (1, 2, 2, 17, 40, 32, 48, torch.float32, 5, -1, 0.0, True, "contiguous"),
    (1, 2, 1, 40, 17, 64, 16, torch.float16, -1, 0, 4.0, False, "bshd"),
    (1, 2, 2, 17, 17, 192, 128, torch.float16, -1, 0, 0.0, False, "contiguous"),
    (2, 4, 2, 3, 50, 64, 32, torch.float16, -1, 0, 0.0, False, "contiguous"),  # decode path
]


@pytest.mark.parametrize("case", DV_CASES, ids=["d80-dv32-causal-gqa", "d32-dv48-window-bias",
                                                 "d64-dv16-softcap-q>k-bshd", "d192-dv128",
                                                 "decode-path-d64-dv32"])
def test_value_head_dim_differs(case):
    b, hq, hkv, sq, sk, d, dv, dtype, wl, wr, cap, bias, layout = case
    bias = torch.randn(b, 1, sq, sk).to(dtype) if bias else None
    assert TD.use_decode_path(torch.empty(1, hq, 1, 1), torch.empty(1, hkv, 1, 1), bias, False,
                              sq, sk) == (sq <= TD.MAX_DECODE_SQ)
    out, _, _ = run_dense(b, hq, hkv, sq, sk, d, dtype, wl=wl, wr=wr, softcap=cap, bias=bias,
                          layout=layout, dv=dv)
    # q's layout with the last dim Dv: [B, S, H, Dv] memory for bshd q
    assert (out.transpose(1, 2) if layout == "bshd" else out).is_contiguous()


# ---------------------------------------------------------------------------------- varlen


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
def test_varlen(causal, hq, hkv):
    lens_q = [1, 17, 0, 40]
    lens_k = [5, 17, 3, 29] if not causal else [1, 30, 0, 40]
    run_varlen("triton", lens_q, lens_k, hq, hkv, 32, torch.float16, causal)


def test_varlen_value_head_dim_differs():
    run_varlen("triton", [3, 20], [9, 20], 4, 2, 32, torch.float16, True, dv=24)


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


@pytest.mark.parametrize("paged,page,dv", [(False, 0, 32), (True, 16, 32), (True, 5, 32), (True, 5, 48)],
                         ids=["dense", "page16", "page5", "page5-dv48"])
def test_attention_decode_kv_cache(paged, page, dv):
    run_decode("triton", paged, page, dv)


def test_attention_decode_paged_fa_layout_view():
    """flash-attention / vLLM page layout [P, page, Hkv, D] passed as .transpose(1, 2) (no copy)."""
    k = torch.randn(2, 2, 24, 32, dtype=torch.float16)
    v = torch.randn(2, 2, 24, 32, dtype=torch.float16)
    lens = torch.tensor([24, 10], dtype=torch.int32)
    kp, vp, table = paged_cache(k, v, 8)
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
        # (BLOCK_D, BLOCK_DV): equal, and Dv != D both ways (DeepSeek's 192/128 is 256/128)
        for bd, bdv in ((16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (256, 128),
                        (64, 128)):
            for sq, sk in ((1, 1), (16, 4096), (4096, 4096)):
                kept = T._kept(kind, bd, 2, T.seq_bucket(sq), T.seq_bucket(sk), dev,
                               block_dv=bdv)
                assert kept, (kind, bd, bdv, sq, sk)
                for i in kept:
                    assert (T._smem(configs[i], kind, bd, 2, bdv) <= T.common.NOMINAL_SMEM
                            or len(kept) == 1)
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
            args = {"BLOCK_D": bd, "BLOCK_DV": bd, "V": torch.empty(0, dtype=torch.float16),
                    "SQ_BUCKET": 4096, "SK_BUCKET": 4096, "HAS_BIAS": has_bias}
            for kind, configs in (("fwd", T.FWD_CONFIGS), ("dkdv", T.DKDV_CONFIGS), ("dq", T.DQ_CONFIGS)):
                cfg = T._default(kind, args)
                assert configs.index(cfg) in T._kept(kind, bd, 2, 4096, 4096, torch.device("cpu"), has_bias)
    # more than the fallback {0} (_kept never returns an empty set)
    assert len(TD._kept(128, 128, 16, 2, 32768, torch.device("cpu"))) > 1
    assert len(TD._kept(256, 128, 16, 2, 32768, torch.device("cpu"))) > 1
