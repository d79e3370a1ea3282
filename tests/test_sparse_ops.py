"""leanops::sparse24_mm and leanops::sparse24_int4_mm at the op layer: opcheck (reference and
Triton backends), the reference numerics, argument errors naming the argument, autograd."""

import leanops
import pytest
import torch
from leanops import ops
from leanops.sparsity import (
    compress_24,
    compress_24_int4,
    decompress_24,
    decompress_24_int4,
    nm_mask,
)


def _weight(n, k):
    w = torch.randn(n, k)
    return w, nm_mask(w.abs())


def _sparse_args(m=3, n=10, k=40, dtype=torch.float32, bias=True):
    w, mask = _weight(n, k)
    values, meta = compress_24(w.to(dtype), mask)
    x = torch.randn(m, k, dtype=dtype)
    return (x, values, meta, torch.randn(n, dtype=dtype) if bias else None)


def _int4_args(m=3, n=10, k=128, g=64, symmetric=False, dtype=torch.float32, bias=True):
    w, mask = _weight(n, k)
    values, scales, zeros, meta = compress_24_int4(w, g, symmetric, mask, scale_dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    return (x, values, meta, scales, zeros, g, torch.randn(n, dtype=dtype) if bias else None)


def _grad(args, *indices):
    return tuple(t.requires_grad_() if i in indices else t for i, t in enumerate(args))


OPCHECK_CASES = {  # case -> (the public op, its arguments), as in tests/test_ops.py
    "sparse24_mm_nobias_fp16": ("sparse24_mm", lambda: _sparse_args(dtype=torch.float16, bias=False)[:3]),
    "sparse24_mm_grad": ("sparse24_mm", lambda: _grad(_sparse_args(), 0, 3)),
    "sparse24_int4_mm_asym": ("sparse24_int4_mm", lambda: _int4_args()),
    "sparse24_int4_mm_sym_grad": (
        "sparse24_int4_mm", lambda: _grad(_int4_args(symmetric=True, g=128, bias=False), 0)
    ),
}


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter")
    name, args = OPCHECK_CASES[case]
    with leanops.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.leanops, name).default, args())


def test_references_are_dense_math_on_the_decompressed_weight():
    x, values, meta, bias = _sparse_args(m=4, n=6, k=72)
    dense = decompress_24(values, meta)
    expected = x.double() @ dense.double().t() + bias.double()
    torch.testing.assert_close(ops.sparse24_mm(x, values, meta, bias).double(), expected, rtol=1e-5, atol=1e-5)
    x, values, meta, scales, zeros, g, bias = _int4_args(m=4, n=6, k=192)
    dense = decompress_24_int4(values, scales, zeros, meta, g)
    expected = x.double() @ dense.double().t() + bias.double()
    got = ops.sparse24_int4_mm(x, values, meta, scales, zeros, g, bias).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_values_dtype_may_differ_from_x():
    w, mask = _weight(8, 64)
    values, meta = compress_24(w, mask)  # fp32 values, fp16 activations: W is converted to x's dtype
    x = torch.randn(5, 64, dtype=torch.float16)
    out = ops.sparse24_mm(x, values, meta)
    assert out.dtype == torch.float16
    dense = decompress_24(values, meta).half()
    torch.testing.assert_close(out, (x.float() @ dense.float().t()).half(), rtol=0, atol=0)


def test_empty_batch_gives_empty_output():
    x, values, meta, bias = _sparse_args(m=0)
    assert ops.sparse24_mm(x, values, meta, bias).shape == (0, 10)
    args = _int4_args(m=0)
    assert ops.sparse24_int4_mm(*args).shape == (0, 10)


def _bad(args, index, value):
    args = list(args)
    args[index] = value
    return args


