"""The attention op family (issue 5) at the op and module level: the semantics against PyTorch's
own attention (the definition, use_backend("reference"), and the automatic CPU path), SDPA's
layouts (3-D / 2-D inputs, several and broadcast batch dims) and a value head dim other than the
query/key one (issue 15), the masks' one home (leanops.ops.attention.visible), argument errors
that name the argument before any arithmetic on the shapes, opcheck of every op on the
reference, the CPU path and (interpreter) Triton backends, torch.compile without graph breaks,
leanops.nn.MultiheadAttention against torch.nn.MultiheadAttention, and the Hugging Face
transformers registration (Llama with GQA, DeepSeek-V3's multi-head latent attention).
The kernels' numerics are in tests/test_attention_triton.py (interpreter) and
tests/test_attention_cuda.py (GPU)."""

import warnings

import leanops
import pytest
import torch
import torch.nn.functional as F
from leanops import ops
from leanops.ops import attention as A
from torch import nn
from torch.nn.attention.bias import causal_lower_right

pytestmark = pytest.mark.filterwarnings("ignore:tl.make_block_ptr is deprecated")


def _qkv(b=2, hq=4, hkv=2, sq=7, sk=9, d=16, dtype=torch.float32, grad=False, dv=None):
    return tuple(torch.randn(b, h, s, e, dtype=dtype, requires_grad=grad)
                 for h, s, e in ((hq, sq, d), (hkv, sk, d), (hkv, sk, d if dv is None else dv)))


# ------------------------------------------------------------------------ semantics


def test_visible_is_the_bottom_right_window_definition():
    for sq, sk in ((5, 5), (3, 8), (8, 3), (1, 6)):
        for wl, wr in ((-1, -1), (-1, 0), (2, 0), (1, 3), (0, -1)):
            got = A.visible(sq, sk, wl, wr)
            for i in range(sq):
                for j in range(sk):
                    pos = i + sk - sq  # query i is the token at position i + Sk - Sq
                    want = (wl < 0 or j >= pos - wl) and (wr < 0 or j <= pos + wr)
                    assert bool(got[i, j]) == want, (sq, sk, wl, wr, i, j)


def test_normalize_window():
    assert A.normalize_window(False, None) == (-1, -1)
    assert A.normalize_window(True, None) == (-1, 0)
    assert A.normalize_window(True, (8, 4)) == (8, 0)  # causal caps the right side
    assert A.normalize_window(False, (8, 4)) == (8, 4)


@pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs")
@pytest.mark.parametrize("sq,sk", [(6, 6), (3, 9), (9, 3)])
def test_causal_is_torch_causal_lower_right(sq, sk):
    q, k, v = _qkv(hq=2, hkv=2, sq=sq, sk=sk, dtype=torch.float32)
    got = leanops.attention(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk))
    rows = A.visible(sq, sk, -1, 0).any(-1)  # SDPA gives NaN where a row sees nothing, we 0
    torch.testing.assert_close(got[:, :, rows], want[:, :, rows], rtol=1e-5, atol=1e-5)
    assert (got[:, :, ~rows] == 0).all()


def test_reference_matches_sdpa_with_gqa_mask_scale_and_gradients():
    q, k, v = _qkv(dtype=torch.float32, grad=True)
    mask = torch.rand(2, 1, 7, 9) > 0.2
    mask[..., 0] = True  # every row sees a key
    got = leanops.attention(q, k, v, attn_mask=mask, scale=0.3)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g),
                               torch.autograd.grad(want, (q, k, v), g), rtol=1e-5, atol=1e-5)


def test_softcap_and_window_gradients_match_autograd_of_the_math():
    q, k, v = _qkv(hq=2, hkv=1, sq=8, sk=8, dtype=torch.float32, grad=True)
    out = leanops.attention(q, k, v, causal=True, window=(3, 0), softcap=2.0)
    s = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) * 16**-0.5
    s = 2.0 * torch.tanh(s / 2.0)
    s = s.masked_fill(~A.visible(8, 8, 3, 0), float("-inf"))
    want = torch.softmax(s, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), g),
                               torch.autograd.grad(want, (q, k, v), g), rtol=1e-5, atol=1e-5)


