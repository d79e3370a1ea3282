"""The op layer: schemas and fake kernels (opcheck), the reference numerics, argument errors that
name the argument, backend selection, autograd."""

import leanops
import pytest
import torch
from leanops import ops
from leanops.quant import dequantize_int4, quantize_int4, quantize_int8_per_channel


def _int8_mm_args(m=5, n=7, k=33, bias=True, out_dtype=torch.float16):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    return (a, b, torch.rand(m) + 0.01, torch.rand(n) + 0.01, torch.randn(n) if bias else None, out_dtype)


def _int4_args(m=3, n=10, k=64, g=32, symmetric=False, dtype=torch.float32, bias=True):
    packed, scales, zeros = quantize_int4(torch.randn(n, k), g, symmetric, scale_dtype=dtype)
    x = torch.randn(m, k, dtype=dtype)
    return (x, packed, scales, zeros, g, torch.randn(n, dtype=dtype) if bias else None)


def _int8_weight_args(m=3, n=10, k=50, dtype=torch.float32, bias=True):
    w, s = quantize_int8_per_channel(torch.randn(n, k))
    return (torch.randn(m, k, dtype=dtype), w, s, torch.randn(n, dtype=dtype) if bias else None)


# case -> (the public op, its arguments): the shape of every OPCHECK_CASES (tests/test_attention.py,
# test_sparse_ops.py; tests/test_opcheck_cuda.py runs them all on CUDA)
OPCHECK_CASES = {
    "int8_mm": ("int8_mm", lambda: _int8_mm_args()),
    "int8_mm_nobias_default_dtype": ("int8_mm", lambda: _int8_mm_args(bias=False)[:4]),
    "int8_weight_mm": ("int8_weight_mm", lambda: _int8_weight_args()),
    "int8_weight_mm_grad": ("int8_weight_mm", lambda: tuple(
        t.requires_grad_() if i in (0, 3) else t for i, t in enumerate(_int8_weight_args())
    )),
    "int4_weight_mm_asym": ("int4_weight_mm", lambda: _int4_args()),
    "int4_weight_mm_sym_grad": ("int4_weight_mm", lambda: tuple(
        t.requires_grad_() if i == 0 else t for i, t in enumerate(_int4_args(symmetric=True, bias=False))
    )),
    "quantize_per_token_int8": ("quantize_per_token_int8", lambda: (torch.randn(6, 40),)),
    "quantize_per_token_int8_smooth": (
        "quantize_per_token_int8", lambda: (torch.randn(6, 40), torch.rand(40) + 0.5)
    ),
    "int8_dynamic_linear": ("int8_dynamic_linear", lambda: (
        torch.randn(4, 50, requires_grad=True),
        *quantize_int8_per_channel(torch.randn(9, 50)),
        torch.rand(50) + 0.5,
        torch.randn(9, requires_grad=True),
    )),
}


@pytest.mark.parametrize("backend", ["reference", "triton", "cpu"])
@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter")  # Triton on CPU tensors: interpreter only
    name, args = OPCHECK_CASES[case]
    with leanops.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.leanops, name).default, args())


def test_int8_mm_reference_is_exact_integer_math_then_fp32_epilogue():
    a, b, sa, sb, bias, _ = _int8_mm_args(m=17, n=9, k=301)
    out = ops.int8_mm(a, b, sa, sb, bias, torch.float32)
    acc = (a.long() @ b.long().t()).float()  # independent exact integer product
    assert torch.equal(out, acc * sa[:, None] * sb[None, :] + bias)
    assert ops.int8_mm(a, b, sa, sb).dtype == torch.bfloat16  # out_dtype defaults to bf16


def test_weight_only_references_match_dense_math():
    x, w, s, bias = _int8_weight_args(m=4, n=6, k=70)
    expected = x.double() @ (w.double() * s.double()[:, None]).t() + bias.double()
    assert torch.allclose(ops.int8_weight_mm(x, w, s, bias).double(), expected, rtol=1e-5, atol=1e-5)
    x, packed, scales, zeros, g, bias = _int4_args(m=4, n=6, k=96)
    dense = dequantize_int4(packed, scales, zeros, g)
    expected = x.double() @ dense.double().t() + bias.double()
    assert torch.allclose(ops.int4_weight_mm(x, packed, scales, zeros, g, bias).double(), expected, rtol=1e-5, atol=1e-5)


def test_int8_dynamic_linear_is_quantise_then_int8_mm():
    x = torch.randn(5, 64)
    w, s = quantize_int8_per_channel(torch.randn(12, 64))
    smooth = torch.rand(64) + 0.5
    q, qs = ops.quantize_per_token_int8(x, smooth)
    assert torch.equal(ops.int8_dynamic_linear(x, w, s, smooth), ops.int8_mm(q, w, qs, s, None, x.dtype))