S, Q = _sparse_args, _int4_args
BAD_CALLS = [
    (ops.sparse24_mm, _bad(S(), 0, torch.randn(3, 40, dtype=torch.float64)), r"sparse24_mm: x must have dtype float16, bfloat16, float32"),
    (ops.sparse24_mm, _bad(S(), 0, torch.randn(3, 40, 1)), r"x must be 2-D"),
    (ops.sparse24_mm, _bad(S(), 0, torch.randn(3, 36)), r"x has K = 36 columns \(in_features\); the 2:4 format needs K a multiple of 8"),
    (ops.sparse24_mm, _bad(S(), 1, torch.zeros(10, 20, dtype=torch.int8)), r"values must have dtype float16, bfloat16, float32"),
    (ops.sparse24_mm, _bad(S(), 1, torch.zeros(10, 24)), r"values must be \[N, K/2\] with K = 40"),
    (ops.sparse24_mm, _bad(S(), 1, torch.zeros(20, 10).t()), r"values must be contiguous"),
    (ops.sparse24_mm, _bad(S(), 2, torch.zeros(10, 5, dtype=torch.int8)), r"meta must have dtype uint8"),
    (ops.sparse24_mm, _bad(S(), 2, torch.zeros(10, 4, dtype=torch.uint8)), r"meta must be uint8 \[N, K/8\] = \(10, 5\)"),
    (ops.sparse24_mm, _bad(S(), 2, torch.zeros(5, 10, dtype=torch.uint8).t()), r"meta must be contiguous"),
    (ops.sparse24_mm, _bad(S(), 3, torch.randn(9)), r"bias must have shape \(10,\)"),
    (ops.sparse24_int4_mm, _bad(Q(), 1, torch.zeros(10, 64)), r"sparse24_int4_mm: values must have dtype uint8"),
    (ops.sparse24_int4_mm, _bad(Q(), 1, torch.zeros(10, 64, dtype=torch.uint8)), r"values must be uint8 \[N, K/4\] .* K = 128"),
    (ops.sparse24_int4_mm, _bad(Q(), 2, torch.zeros(10, 15, dtype=torch.uint8)), r"meta must be uint8 \[N, K/8\] = \(10, 16\)"),
    (ops.sparse24_int4_mm, _bad(Q(), 5, 32), r"group_size must be a positive multiple of 64"),
    (ops.sparse24_int4_mm, _bad(Q(k=192), 5, 128), r"in_features \(K=192\) must be divisible by group_size=128"),
    (ops.sparse24_int4_mm, _bad(Q(), 3, torch.ones(10, 3)), r"scales must have shape \(10, 2\)"),
    (ops.sparse24_int4_mm, _bad(Q(), 4, torch.zeros(10, 2, dtype=torch.int32)), r"zeros must have dtype uint8"),
    (ops.sparse24_int4_mm, _bad(Q(), 0, torch.randn(3, 136)), r"x has K = 136|values must be uint8 \[N, K/4\] .* K = 136"),
]


@pytest.mark.parametrize("op,args,message", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_bad_arguments_raise_naming_the_argument(op, args, message):
    with pytest.raises(ValueError, match=message):
        op(*args)


def test_bad_arguments_are_caught_at_trace_time_too():
    args = _bad(S(), 2, torch.zeros(10, 4, dtype=torch.uint8))
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match=r"meta must be uint8 \[N, K/8\]"):
            ops.sparse24_mm(*fake)


def test_mixed_devices_are_rejected():
    x, values, meta, bias = S()
    with pytest.raises(ValueError, match="x is on cpu but meta is on meta"):
        ops.sparse24_mm(x, values, meta.to("meta"), bias)


@pytest.mark.parametrize("kind", ["sparse", "int4"])
def test_gradients_of_x_and_bias_match_dense_math(kind):
    if kind == "sparse":
        x, values, meta, bias = S(m=10, n=24, k=64)
        dense = decompress_24(values, meta)
        call = lambda x, b: ops.sparse24_mm(x, values, meta, b)  # noqa: E731
    else:
        x, values, meta, scales, zeros, g, bias = Q(m=10, n=24, k=128)
        dense = decompress_24_int4(values, scales, zeros, meta, g)
        call = lambda x, b: ops.sparse24_int4_mm(x, values, meta, scales, zeros, g, b)  # noqa: E731
    x.requires_grad_()
    bias.requires_grad_()
    out = call(x, bias)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, grad.sum(0), rtol=1e-5, atol=1e-5)


def test_compressed_weight_cannot_require_grad():
    x, values, meta, bias = S()
    with pytest.raises(NotImplementedError, match="frozen"):
        ops.sparse24_mm(x, values.requires_grad_(), meta, bias)


def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    x, values, meta, bias = S(m=5, n=12, k=64)
    fn = torch.compile(lambda x: torch.relu(ops.sparse24_mm(x, values, meta, bias)), fullgraph=True)
    torch.testing.assert_close(fn(x), torch.relu(ops.sparse24_mm(x, values, meta, bias)))