def test_varlen_is_attention_per_sequence():
    lens = [3, 0, 6]
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    q, k, v = (torch.randn(9, 4, 16) for _ in range(3))
    out = leanops.attention_varlen(q, k, v, cu, cu, 6, 6, causal=True)
    for b in range(3):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        if lens[b]:
            want = leanops.attention(*(t[rows].transpose(0, 1)[None] for t in (q, k, v)), causal=True)
            torch.testing.assert_close(out[rows], want[0].transpose(0, 1))


def test_decode_reference_reads_the_cache_like_dense_attention():
    q = torch.randn(2, 4, 1, 16)
    k, v = torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    lens = torch.tensor([10, 4], dtype=torch.int32)
    out = leanops.attention_decode(q, k, v, lens)
    torch.testing.assert_close(out[1:], leanops.attention(q[1:], k[1:, :, :4], v[1:, :, :4]))
    torch.testing.assert_close(out[:1], leanops.attention(q[:1], k[:1], v[:1]))


def test_output_keeps_q_layout_and_empty_inputs_work():
    q = torch.randn(2, 5, 3, 16).transpose(1, 2)  # [B, H, S, D] view of [B, S, H, D]
    out = leanops.attention(q, q, q)
    assert out.stride() == q.stride()
    assert leanops.attention(*_qkv(sq=0)).shape == (2, 4, 0, 16)
    assert (leanops.attention(*_qkv(sk=0)) == 0).all()


# ----------------------------------------------------------- SDPA's layouts, Dv != D (issue 15)


def _t(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


# name -> (q, k, v shapes, enable_gqa for SDPA); every one was refused before issue 15
LAYOUTS = {
    "3d-heads": ((4, 7, 16), (2, 9, 16), (2, 9, 16), True),
    "2d": ((7, 16), (9, 16), (9, 16), False),
    "5d": ((2, 3, 4, 7, 16), (2, 3, 2, 9, 16), (2, 3, 2, 9, 16), True),
    "k-v-batch-1": ((3, 4, 7, 16), (1, 4, 9, 16), (1, 4, 9, 16), False),
    "q-batch-1": ((1, 4, 7, 16), (3, 2, 9, 16), (3, 2, 9, 16), True),
    "k-v-3d-q-4d": ((3, 4, 7, 16), (4, 9, 16), (4, 9, 16), False),
    "two-batch-dims-broadcast": ((2, 1, 4, 7, 16), (1, 3, 4, 9, 16), (2, 3, 4, 9, 16), False),
    "q-one-head": ((2, 1, 7, 16), (2, 4, 9, 16), (2, 4, 9, 16), False),
    "k-one-head-v-four": ((2, 4, 7, 16), (2, 1, 9, 16), (2, 4, 9, 16), False),
    "dv-12": ((2, 4, 7, 16), (2, 2, 9, 16), (2, 2, 9, 12), True),
    "dv-mla-192-128": ((1, 2, 5, 192), (1, 2, 6, 192), (1, 2, 6, 128), False),
    "3d-dv-24": ((4, 7, 16), (4, 9, 16), (4, 9, 24), False),
}


def _sdpa_case(name, mask):
    """q, k, v (fp64 leaves), leanops' keyword arguments and F.scaled_dot_product_attention's, on
    which the two agree: no mask, a broadcast additive mask, or causal with Sq == Sk (SDPA's
    top-left is_causal is leanops' bottom-right there)."""
    qs, ks, vs, gqa = LAYOUTS[name]
    if mask == "causal":
        ks, vs = (*ks[:-2], qs[-2], ks[-1]), (*vs[:-2], qs[-2], vs[-1])
    q, k, v = _t(*qs), _t(*ks), _t(*vs)
    ours, theirs = {}, {"enable_gqa": gqa}
    if mask == "causal":
        ours["causal"] = theirs["is_causal"] = True
    elif mask == "additive":  # one row per query, broadcast over every batch dim and head
        m = torch.randn(qs[-2], ks[-2], dtype=torch.float64)
        ours["attn_mask"] = theirs["attn_mask"] = m
    return q, k, v, ours, theirs


@pytest.mark.parametrize("backend", [None, "reference"], ids=["cpu-path", "reference"])
@pytest.mark.parametrize("mask", ["none", "additive", "causal"])
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sdpa_layouts_and_value_head_dims_match_sdpa(name, mask, backend):
    """What SDPA takes, leanops takes: output and gradients equal SDPA's (float64 inputs, so any
    difference is the layout handling, not rounding)."""
    q, k, v, ours, theirs = _sdpa_case(name, mask)
    with leanops.use_backend(backend):
        got = leanops.attention(q.float(), k.float(), v.float(), **{
            key: val.float() if isinstance(val, torch.Tensor) else val for key, val in ours.items()})
    want = F.scaled_dot_product_attention(q, k, v, **theirs)
    assert got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(want)
    got_g = torch.autograd.grad(got, (q, k, v), g.float())
    want_g = torch.autograd.grad(want, (q, k, v), g)
    for name_, a, b in zip("qkv", got_g, want_g, strict=True):
        assert a.shape == b.shape, name_
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5, msg=name_)


