"""The "cpu" backend (kernels/cpu/ through leanops.dispatch): every CPU kernel against the PyTorch
reference, in both implementations this machine can run (AVX-512 where the CPU has it, and the
portable one everywhere), on odd shapes, non-contiguous inputs, with and without bias, M = 0, 1
and across the small-M / large-M switch (kGemvMaxRows = 4).

The int8 paths are integer arithmetic then the reference's fp32 epilogue: bit-exact. The
weight-only paths form the dense weight exactly as the reference does (checked bit for bit by
multiplying with one-hot rows) and are held to the 2x rule for their fp32 sums.
"""

import os
import warnings

import leanops
import pytest
import torch
import torch.nn.functional as F
from gemm_checks import assert_2x_rule, assert_matches_dense, reference, strided_views
from helpers import poisoned_memory
from leanops import dispatch, ops
from leanops.ops import int4 as int4_ops
from leanops.ops import int8 as int8_ops
from leanops.ops import sparse24 as sparse_ops
from leanops.quant import dequantize_int4, quantize_int4, quantize_int8_per_channel
from leanops.sparsity import compress_24, compress_24_int4, decompress_24, decompress_24_int4
from leanops.sparsity.masks import nm_mask

if dispatch.extension() is None:
    pytest.skip("leanops._C is not loaded: no CPU kernels", allow_module_level=True)