@pytest.mark.parametrize(
    "call",
    [
        lambda: ops.int8_mm(*_int8_mm_args(m=0)),
        lambda: ops.int8_weight_mm(*_int8_weight_args(m=0)),
        lambda: ops.int4_weight_mm(*_int4_args(m=0)),
    ],
)
def test_empty_batch_gives_empty_output(call):
    out = call()
    assert out.shape[0] == 0 and out.shape[1] > 0


def test_non_contiguous_activations_are_accepted():
    x, packed, scales, zeros, g, bias = _int4_args(m=6, k=64)
    wide = torch.randn(6, 100)
    wide[:, 10:74] = x
    strided = wide[:, 10:74]
    assert not strided.is_contiguous()
    # Same math; BLAS may sum in another order for a strided operand, hence not bit-equal.
    torch.testing.assert_close(
        ops.int4_weight_mm(strided, packed, scales, zeros, g, bias),
        ops.int4_weight_mm(x, packed, scales, zeros, g, bias),
        rtol=1e-6, atol=1e-5,
    )


# --------------------------------------------------------------------------- argument errors


def _bad(args, index, value):
    args = list(args)
    args[index] = value
    return args


BAD_CALLS = [
    # (op, args, message that must name the argument and what is allowed)
    (ops.int8_mm, _bad(_int8_mm_args(), 0, torch.randn(5, 33)), r"a must have dtype int8"),
    (ops.int8_mm, _bad(_int8_mm_args(), 1, torch.zeros(7, 32, dtype=torch.int8)), r"b must be \[N, K\] with the K of a \(33\)"),
    (ops.int8_mm, _bad(_int8_mm_args(), 1, torch.zeros(33, 7, dtype=torch.int8).t()), r"b must be contiguous"),
    (ops.int8_mm, _bad(_int8_mm_args(), 2, torch.rand(5, 1)), r"a_scale must have shape \(5,\)"),
    (ops.int8_mm, _bad(_int8_mm_args(), 3, torch.ones(7, dtype=torch.int32)), r"b_scale must have dtype float16, bfloat16, float32"),
    (ops.int8_mm, _bad(_int8_mm_args(), 4, torch.randn(8)), r"bias must have shape \(7,\)"),
    (ops.int8_mm, _bad(_int8_mm_args(), 5, torch.int8), r"out_dtype must be one of float16, bfloat16, float32"),
    (ops.int8_weight_mm, _bad(_int8_weight_args(), 0, torch.randn(3, 50, dtype=torch.float64)), r"x must have dtype float16, bfloat16, float32"),
    (ops.int8_weight_mm, _bad(_int8_weight_args(), 0, torch.randn(3, 49)), r"w must be \[N, K\] with the K of x \(49\)"),
    (ops.int8_weight_mm, _bad(_int8_weight_args(), 1, torch.zeros(10, 50, dtype=torch.uint8)), r"w must have dtype int8"),
    (ops.int8_weight_mm, _bad(_int8_weight_args(), 2, torch.ones(9)), r"w_scale must have shape \(10,\)"),
    (ops.int4_weight_mm, _bad(_int4_args(), 0, torch.randn(3, 64, 1)), r"x must be 2-D"),
    (ops.int4_weight_mm, _bad(_int4_args(), 1, torch.zeros(10, 32, dtype=torch.int8)), r"w_packed must have dtype uint8"),
    (ops.int4_weight_mm, _bad(_int4_args(), 1, torch.zeros(10, 31, dtype=torch.uint8)), r"w_packed must be uint8 \[N, K/2\] with K = 64"),
    (ops.int4_weight_mm, _bad(_int4_args(), 1, torch.zeros(32, 10, dtype=torch.uint8).t()), r"w_packed must be contiguous"),
    (ops.int4_weight_mm, _bad(_int4_args(), 4, 48), r"group_size must be a positive multiple of 32"),
    (ops.int4_weight_mm, _bad(_int4_args(k=96), 4, 64), r"in_features \(K=96\) must be divisible by group_size=64"),
    (ops.int4_weight_mm, _bad(_int4_args(), 2, torch.ones(10, 3)), r"scales must have shape \(10, 2\)"),
    (ops.int4_weight_mm, _bad(_int4_args(), 3, torch.zeros(10, 2, dtype=torch.int32)), r"zeros must have dtype uint8"),
    (ops.quantize_per_token_int8, [torch.randint(0, 5, (3, 4))], r"x must have dtype float16, bfloat16, float32"),
    (ops.quantize_per_token_int8, [torch.randn(3, 4), torch.ones(5)], r"smooth must have shape \(4,\)"),
    (ops.quantize_per_token_int8, [torch.randn(3, 0)], r"x must have at least one column"),
]