def test_mask_over_several_batch_dims_matches_sdpa():
    q, k, v = (torch.randn(2, 3, h, s, 16) for h, s in ((4, 7), (2, 9), (2, 9)))
    mask = torch.rand(3, 1, 7, 9) > 0.3  # broadcast over the first batch dim and the heads
    mask[..., 0] = True
    got = leanops.attention(q, k, v, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_causal_value_head_dim_differs_matches_causal_lower_right():
    q, k, v = _qkv(sq=5, sk=9, dv=12, grad=True)
    got = leanops.attention(q, k, v, causal=True)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 9),
                                          enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, (q, k, v), g),
                               torch.autograd.grad(want, (q, k, v), g), rtol=1e-5, atol=1e-5)


def test_value_head_dim_decode_and_int8_shapes():
    """The decode and int8 ops follow v's head dim too (values: test_attention_triton.py and
    test_attention_cpu.py)."""
    q, k, v = _qkv(sq=1, sk=9, dv=12)
    assert leanops.attention_decode(q, k, v).shape == (2, 4, 1, 12)
    qh, kh, vh = _qkv(sq=5, sk=9, dv=12, dtype=torch.float16)
    assert leanops.attention_int8(qh, kh, vh).shape == (2, 4, 5, 12)
    assert leanops.attention_int8(qh[0], kh[0], vh[0]).shape == (4, 5, 12)  # 3-D, as attention


# ------------------------------------------------------------------------- argument errors