CPU_ISA = torch.ops.leanops_cpu
ISAS = ["generic"] + (["avx512"] if CPU_ISA.detected_isa() == "avx512" else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
GEMV_ROWS = 4  # kernels/cpu/cpu_kernels.h kGemvMaxRows: M above it takes the BLAS-tile path


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with each CPU implementation this machine has, then restore the default."""
    previous = CPU_ISA.set_isa(request.param)
    yield request.param
    CPU_ISA.set_isa(previous)


def on_cpu(fn, *args):
    """fn(*args) forced onto the cpu backend, outputs over poisoned memory (NaN where unwritten)."""
    with poisoned_memory(), leanops.use_backend("cpu"):
        return fn(*args)


def bias_of(n, dtype, with_bias):
    return torch.randn(n, dtype=dtype) if with_bias else None


# ------------------------------------------------------------------------------------ int8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 17), (5, 64), (17, 100), (2, 257)])
def test_quantize_per_token_is_bit_exact(isa, dtype, m, k):
    x = torch.randn(m, k, dtype=dtype) * 3
    smooth = torch.rand(k) + 0.5
    for args in ((x,), (x, smooth), (x.t().contiguous().t(),), (x[:, : max(1, k - 1)],)):
        q, s = on_cpu(ops.quantize_per_token_int8, *args)
        q_ref, s_ref = reference(ops.quantize_per_token_int8, *args)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_quantize_per_token_rows_with_nan_inf_zero_and_tiny_values(isa):
    x = torch.randn(6, 40)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2] = 0.0
    x[3] = 1e-40  # subnormal: the scale clamps to the smallest normal
    x[4, 5] = -float("inf")
    q, s = on_cpu(ops.quantize_per_token_int8, x)
    q_ref, s_ref = reference(ops.quantize_per_token_int8, x)
    assert torch.equal(q, q_ref)
    assert torch.equal(s.isnan(), s_ref.isnan()) and torch.equal(s[~s.isnan()], s_ref[~s_ref.isnan()])
    assert s[:2].isnan().all() and s[4].isnan() and (q[:2] == 0).all()


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", [(1, 64, 5), (3, 33, 1), (4, 100, 17), (17, 257, 33), (70, 64, 9)])
def test_int8_mm_is_bit_exact(isa, out_dtype, bias_dtype, m, k, n):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    sa, sb = torch.rand(m) * 1e-2 + 1e-4, torch.rand(n).to(torch.bfloat16) + 0.01
    bias = None if bias_dtype is None else torch.randn(n, dtype=bias_dtype)
    got = on_cpu(ops.int8_mm, a, b, sa, sb, bias, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, reference(ops.int8_mm, a, b, sa, sb, bias, out_dtype))


def test_int8_mm_reads_strided_a_in_place_or_copies(isa):
    a = torch.randint(-127, 128, (6, 80), dtype=torch.int8)
    b = torch.randint(-127, 128, (7, 80), dtype=torch.int8)
    sa, sb = torch.rand(6) + 0.1, torch.rand(7) + 0.1
    wide = torch.randint(-127, 128, (6, 200), dtype=torch.int8)
    for view in (a.t().contiguous().t(), wide[:, 13:93], a[:1].expand(6, 80)):
        got = on_cpu(ops.int8_mm, view, b, sa, sb, None, torch.float32)
        assert torch.equal(got, reference(ops.int8_mm, view, b, sa, sb, None, torch.float32))


def test_int8_mm_is_exact_where_int32_sums_would_overflow(isa):
    # 127 * 127 * 140000 > 2^31 (and the kernels' unsigned operand a + 128 makes the raw VNNI
    # sums larger still): the CPU kernels sum in chunks and in int64, the reference in float64
    k = 140_000
    a = torch.full((2, k), 127, dtype=torch.int8)
    a[1] = -127
    b = torch.full((3, k), 127, dtype=torch.int8)
    b[2, ::2] = -127
    ones = torch.ones(2), torch.ones(3)
    got = on_cpu(ops.int8_mm, a, b, *ones, None, torch.float32)
    assert torch.equal(got, reference(ops.int8_mm, a, b, *ones, None, torch.float32))
    assert got[0, 0] == float(127 * 127 * k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 5, 17])
def test_int8_dynamic_linear_is_bit_exact_with_the_two_ops(isa, dtype, m):
    k, n = 72, 19
    x = torch.randn(m, k, dtype=dtype)
    w, s = quantize_int8_per_channel(torch.randn(n, k))
    smooth, bias = torch.rand(k) + 0.5, torch.randn(n, dtype=dtype)
    for args in ((x, w, s, smooth, bias), (x, w, s, None, None), (x.t().contiguous().t(), w, s, None, bias)):
        got = on_cpu(ops.int8_dynamic_linear, *args)
        assert got.dtype == dtype and torch.equal(got, reference(ops.int8_dynamic_linear, *args))


# ------------------------------------------------------------------------------ weight-only


# Weight builders (n, k, x dtype) -> (the op's weight arguments, the dense matrix the reference
# multiplies x by, in x's dtype, and the per-column scale applied after the sum, or None).


def _int8_weight(n, k, dtype):
    w, s = quantize_int8_per_channel(torch.randn(n, k))
    return (w, s), w.to(dtype), s  # int8 codes are exact in every float dtype


def _int4_weight(n, k, dtype, g=32, symmetric=False, scale_dtype=None):
    packed, scales, zeros = quantize_int4(torch.randn(n, k), g, symmetric, scale_dtype=scale_dtype or dtype)
    return (packed, scales, zeros, g), dequantize_int4(packed, scales, zeros, g).to(dtype), None


def _sparse_weight(n, k, dtype, values_dtype=None):
    w = torch.randn(n, k, dtype=values_dtype or dtype)
    values, meta = compress_24(w, nm_mask(w.float().abs(), 2, 4))
    return (values, meta), decompress_24(values, meta).to(dtype), None


def _sparse_int4_weight(n, k, dtype, g=64, symmetric=False):
    w = torch.randn(n, k, dtype=dtype)
    values, scales, zeros, meta = compress_24_int4(w, g, symmetric, nm_mask(w.float().abs(), 2, 4))
    dense = decompress_24_int4(values, scales, zeros, meta, g).to(dtype)
    return (values, meta, scales, zeros, g), dense, None


def assert_weight_only_output(got, x, dense, scale, bias):
    """got = (x @ dense^T) * scale + bias: every output written, and the 2x rule against fp64,
    where the same-dtype PyTorch implementation is F.linear with the dequantised weight."""
    if scale is None:
        return assert_matches_dense(got, x, dense, bias)
    assert got.dtype == x.dtype and got.shape == (x.shape[0], dense.shape[0])
    assert not got.isnan().any(), "unwritten (NaN-poisoned) outputs"
    ref64 = (x.double() @ dense.double().t()) * scale.double()
    if bias is not None:
        ref64 = ref64 + bias.double()
    same_dtype = F.linear(x, (dense.float() * scale[:, None]).to(x.dtype), bias)
    assert_2x_rule(got, ref64, same_dtype, x.dtype)


# name -> (op, weight builder, legal Ks)
WEIGHT_ONLY = {
    "int8_weight_mm": (ops.int8_weight_mm, _int8_weight, (8, 100, 256)),
    "int4_weight_mm": (ops.int4_weight_mm, _int4_weight, (32, 96, 256)),
    "int4_weight_mm_sym_g64_fp32_scales": (
        ops.int4_weight_mm,
        lambda n, k, dt: _int4_weight(n, k, dt, 64, True, torch.float32),
        (64, 256),
    ),
    "sparse24_mm": (ops.sparse24_mm, _sparse_weight, (8, 40, 264)),
    "sparse24_mm_fp32_values": (
        ops.sparse24_mm,
        lambda n, k, dt: _sparse_weight(n, k, dt, torch.float32),
        (8, 72),
    ),
    "sparse24_int4_mm": (ops.sparse24_int4_mm, _sparse_int4_weight, (64, 192)),
    "sparse24_int4_mm_sym_g128": (
        ops.sparse24_int4_mm,
        lambda n, k, dt: _sparse_int4_weight(n, k, dt, 128, True),
        (128, 256),
    ),
}


def _call(name, x, weight, bias):
    return WEIGHT_ONLY[name][0](x, *weight, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, GEMV_ROWS, GEMV_ROWS + 1, 17])
@pytest.mark.parametrize("name", sorted(WEIGHT_ONLY))
def test_weight_only_matmuls_meet_the_2x_rule(isa, name, m, dtype):
    _, build, ks = WEIGHT_ONLY[name]
    for k in ks:
        # N = 7: row tails of every kernel; N = 33: enough outputs that the max error is a
        # stable statistic (with one output, PyTorch's fp32 error is sometimes 0.1 ulp by luck)
        for n, with_bias in ((7, False), (33, True)):
            weight, dense, scale = build(n, k, dtype)
            x = torch.randn(m, k, dtype=dtype)
            bias = bias_of(n, dtype, with_bias)
            assert_weight_only_output(on_cpu(_call, name, x, weight, bias), x, dense, scale, bias)


@pytest.mark.parametrize("m", [1, 3, 9])
@pytest.mark.parametrize("name", sorted(WEIGHT_ONLY))
def test_weight_only_matmuls_read_strided_x(isa, name, m):
    _, build, ks = WEIGHT_ONLY[name]
    k = ks[-1]
    weight, dense, scale = build(11, k, torch.float32)
    bias = torch.randn(11)
    for view in strided_views(torch.randn(m, k)).values():
        assert_weight_only_output(on_cpu(_call, name, view, weight, bias), view, dense, scale, bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [3, 8])
@pytest.mark.parametrize("name", sorted(WEIGHT_ONLY))
def test_weight_only_kernels_form_the_reference_dense_weight_exactly(isa, name, m, dtype):
    """One-hot rows of x pick single weight columns: every product is exact and so is the sum,
    so the output is the dense weight as the kernel formed it, bit for bit (rounding of the
    int4 values to the scales' dtype and then x's, 2:4 placement, values' dtype conversion)."""
    _, build, ks = WEIGHT_ONLY[name]
    k = ks[-1]
    weight, dense, scale = build(21, k, dtype)
    if scale is not None:  # int8: the scale multiplies the exact sum, then one rounding
        dense = (dense.float() * scale[:, None]).to(dtype)
    for start in range(0, k, m):
        cols = torch.arange(start, min(k, start + m))
        x = torch.zeros(len(cols), k, dtype=dtype)
        x[torch.arange(len(cols)), cols] = 1
        got = on_cpu(_call, name, x, weight, None)
        assert torch.equal(got, dense[:, cols].t().contiguous()), f"columns {cols.tolist()}"


def test_invalid_2_4_codes_decode_by_the_reference_rule(isa):
    """A corrupt metadata byte (i0 == i1) gives the weight the format's total rule defines, in
    every kernel: the reference's, not undefined behaviour."""
    n, k = 5, 64
    values = torch.randn(n, k // 2)
    meta = torch.randint(0, 256, (n, k // 8), dtype=torch.uint8)  # all 16 codes, valid or not
    dense = decompress_24(values, meta)
    for m in (2, 6):  # both paths
        for start in range(0, k, m):
            cols = torch.arange(start, min(k, start + m))
            x = torch.zeros(len(cols), k)
            x[torch.arange(len(cols)), cols] = 1
            got = on_cpu(ops.sparse24_mm, x, values, meta)
            assert torch.equal(got, dense[:, cols].t().contiguous())


@pytest.mark.parametrize("name", sorted(WEIGHT_ONLY))
def test_empty_batches(isa, name):
    _, build, ks = WEIGHT_ONLY[name]
    weight, _, _ = build(6, ks[0], torch.float32)
    out = on_cpu(_call, name, torch.randn(0, ks[0]), weight, torch.randn(6))
    assert out.shape == (0, 6)
    # the private kernels take M = 0 themselves too (torch.ops.leanops_C is callable directly)
    x = torch.randn(0, ks[0])
    raw = getattr(torch.ops.leanops_C, WEIGHT_ONLY[name][0].__name__)
    assert raw(x, *weight, None).shape == (0, 6)


def test_weight_only_with_scales_and_values_in_another_dtype_than_x(isa):
    # the reference rounds the dense weight to the scales' / values' dtype, then to x's
    for x_dtype, other in ((torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float16)):
        x = torch.randn(3, 128, dtype=x_dtype)
        weight, dense, _ = _int4_weight(7, 128, x_dtype, 64, False, scale_dtype=other)
        assert_matches_dense(on_cpu(ops.int4_weight_mm, x, *weight, None), x, dense, None)
        weight, dense, _ = _sparse_weight(7, 128, x_dtype, other)
        assert_matches_dense(on_cpu(ops.sparse24_mm, x, *weight, None), x, dense, None)


@pytest.mark.parametrize("m", [1, 5, 64])
def test_large_k_and_n_against_float64(isa, m):
    """A Llama-like shape slice: K = 4096 sums where fp32 ordering matters, 2x rule in fp64."""
    k, n = 4096, 24
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k, dtype=dtype)
        weight, dense, _ = _int4_weight(n, k, dtype, 128, True)
        assert_matches_dense(on_cpu(ops.int4_weight_mm, x, *weight, None), x, dense, None)
        weight, dense, scale = _int8_weight(n, k, dtype)
        assert_weight_only_output(on_cpu(ops.int8_weight_mm, x, *weight, None), x, dense, scale, None)


# ------------------------------------------------------------------------------- dispatch


def test_cpu_tensors_take_the_cpu_backend_automatically():
    args = (torch.randn(2, 64), *quantize_int4(torch.randn(8, 64), 32), 32, None)
    assert int4_ops._int4_weight_mm_backends.select(torch.device("cpu"), args) == "cpu"
    # the same with the Triton interpreter on, as in these tests (Triton is reached by forcing it)
    assert int8_ops._int8_mm_backends.select(torch.device("cpu"), ()) == "cpu"
    assert sparse_ops._sparse24_int4_mm_backends.select(torch.device("cpu"), ()) == "cpu"


def test_forcing_cpu_on_other_devices_raises_with_the_reason():
    with leanops.use_backend("cpu"), pytest.raises(RuntimeError, match="CPU kernels need CPU tensors"):
        int8_ops._int8_mm_backends.select(torch.device("cuda"), ())
    # attention has no CPU kernel (the reference is its CPU path): forcing cpu says so
    from leanops.ops import attention

    with leanops.use_backend("cpu"), pytest.raises(RuntimeError, match="has no CPU kernel"):
        attention._fwd_backends.select(torch.device("cpu"), ())


def test_without_the_extension_cpu_calls_fall_back_to_the_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "_C", None)
    monkeypatch.setattr(dispatch, "_C_error", "leanops._C could not be imported (test)")
    backends = dispatch.OpBackends("int8_mm", reference=None, cpu=True)
    with pytest.warns(RuntimeWarning, match="slow PyTorch reference on CPU tensors.*test"):
        assert backends.select(torch.device("cpu"), ()) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.select(torch.device("cpu"), ()) == "reference"  # once only
        # an op without CPU kernels runs its reference on CPU tensors silently, as before
        plain = dispatch.OpBackends("attention_fwd", reference=None)
        assert plain.select(torch.device("cpu"), ()) == "reference"


def test_backends_report_names_the_cpu_implementation():
    report = leanops.backends()["cpu"]
    assert report["available"] is True and report["reason"] is None
    assert report["isa"]["detected"] == CPU_ISA.detected_isa()
    assert report["isa"]["active"] == CPU_ISA.isa()
    assert {"int4_weight_mm", "int8_dynamic_linear", "sparse24_int4_mm"} <= set(report["ops"])


def test_set_isa_names_the_allowed_values():
    with pytest.raises(ValueError, match="'generic' or 'avx512'"):
        CPU_ISA.set_isa("sse2")
    if CPU_ISA.detected_isa() != "avx512":
        with pytest.raises(ValueError, match="cannot run 'avx512'"):
            CPU_ISA.set_isa("avx512")


@pytest.fixture
def threads():
    """torch.set_num_threads for the test, restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two CPUs")
def test_the_kernels_split_over_torch_threads(threads):
    """The kernels' at::parallel_for really runs on torch's threads (an extension built without
    OpenMP runs every chunk on the calling thread, and ignored set_num_threads)."""
    threads(2)
    assert CPU_ISA.threads_used(64) == 2
    threads(1)
    assert CPU_ISA.threads_used(64) == 1
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        CPU_ISA.threads_used(0)


@pytest.mark.parametrize("m", [1, 9])
def test_results_do_not_depend_on_the_thread_count(isa, threads, m):
    """The split is over outputs and rows, never over K: every thread count gives the same bits."""
    w = torch.randn(1000, 512)
    x = torch.randn(m, 512)
    q, scale = quantize_int8_per_channel(w)
    packed, scales, zeros = quantize_int4(w, 128, False)
    outs = []
    for n in (1, 2):
        threads(n)
        outs.append((
            on_cpu(ops.int8_weight_mm, x, q, scale, None),
            on_cpu(ops.int4_weight_mm, x, packed, scales, zeros, 128, None),
            on_cpu(ops.int8_dynamic_linear, x, q, scale, None),
        ))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)


def test_private_kernels_check_their_arguments():
    x = torch.randn(2, 64)
    packed, scales, zeros = quantize_int4(torch.randn(8, 64), 32, False)
    C = torch.ops.leanops_C
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        C.int4_weight_mm(x, packed, scales, zeros, 48, None)
    with pytest.raises(ValueError, match="w_packed must be contiguous"):
        C.int4_weight_mm(torch.randn(2, 32), packed, scales, zeros, 32, None)
    with pytest.raises(ValueError, match="x must be a float16, bfloat16 or float32"):
        C.int8_weight_mm(x.double(), torch.zeros(3, 64, dtype=torch.int8), torch.ones(3), None)
    with pytest.raises(ValueError, match="a_scale must be a float"):
        C.int8_mm(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3), torch.ones(3))


# ------------------------------------------------------------------- no per-call repacking


@pytest.mark.parametrize("kind", ["int8_dynamic", "int8_weight", "int4", "sparse24", "sparse24_int4"])
def test_layers_run_on_their_stored_buffers_with_no_derived_copy(kind):
    """The CPU kernels read the packed buffers as stored: a forward leaves the module's tensors,
    state_dict and memory exactly as they were (no cached repack), and allocates no tensor the
    size of the weight (only the activation-sized conversions and the output)."""
    k, n = 1024, 512
    linear = torch.nn.Linear(k, n)
    layer = {
        "int8_dynamic": lambda: leanops.Int8Linear.from_linear(linear),
        "int8_weight": lambda: leanops.Int8WeightOnlyLinear.from_linear(linear),
        "int4": lambda: leanops.Int4WeightOnlyLinear.from_linear(linear, group_size=128),
        "sparse24": lambda: leanops.SparseLinear.from_linear(linear),
        "sparse24_int4": lambda: leanops.SparseLinear.from_linear(linear, group_size=128),
    }[kind]()
    before = {name: (t.data_ptr(), t._version) for name, t in layer.state_dict().items()}
    attrs = set(vars(layer))
    x = torch.randn(3, k)
    with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
        layer(x)
    after = {name: (t.data_ptr(), t._version) for name, t in layer.state_dict().items()}
    assert after == before and set(vars(layer)) == attrs
    weight_bytes = sum(t.numel() * t.element_size() for name, t in layer.state_dict().items() if "weight" in name)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest < weight_bytes / 4, f"a call allocated {biggest} B, the packed weight is {weight_bytes} B"