@pytest.mark.parametrize("op,args,message", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_bad_arguments_raise_naming_the_argument(op, args, message):
    with pytest.raises(ValueError, match=message):
        op(*args)


def test_bad_arguments_are_caught_at_trace_time_too():
    args = _bad(_int4_args(), 4, 48)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
            ops.int4_weight_mm(*fake_args)


def test_mixed_devices_are_rejected():
    x, w, s, bias = _int8_weight_args()
    with pytest.raises(ValueError, match="all tensors must be on one device; x is on cpu but w_scale is on meta"):
        ops.int8_weight_mm(x, w, s.to("meta"), bias)


# ------------------------------------------------------------------------------- backends


def test_use_backend_validates_its_argument():
    with pytest.raises(ValueError, match="name must be one of"):
        leanops.use_backend("cutlass")


def test_forced_backend_that_cannot_run_raises_with_the_reason(monkeypatch):
    args = _int8_weight_args()
    with leanops.use_backend("cuda"), pytest.raises(RuntimeError, match="forced backend 'cuda' cannot run"):
        ops.int8_weight_mm(*args)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with leanops.use_backend("triton"), pytest.raises(RuntimeError, match="only under the interpreter"):
        ops.int8_weight_mm(*args)


def test_use_backend_is_scoped_and_nests():
    from leanops.dispatch import forced_backend

    assert forced_backend() is None
    with leanops.use_backend("reference"):
        assert forced_backend() == "reference"
        with leanops.use_backend("triton"):
            assert forced_backend() == "triton"
        assert forced_backend() == "reference"
    assert forced_backend() is None

    @leanops.use_backend("reference")
    def decorated():
        return forced_backend()

    assert decorated() == "reference"


def test_backends_report_says_what_runs_and_why_not():
    report = leanops.backends()
    assert set(report) == {"cuda", "triton", "cpu", "reference", "device"}
    assert report["reference"]["available"] is True
    for name in ("cuda", "triton", "cpu"):
        entry = report[name]
        assert isinstance(entry["available"], bool)
        assert entry["available"] or (isinstance(entry["reason"], str) and entry["reason"])
    if not torch.cuda.is_available():
        assert report["cuda"]["available"] is False


# ------------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("kind", ["int8_weight", "int4", "int8_dynamic"])
def test_gradients_of_x_and_bias_match_dense_math(kind):
    k, n = 64, 24
    x = torch.randn(2, 5, k).reshape(10, k).requires_grad_()
    bias = torch.randn(n, requires_grad=True)
    if kind == "int8_weight":
        w, s = quantize_int8_per_channel(torch.randn(n, k))
        out = ops.int8_weight_mm(x, w, s, bias)
        dense = w.float() * s[:, None]
    elif kind == "int4":
        packed, scales, zeros = quantize_int4(torch.randn(n, k), 32, symmetric=False)
        out = ops.int4_weight_mm(x, packed, scales, zeros, 32, bias)
        dense = dequantize_int4(packed, scales, zeros, 32)
    else:
        w, s = quantize_int8_per_channel(torch.randn(n, k))
        smooth = torch.rand(k) + 0.5
        out = ops.int8_dynamic_linear(x, w, s, smooth, bias)
        dense = w.float() * s[:, None] * smooth[None, :]  # straight-through: d out / d x
    grad = torch.randn_like(out)
    out.backward(grad)
    assert torch.allclose(x.grad, grad @ dense, rtol=1e-5, atol=1e-5)
    assert torch.allclose(bias.grad, grad.sum(0), rtol=1e-5, atol=1e-5)


def test_gradcheck_of_x_on_the_reference_path():
    # gradcheck wants float64, which the kernels do not take; check the analytic gradient of the
    # op against finite differences in fp32 with a loose tolerance instead, where the op is linear.
    packed, scales, zeros = quantize_int4(torch.randn(6, 32), 32)
    x = torch.randn(3, 32, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: ops.int4_weight_mm(x, packed, scales, zeros, 32), (x,), eps=1e-2, atol=1e-2, rtol=1e-2
    )


def test_frozen_weight_tensors_cannot_require_grad():
    x, w, s, bias = _int8_weight_args()
    s = s.clone().requires_grad_()
    with pytest.raises(NotImplementedError, match="frozen"):
        ops.int8_weight_mm(x.requires_grad_(), w, s, bias)


def test_int8_mm_gives_bias_a_gradient_and_refuses_scale_gradients():
    a, b, sa, sb, bias, dtype = _int8_mm_args(out_dtype=torch.float32)
    bias.requires_grad_()
    out = ops.int8_mm(a, b, sa, sb, bias, dtype)
    out.sum().backward()
    assert torch.equal(bias.grad, torch.full_like(bias, a.shape[0]))
    with pytest.raises(NotImplementedError, match="a_scale/b_scale cannot require grad"):
        ops.int8_mm(a, b, sa.requires_grad_(), sb, None, dtype)