def _bad_calls():
    q, k, v = _qkv()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    t = torch.randn(7, 4, 16)
    q0, k0, v0 = _qkv(d=0)
    h0 = _qkv(d=0, dtype=torch.float16)
    return [
        (lambda: leanops.attention(q, k.half(), v), r"k must have q's dtype torch.float32"),
        (lambda: leanops.attention(q.double(), k.double(), v.double()), r"q must have dtype float16, bfloat16, float32; got torch.float64"),
        (lambda: leanops.attention(q[0, 0, 0], k, v), r"attention: q must be \[\.\.\., S, D\]"),
        (lambda: leanops.attention(q, k[..., :8], v), r"k must have q's head dim 16"),
        (lambda: leanops.attention(q, k, v[:, :, :5]), r"v must have k's length 9"),
        (lambda: leanops.attention(q[:, :3], k, v), r"heads of q \(3\) must be a multiple of that of k and v \(2\)"),
        (lambda: leanops.attention(q, *_qkv(b=3)[1:]), r"batch dims of q \(2,\), k \(3,\) and v \(3,\)"),
        (lambda: leanops.attention(q, k, torch.randn(2, 3, 9, 16)), r"k and v must have the same number of heads \(dim -3\), or one of them 1; got 2 and 3"),
        (lambda: leanops.attention(*_qkv(d=272)), r"q has head dim 272, which is not supported"),
        (lambda: leanops.attention(q, k, v, attn_mask=torch.ones(7, 8, dtype=torch.bool)), r"attn_mask must be broadcastable to \[\*batch, Hq, Sq, Sk\] = \(2, 4, 7, 9\)"),
        (lambda: leanops.attention(q, k, v, attn_mask=torch.ones(3, 1, 7, 9, dtype=torch.bool)), r"attn_mask must be broadcastable"),
        (lambda: leanops.attention(q, k, v, attn_mask=torch.ones(7, 9, dtype=torch.int32)), r"attn_mask must be bool"),
        (lambda: leanops.attention(q, k, v, window=(-2, 0)), r"window must be \(left, right\)"),
        (lambda: leanops.attention(q, k, v, softcap=-1.0), r"softcap must be a positive float"),
        (lambda: leanops.attention(q, k, v, scale="0.1x"), r"attention: scale must be a finite float or None, got '0.1x'"),
        (lambda: leanops.attention(q, k, v.to("meta")), r"q is on cpu but v is on meta"),
        (lambda: leanops.attention_varlen(t, t, t, cu.long(), cu, 4, 4), r"cu_seqlens_q must have dtype int32"),
        (lambda: leanops.attention_varlen(t, t, t, cu, cu[:2], 4, 4), r"cu_seqlens_q and cu_seqlens_k must both be \[B \+ 1\]"),
        (lambda: leanops.attention_varlen(q, k, v, cu, cu, 4, 4), r"q must be 3-D \[T, H, D\] \(varlen\)"),
        (lambda: leanops.attention_varlen(t, t, t[:5], cu, cu, 4, 4), r"v must have k's shape but for the head dim, \(7, 4\)"),
        (lambda: leanops.attention_decode(q, k, v, torch.tensor([1, 2])), r"cache_seqlens must have dtype int32"),
        (lambda: leanops.attention_decode(q, k, v, None, torch.zeros(2, 3, dtype=torch.int32)), r"cache_seqlens is required with a block_table"),
        (lambda: leanops.attention_decode(q, k, v, torch.ones(2, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.int32)), r"block_table must be \[B, max_pages\] with q's batch 2"),
        (lambda: leanops.attention_decode(q, k, v[:, :, :5]), r"v_cache must have k_cache's shape but for the head dim"),
        (lambda: leanops.attention_int8(q.double(), k.double(), v.double()), r"attention_int8: q must have dtype float16, bfloat16, float32; got torch.float64"),
        # issue 15: a head dim of 0 is named in every entry point, before the default scale
        # 1/sqrt(D) divides by it (it was a ZeroDivisionError)
        (lambda: leanops.attention(q0, k0, v0), r"attention: q has head dim 0, which is not supported; leanops attention supports head dims 1 to 256"),
        (lambda: leanops.attention(q, k, v[..., :0]), r"attention: v has head dim 0"),
        (lambda: leanops.attention_varlen(t[..., :0], t[..., :0], t[..., :0], cu, cu, 4, 4), r"attention_fwd: q has head dim 0"),
        (lambda: leanops.attention_decode(q0, k0, v0), r"attention_decode: q has head dim 0"),
        (lambda: leanops.attention_int8(*h0), r"attention_int8: q has head dim 0"),
        (lambda: ops.attention_fwd(q0, k0, v0), r"attention_fwd: q has head dim 0"),
    ]


@pytest.mark.parametrize("i", range(len(_bad_calls())))
def test_bad_arguments_raise_naming_the_argument(i):
    call, message = _bad_calls()[i]
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_arguments_are_caught_at_trace_time_too():
    q, k, v = _qkv()
    v = v[:, :, :3].contiguous()
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        with pytest.raises(ValueError, match="v must have k's length 9"):
            leanops.attention(fq, fk, fv)


def test_bias_gradient_is_refused_clearly():
    q, k, v = _qkv(grad=True)
    bias = torch.zeros(1, 1, 7, 9, requires_grad=True)
    with pytest.raises(NotImplementedError, match="does not compute a bias gradient"):
        leanops.attention(q, k, v, attn_mask=bias)


def test_decode_is_inference_only():
    q, k, v = _qkv(grad=True)
    with pytest.raises(NotImplementedError, match="attention_decode is inference only"):
        leanops.attention_decode(q, k, v)


# -------------------------------------------------------------------------------- opcheck


