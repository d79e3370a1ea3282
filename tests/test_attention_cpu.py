"""The CPU path of the attention ops (issue 12): what CPU tensors get when no backend is forced,
PyTorch's CPU flash-attention kernels wherever they compute exactly the definition (see
leanops.ops.attention), instead of the reference that materialises [B, H, Sq, Sk] in fp32.

Every case is held to the rule the Triton kernels are (tests/attention_checks.py): the error
against an fp64 evaluation of the definition (the reference functions called directly, never
through the dispatcher, so the truth is never the path under test) at most 2x that of PyTorch's
same-dtype math, forward and gradients, on float32, bfloat16 and float16 (the CPU kernels take
all three), over every way the path splits a problem: one call; a causal-like window cut into
blind rows, the keys every row sees and a top-left causal triangle, merged by lse; query blocks
with band masks (forced to many blocks by a small block budget); biases, with fully masked rows;
Dv != D both ways; softcap (the reference's math over blocks); varlen; the decode op's caches.
Then: which kernels run (the CPU kernels on automatic calls, the definition under
use_backend("reference")), and that a window never materialises the [Sq, Sk] mask.
"""

import functools

import leanops
import pytest
import torch
from attention_checks import run_decode, run_dense, run_varlen
from leanops.ops import attention as A
from leanops.ops import decode_attention as D

run_cpu = functools.partial(run_dense, None)  # None: the automatic choice, the CPU path here

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

# (b, hq, hkv, sq, sk, d, dv, dtype, wl, wr, softcap, bias kind, block budget or None)
CASES = {
    "full": (2, 4, 2, 37, 45, 32, 32, F32, -1, -1, 0.0, None, None),
    "causal-square": (2, 4, 2, 64, 64, 64, 64, BF16, -1, 0, 0.0, None, None),
    "causal-q<k-merged": (2, 4, 1, 13, 50, 32, 24, BF16, -1, 0, 0.0, None, None),
    "causal-q>k-blind-rows": (1, 2, 2, 50, 13, 24, 40, F16, -1, 0, 0.0, None, None),
    "decode-q1": (2, 8, 2, 1, 77, 64, 64, BF16, -1, 0, 0.0, None, None),
    "right-window-3": (1, 2, 2, 20, 30, 32, 32, F32, -1, 3, 0.0, None, None),
    "right-window-q>k-blind": (1, 2, 2, 70, 40, 32, 16, F16, -1, 4, 0.0, None, None),
    "sliding-causal-blocks": (1, 2, 2, 90, 90, 32, 32, BF16, 7, 0, 0.0, None, 600),
    "window-both-q<k-blocks": (1, 2, 1, 40, 70, 32, 16, F32, 5, 3, 0.0, None, 600),
    "bias-per-head": (2, 2, 2, 33, 47, 32, 32, F32, -1, -1, 0.0, "per-head", None),
    "bias-bool-causal-blocks": (2, 4, 2, 37, 37, 32, 32, BF16, -1, 0, 0.0, "bool", 300),
    "bias-padding-blind": (2, 2, 2, 33, 47, 32, 32, F16, -1, -1, 0.0, "padding", None),
    "bias-fp32-with-bf16-q": (2, 2, 1, 21, 30, 32, 48, BF16, -1, 0, 0.0, "fp32", None),
    "softcap-causal": (2, 4, 2, 37, 37, 32, 48, BF16, -1, 0, 3.0, None, 3000),
    "softcap-window-bias": (1, 2, 2, 45, 45, 32, 32, F32, 6, 0, 5.0, "per-head", None),
    "mla-192-128": (1, 2, 2, 20, 20, 192, 128, BF16, -1, 0, 0.0, None, None),
    "dv>d": (1, 2, 2, 20, 25, 16, 40, F32, -1, -1, 0.0, "per-head", None),
}


def _bias(kind, b, h, sq, sk, dtype):
    if kind is None:
        return None
    if kind == "per-head":
        return torch.randn(b, h, sq, sk).to(dtype)
    if kind == "fp32":
        return torch.randn(1, 1, sq, sk)
    if kind == "bool":  # SDPA's bool mask [Sq, Sk] as the op's bias, a fully masked row included
        mask = torch.rand(sq, sk) > 0.3
        mask[5] = False
        return A._mask_to_bias(mask, torch.empty(b, h, sq, 1, dtype=dtype), torch.empty(b, h, sk, 1))
    pad = torch.zeros(b, 1, 1, sk)  # key padding; batch entry 1 sees no key at all
    pad[0, ..., 30:] = float("-inf")
    pad[1] = float("-inf")
    return pad.to(dtype)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_path_matches_the_definition(name, monkeypatch):
    b, hq, hkv, sq, sk, d, dv, dtype, wl, wr, cap, kind, budget = CASES[name]
    if budget is not None:  # many query blocks on small problems
        monkeypatch.setattr(A, "_CPU_ELEMS", budget)
    bias = _bias(kind, b, hq, sq, sk, dtype)
    out, lse, grads = run_cpu(b, hq, hkv, sq, sk, d, dtype, wl=wl, wr=wr, softcap=cap, bias=bias,
                              dv=dv)
    if kind == "padding":  # rows that see no key: out 0, lse -inf, no gradient
        assert (out[1] == 0).all() and torch.isinf(lse[1]).all()
        assert (grads[0][1] == 0).all() and (grads[1][1] == 0).all()