def _varlen_args(grad, dv=16):
    cu_q = torch.tensor([0, 2, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 9], dtype=torch.int32)
    q = torch.randn(7, 4, 16, requires_grad=grad)
    k = torch.randn(9, 2, 16, requires_grad=grad)
    v = torch.randn(9, 2, dv, requires_grad=grad)
    return (q, k, v, None, cu_q, cu_k, 5, 5, 0.25, -1, 0, 0.0)


def _fwd_args(grad, bias=False, dtype=torch.float32, dv=None, **kw):
    q, k, v = _qkv(sq=5, sk=6, dtype=dtype, grad=grad, dv=dv)
    b = torch.randn(2, 1, 5, 6, dtype=dtype) if bias else None
    return (q, k, v, b, None, None, 0, 0, 0.25, kw.get("wl", -1), kw.get("wr", 0), kw.get("cap", 0.0))


def _bwd_args(dv=None):
    q, k, v = _qkv(sq=5, sk=6, dv=dv)
    with leanops.use_backend("reference"):
        out, lse = ops.attention_fwd(q, k, v, window_right=0, scale=0.25)
    return (torch.randn_like(out), q, k, v, out, lse, None, None, None, 0, 0, 0.25, -1, 0, 0.0)


def _int8_bwd_args(dv=None):
    q, k, v = _qkv(sq=5, sk=70, dtype=torch.float16, dv=dv)
    with leanops.use_backend("reference"):
        out, lse = torch.ops.leanops.attention_int8(q, k, v, None, None, None, 0, 0, 0.25, -1, 0,
                                                    0.0, True)
    return (torch.randn_like(out), q, k, v, out, lse, None, None, None, 0, 0, 0.25, -1, 0, 0.0,
            True)


def _decode_args(dv=16):
    q = torch.randn(2, 4, 2, 16, dtype=torch.float16)
    k = torch.randn(5, 2, 4, 16, dtype=torch.float16)
    v = torch.randn(5, 2, 4, dv, dtype=torch.float16)
    table = torch.tensor([[4, 0], [1, 2]], dtype=torch.int32)
    return (q, k, v, torch.tensor([7, 3], dtype=torch.int32), table, 0.25, -1, 0, 0.0)


def _bshd(args):
    """q, k, v of an attention_fwd argument tuple as [B, H, S, D] views of [B, S, H, D] memory."""
    q, k, v = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(t.requires_grad)
               for t in args[:3])
    return (q, k, v, *args[3:])


# case -> (op, arguments); "dv" cases have a value head dim other than the query/key one
OPCHECK_CASES = {
    "fwd": ("attention_fwd", lambda: _fwd_args(False)),
    "fwd_grad": ("attention_fwd", lambda: _fwd_args(True, wl=2, cap=3.0)),
    "fwd_bias_grad": ("attention_fwd", lambda: _fwd_args(True, bias=True, wr=-1)),
    "fwd_varlen_grad": ("attention_fwd", lambda: _varlen_args(True)),
    "fwd_short_q_grad": ("attention_fwd", lambda: (*_qkv(sq=2, sk=6, grad=True), None, None, None, 0, 0, 0.25, -1, 0, 0.0)),
    "fwd_dv_grad": ("attention_fwd", lambda: _fwd_args(True, dv=24, wl=3)),
    "fwd_dv_bshd_grad": ("attention_fwd", lambda: _bshd(_fwd_args(True, dv=8, bias=True))),
    "fwd_dv_varlen_grad": ("attention_fwd", lambda: _varlen_args(True, dv=24)),
    "bwd": ("attention_bwd", _bwd_args),
    "bwd_dv": ("attention_bwd", lambda: _bwd_args(dv=8)),
    "decode": ("attention_decode", _decode_args),
    "decode_dv": ("attention_decode", lambda: _decode_args(dv=24)),
    "int8": ("attention_int8", lambda: (*_qkv(sq=5, sk=70, dtype=torch.float16), None, None, None, 0, 0, 0.25, -1, 0, 0.0, True)),
    "int8_dv": ("attention_int8", lambda: (*_qkv(sq=5, sk=70, dtype=torch.float16, dv=8), None, None, None, 0, 0, 0.25, -1, 0, 0.0, True)),
    "int8_grad": ("attention_int8", lambda: (*_fwd_args(True, dtype=torch.float16, wl=2, cap=3.0), True)),
    "int8_dv_bias_grad": ("attention_int8", lambda: (*_fwd_args(True, bias=True, dv=24, wr=-1), False)),
    "int8_varlen_grad": ("attention_int8", lambda: (*_varlen_args(True), True)),
    "int8_bwd": ("attention_int8_bwd", _int8_bwd_args),
    "int8_bwd_dv": ("attention_int8_bwd", lambda: _int8_bwd_args(dv=8)),
}