def test_cpu_path_bshd_layout():
    out, _, _ = run_cpu(2, 3, 3, 19, 23, 32, BF16, wr=0, layout="bshd", dv=16)
    assert out.transpose(1, 2).is_contiguous()  # q's [B, S, H, *] layout with Dv


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_path_varlen(causal):
    run_varlen(None, [1, 17, 0, 40], [5, 17, 3, 29] if not causal else [1, 30, 0, 40], 4, 2, 32,
               BF16, causal, dv=24)


@pytest.mark.parametrize("paged,page,dv", [(False, 0, 32), (True, 5, 32), (True, 16, 48)],
                         ids=["dense", "page5", "page16-dv48"])
def test_cpu_path_decode(paged, page, dv):
    run_decode(None, paged, page, dv)


# --------------------------------------------------------------------- which kernels run


def _spy(monkeypatch):
    """Counts of the CPU kernel calls and of the reference's materialising math, and the
    element count of every mask a CPU kernel call gets."""
    seen = {"flash": 0, "reference": 0, "masks": []}
    flash, reference = A._cpu_flash, A.reference_attention

    def spy_flash(q, k, v, mask, causal, scale):
        seen["flash"] += 1
        seen["masks"].append(0 if mask is None else mask.numel())
        return flash(q, k, v, mask, causal, scale)

    def spy_reference(*args, **kwargs):
        seen["reference"] += 1
        return reference(*args, **kwargs)

    monkeypatch.setattr(A, "_cpu_flash", spy_flash)
    monkeypatch.setattr(A, "reference_attention", spy_reference)
    monkeypatch.setattr(D, "reference_attention", spy_reference)  # decode's own binding of it
    return seen


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window": (5, 0)},
                                {"attn_mask": torch.rand(7, 9) > 0.2}],
                         ids=["full", "causal", "window", "mask"])
def test_cpu_tensors_take_the_cpu_kernels_and_reference_forces_the_definition(kw, monkeypatch):
    seen = _spy(monkeypatch)
    q = torch.randn(2, 4, 7, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    fast = leanops.attention(q, k, v, **kw)
    assert seen["flash"] >= 1 and seen["reference"] == 0
    seen["flash"] = 0
    with leanops.use_backend("cpu"):  # forcing the cpu backend is the same path
        forced = leanops.attention(q, k, v, **kw)
    assert seen["flash"] >= 1 and seen["reference"] == 0 and torch.equal(forced, fast)
    seen["flash"] = 0
    with leanops.use_backend("reference"):
        definition = leanops.attention(q, k, v, **kw)
    assert seen["flash"] == 0 and seen["reference"] == 1
    torch.testing.assert_close(fast, definition, rtol=1e-5, atol=1e-5)


def test_softcap_runs_the_definitions_math_over_blocks(monkeypatch):
    seen = _spy(monkeypatch)
    monkeypatch.setattr(A, "_CPU_ELEMS", 4 * 64 * 16)  # 16 query rows of 64 keys x 4 heads
    q, k, v = (torch.randn(1, 4, 64, 16) for _ in range(3))
    fast = leanops.attention(q, k, v, softcap=4.0, causal=True)
    assert seen["flash"] == 0 and seen["reference"] == 4
    with leanops.use_backend("reference"):
        definition = leanops.attention(q, k, v, softcap=4.0, causal=True)
    torch.testing.assert_close(fast, definition, rtol=1e-5, atol=1e-5)


def test_a_window_never_materialises_the_whole_mask(monkeypatch):
    """Sliding-window attention over 512 queries and keys under a 64-row block budget: every mask
    a kernel call gets is one query block's rows against the keys that block can see."""
    seen = _spy(monkeypatch)
    monkeypatch.setattr(A, "_CPU_ELEMS", 64 * 512)
    q, k, v = (torch.randn(1, 2, 512, 16) for _ in range(3))
    leanops.attention(q, k, v, window=(32, 0))
    assert seen["flash"] == 512 // 64
    assert 0 < max(seen["masks"]) <= 64 * (64 + 32)


def test_decode_reads_each_sequence_once_without_padding_to_the_longest(monkeypatch):
    """A dense cache with lengths: one CPU kernel call per sequence on a view of its own part of
    the cache (keys as long as its length), no [B, H, Sq, S_max] anything."""
    seen = _spy(monkeypatch)
    lens_seen = []
    flash = A._cpu_flash

    def spy(q, k, v, mask, causal, scale):
        lens_seen.append(k.shape[2])
        return flash(q, k, v, mask, causal, scale)

    monkeypatch.setattr(A, "_cpu_flash", spy)
    q = torch.randn(3, 4, 1, 16)
    k, v = torch.randn(3, 2, 100, 16), torch.randn(3, 2, 100, 16)
    leanops.attention_decode(q, k, v, torch.tensor([100, 7, 40], dtype=torch.int32))
    assert lens_seen == [100, 7, 40] and seen["reference"] == 0