# None: the automatic choice, the CPU path on these CPU tensors
@pytest.mark.parametrize("backend", ["reference", None, "triton"], ids=["reference", "cpu-path", "triton"])
@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter")
    name, args = OPCHECK_CASES[case]
    with leanops.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.leanops, name).default, args())


# ------------------------------------------------------------------------- torch.compile


class _TinyBlock(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.op = op
        self.qkv = nn.Linear(32, 96)
        self.out = nn.Linear(32, 32)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).unbind(2)
        o = self.op(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                    window=(4, 0))
        return self.out(o.transpose(1, 2).reshape(b, s, 32))


@pytest.mark.parametrize("op", ["attention", "attention_int8"])
def test_torch_compile_fullgraph_forward_and_backward(op):
    """Forward and backward of a block traced in one graph (fullgraph: a graph break raises);
    attention_int8's registered autograd (attention_int8_bwd) included."""
    torch._dynamo.reset()
    block = _TinyBlock(getattr(leanops, op))
    x = torch.randn(2, 70 if op == "attention_int8" else 11, 32, requires_grad=True)
    eager = block(x)
    g_eager = torch.autograd.grad(eager.sum(), (x, block.qkv.weight))
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    g = torch.autograd.grad(out.sum(), (x, block.qkv.weight))
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(g, g_eager)


# ------------------------------------------------------------- leanops.nn.MultiheadAttention


def _pair(**kw):
    ref = nn.MultiheadAttention(**kw)
    ours = leanops.nn.MultiheadAttention(**kw)
    ours.load_state_dict(ref.state_dict())  # same parameter names, strict
    return ref.eval(), ours.eval()


MHA_CASES = {
    "self-batch-first": dict(kw=dict(embed_dim=32, num_heads=4, batch_first=True), self_attn=True),
    "cross-seq-first-kdim": dict(kw=dict(embed_dim=32, num_heads=2, kdim=24, vdim=20), self_attn=False),
    "no-bias": dict(kw=dict(embed_dim=48, num_heads=3, bias=False, batch_first=True), self_attn=False),
}


@pytest.mark.parametrize("case", sorted(MHA_CASES))
@pytest.mark.parametrize("masks", ["none", "bool", "float+padding", "causal"])
def test_multihead_attention_matches_torch(case, masks):
    c = MHA_CASES[case]
    ref, ours = _pair(**c["kw"])
    kw = c["kw"]
    e, bf = kw["embed_dim"], kw.get("batch_first", False)
    b, lq = 3, 6
    lk = lq if c["self_attn"] or masks == "causal" else 8

    def seq(n, dim):
        return torch.randn(b, n, dim) if bf else torch.randn(n, b, dim)

    query = seq(lq, e)
    key = query if c["self_attn"] else seq(lk, kw.get("kdim", e))
    value = query if c["self_attn"] else seq(lk, kw.get("vdim", e))
    args = {}
    if masks == "bool":
        m = torch.rand(lq, lk) > 0.7  # True = not allowed (torch's MHA convention)
        m[:, 0] = False
        args["attn_mask"] = m
    elif masks == "float+padding":
        args["attn_mask"] = torch.randn(b * kw["num_heads"], lq, lk)
        pad = torch.zeros(b, lk)
        pad[1, -2:] = float("-inf")
        args["key_padding_mask"] = pad
    elif masks == "causal":
        args["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(lq)
        args["is_causal"] = True
    want, _ = ref(query, key, value, need_weights=False, **args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path must not fall back (or warn)
        got, w = ours(query, key, value, need_weights=False, **args)
    assert w is None
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_multihead_attention_unbatched_gradients_and_from_torch():
    ref = nn.MultiheadAttention(16, 2)
    ours = leanops.nn.MultiheadAttention.from_torch(ref)
    assert isinstance(ours, nn.MultiheadAttention)
    x = torch.randn(5, 16, requires_grad=True)  # unbatched [L, E]
    want, _ = ref(x, x, x, need_weights=False)
    got, _ = ours(x, x, x, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gw = torch.autograd.grad(want.square().sum(), (x, ref.in_proj_weight))
    gg = torch.autograd.grad(got.square().sum(), (x, ours.in_proj_weight))
    torch.testing.assert_close(gg, gw, rtol=1e-5, atol=1e-5)


def test_multihead_attention_falls_back_with_one_warning():
    ref, ours = _pair(embed_dim=16, num_heads=2, add_bias_kv=True)
    x = torch.randn(4, 2, 16)
    leanops.nn.MultiheadAttention._warned.clear()
    with pytest.warns(RuntimeWarning, match="need_weights=True"):
        got, weights = ours(x, x, x)  # torch's defaults: need_weights=True
    want, want_w = ref(x, x, x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(weights, want_w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(x, x, x)  # the same reason warns once only
    with pytest.warns(RuntimeWarning, match="add_bias_kv"):
        ours(x, x, x, need_weights=False)


def test_multihead_attention_compiles_fullgraph():
    torch._dynamo.reset()
    mha = leanops.nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 32)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, -3:] = True
    eager, _ = mha(x, x, x, key_padding_mask=mask, need_weights=False)
    compiled = torch.compile(lambda t: mha(t, t, t, key_padding_mask=mask, need_weights=False)[0],
                             backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), eager)


# ------------------------------------------------------------------- Hugging Face transformers


def test_register_transformers_without_transformers_returns_false(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("no transformers")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    assert leanops.integrations.register_transformers() is False


def _hf_matches_eager(transformers, model, path):
    """`model` saved to `path` and reloaded with attn_implementation="leanops" and "eager":
    logits agree with and without (left) padding, and so does a cached decode step."""
    assert leanops.integrations.register_transformers()
    model.save_pretrained(path)
    models = {impl: transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl).eval()
              for impl in ("eager", "leanops")}
    assert models["leanops"].config._attn_implementation == "leanops"
    ids = torch.randint(0, 128, (2, 11))
    pad = torch.ones(2, 11, dtype=torch.long)
    pad[1, :3] = 0  # left padding
    with torch.no_grad():
        for mask in (None, pad):
            want = models["eager"](ids, attention_mask=mask).logits
            got = models["leanops"](ids, attention_mask=mask).logits
            keep = slice(None) if mask is None else mask.bool()
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
        outs = {}
        for impl, m in models.items():
            first = m(ids, use_cache=True)
            nxt = first.logits[:, -1:].argmax(-1)
            outs[impl] = m(nxt, past_key_values=first.past_key_values, use_cache=True).logits
        torch.testing.assert_close(outs["leanops"], outs["eager"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_transformers_attn_implementation_leanops(tmp_path):
    """A tiny random-weight Llama (GQA, vocabulary 128) through the leanops attention
    implementation matches "eager"."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    _hf_matches_eager(transformers, transformers.LlamaForCausalLM(cfg), tmp_path)


@pytest.mark.slow
def test_transformers_deepseek_v3_multi_head_latent_attention(tmp_path):
    """DeepSeek-V3's MLA passes value states with a head dim (12) other than the query/key one
    (16 + 8 rope): attn_implementation="leanops" now takes them as they come (it raised "v must
    have k's shape") and matches "eager"."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    if not hasattr(transformers, "DeepseekV3Config"):
        pytest.skip("this transformers has no DeepSeek-V3")
    cfg = transformers.DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=1,
        topk_group=1, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=12, max_position_embeddings=64)
    torch.manual_seed(0)
    _hf_matches_eager(transformers, transformers.DeepseekV3ForCausalLM(cfg), tmp_path)
