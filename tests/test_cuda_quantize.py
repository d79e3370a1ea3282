"""The CUDA C++ kernel of quantize_per_token_int8 (kernels/cuda/quantize_per_token.cu), on a GPU.

It must be bit-exact with the definition, leanops.quant.int8.quantize_per_token_int8: every code
equal, every scale equal bit for bit (NaN exactly where the reference has NaN). Both entry points
are checked: torch.ops.leanops_C.quantize_per_token_int8 (the kernel as the dispatcher calls it)
and the public op under use_backend("cuda").

The reference runs on the CPU on purpose: on CUDA tensors torch evaluates `amax / 127` (a
Python-scalar divisor) as amax * (1/127), which differs from the IEEE quotient in the last bit of
about 4% of scales; CPU float32 division is IEEE, as the definition and the kernel are.

Outputs are allocated by the C++ code, so they are poisoned through the allocator: each case runs
twice, once with torch's deterministic fill of uninitialised memory (scales NaN, codes 127) and
once after leaving the caching allocator's matching free blocks filled with code -128 (never a
valid output) and NaN scales. An element the kernel failed to write differs from the reference in
at least one of the two runs.

Shapes reach every kernel variant: rows held by 8, 32, 128 or 1024 threads, the 16-byte path and
the one-element path, one chunk and the multi-chunk loop (rows too long for registers), ragged
last blocks (M not a multiple of the rows per block).
"""


import leanops
import pytest
import torch
from helpers import poisoned_memory
from leanops import ops
from leanops.quant import int8 as int8_format

pytestmark = [pytest.mark.cuda, pytest.mark.cuda_kernels("quantize_per_token_int8")]

OP = "quantize_per_token_int8"
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32]
FP32_TINY = torch.finfo(torch.float32).tiny


# ---------------------------------------------------------------------------------------------
# helpers


def _kernel(x, smooth=None):
    return torch.ops.leanops_C.quantize_per_token_int8(x, smooth)


def _public(x, smooth=None):
    with leanops.use_backend("cuda"):
        return ops.quantize_per_token_int8(x, smooth)


def _reference(x, smooth=None):
    return int8_format.quantize_per_token_int8(x.cpu(), None if smooth is None else smooth.cpu())


def _bait_allocator(m, k, device):
    """Leave free blocks of the outputs' sizes holding impossible values; the caching allocator
    hands the most recently freed best fit to the next allocation of that size."""
    q = torch.full((m, k), -128, dtype=torch.int8, device=device)
    s = torch.full((m,), float("nan"), dtype=torch.float32, device=device)
    del q, s


def _runs(fn, x, smooth=None):
    """The op's outputs from the two poisoned runs."""
    with poisoned_memory():
        first = fn(x, smooth)
    _bait_allocator(x.shape[0], x.shape[1], x.device)
    second = fn(x, smooth)
    torch.cuda.synchronize()
    return [first, second]


def _assert_exact(got, want, where=""):
    q, s = got
    q_ref, s_ref = want
    assert q.device.type == "cuda" and s.device == q.device
    assert q.dtype == torch.int8 and q.shape == q_ref.shape and q.is_contiguous(), where
    assert s.dtype == torch.float32 and s.shape == s_ref.shape, where
    q, s = q.cpu(), s.cpu()
    bad = q != q_ref
    if bad.any():
        r, c = bad.nonzero()[0].tolist()
        pytest.fail(
            f"{where}: {int(bad.sum())} of {bad.numel()} codes differ; first at [{r}, {c}]: "
            f"{q[r, c].item()} vs {q_ref[r, c].item()}"
        )
    nan = s_ref.isnan()
    assert torch.equal(s.isnan(), nan), f"{where}: NaN scales differ"
    assert torch.equal(s[~nan].view(torch.int32), s_ref[~nan].view(torch.int32)), (
        f"{where}: {int((s[~nan] != s_ref[~nan]).sum())} scales differ"
    )


def _check(x, smooth=None, entry_points=(_kernel, _public)):
    want = _reference(x, smooth)
    for fn in entry_points:
        for i, got in enumerate(_runs(fn, x, smooth)):
            _assert_exact(got, want, f"{fn.__name__} run {i}")
    return want


def _activation(m, k, dtype, device="cuda"):
    """Rows of random sign and size over six decades, so scales span many exponents."""
    row_size = 10.0 ** (torch.rand(m, 1) * 6 - 3)
    return (torch.randn(m, k) * row_size).to(dtype).to(device)


# ---------------------------------------------------------------------------------------------
# parity on odd shapes
#
# K per dtype -> (packs of 16 bytes or elements, threads per row): for fp16/bf16 (8 per pack)
# 1, 7 and 4095 take the one-element path; 64 -> 8 threads, 1000 -> 32, 4096 -> 128, 11008 and
# 16384 -> 1024. fp32 (4 per pack): 64 -> 8, 300 -> 32, 1000 -> 128, 4096 and up -> 1024 (16384
# exactly fills its registers). One-element path: 300 -> 128 threads, 4095 -> 1024.


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k", [1, 7, 64, 300, 1000, 4095, 4096, 11008, 16384])
@pytest.mark.parametrize("m", [1, 3, 17, 100, 1024])
@pytest.mark.parametrize("with_smooth", [False, True])
def test_matches_reference(m, k, dtype, with_smooth):
    x = _activation(m, k, dtype)
    smooth = torch.rand(k, device="cuda") + 0.5 if with_smooth else None
    _check(x, smooth)


@pytest.mark.parametrize("smooth_dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [7, 4096])
def test_smooth_of_any_float_dtype(k, smooth_dtype):
    """smooth is converted to fp32 (exactly, or rounded like the reference's smooth.float())."""
    x = _activation(9, k, torch.bfloat16)
    smooth = (torch.rand(k, device="cuda", dtype=torch.float64) + 0.5).to(smooth_dtype)
    _check(x, smooth)


def _special_rows(k, dtype):
    """Rows that probe the exact rules; k >= 7."""
    rows = torch.randn(10, k, dtype=torch.float32)
    rows[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])  # amax 127 -> scale 1: ties
    rows[0, 6:] = 0.25
    rows[1] = 0.0
    tiny = 1e-30 if dtype != torch.float16 else 1e-7  # fp16: its subnormal range
    rows[2] = torch.randn(k) * tiny
    rows[2, 0] = 3 * tiny  # never all zero after rounding to fp16
    rows[3, k // 2] = float("nan")
    rows[4, 0] = float("inf")
    rows[5, -1] = float("-inf")
    # finite, but overflows fp32 after multiplying by a smooth of 4 (fp16 cannot hold it)
    rows[6] = torch.randn(k).clamp(-1, 1) * (1e4 if dtype == torch.float16 else 3e38)
    rows[6, 1] = 1e4 if dtype == torch.float16 else 3e38
    rows[7] = -3.0  # all equal: every code is -127
    rows[8] = torch.randn(k) * (1e-40 if dtype == torch.float32 else tiny)  # fp32 subnormals
    rows[9, 0] = -0.0
    rows[9, 1:] = 0.0
    return rows.to(dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k", [7, 64, 4096, 40000])
def test_special_rows(dtype, k):
    x = _special_rows(k, dtype).cuda()
    for smooth in (None, torch.full((k,), 4.0, device="cuda")):
        q, s = _check(x, smooth)
        # the reference itself, so these pin the rules, not just agreement
        assert s[3:6].isnan().all() and (q[3:6] == 0).all()
        assert s[1].item() == FP32_TINY and (q[1] == 0).all() and (q[9] == 0).all()
        assert (q[7] == -127).all()
        if smooth is None:
            assert q[0, :6].tolist() == [127, 0, 2, 2, 0, -2] and s[0].item() == 1.0
        if dtype != torch.float16:
            # 3e38 is finite; 3e38 * 4 overflows fp32
            assert s[6].isnan() if smooth is not None else s[6].isfinite()
        if dtype == torch.float32:
            assert s[8].item() == FP32_TINY  # amax / 127 of subnormals clamps to FLT_MIN
        assert s[2].item() > 0 and (q[2].abs().max() == 127)


def test_nan_in_the_first_chunk_of_a_long_row():
    """The row max crosses chunks: a NaN early in a row longer than the registers hold must
    still poison the whole row (and the finite rows around it stay exact)."""
    k = 70000  # bf16: 8750 packs, three chunks of 4096
    x = _activation(5, k, torch.bfloat16)
    x[1, 3] = float("nan")
    x[3, -1] = float("inf")
    q, s = _check(x)
    assert s[1].isnan() and s[3].isnan() and not s[[0, 2, 4]].isnan().any()


# ---------------------------------------------------------------------------------------------
# layouts: row strides, alignment, the two load paths


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("k,pad", [(4096, 8), (4096, 3), (1000, 40), (11008, 1)])
def test_strided_rows(dtype, k, pad):
    """x[:, :K] of a wider tensor: row stride K + pad, 16-byte aligned rows when pad keeps them so
    (the 16-byte path with a row stride that is not K), the one-element path otherwise."""
    big = _activation(37, k + pad, dtype)
    x = big[:, :k]
    assert x.stride() == (k + pad, 1)
    _check(x, torch.rand(k, device="cuda") + 0.5)
    _check(x)


@pytest.mark.parametrize("k", [64, 4096, 11008])
def test_misaligned_rows_take_the_element_path(k):
    """x = big[:, 1:] in fp16: rows start 2 bytes past a 16-byte boundary, so the kernel must not
    use 16-byte loads; the result is the same as for an aligned copy."""
    big = _activation(17, k + 1, torch.float16)
    x = big[:, 1:]
    assert x.data_ptr() % 16 == 2
    want = _check(x)
    aligned = x.contiguous()
    assert aligned.data_ptr() % 16 == 0
    for got in _runs(_kernel, aligned):
        _assert_exact(got, want, "aligned copy")


def test_misaligned_smooth():
    k = 4096
    x = _activation(5, k, torch.bfloat16)
    buf = torch.rand(k + 1, device="cuda") + 0.5
    smooth = buf[1:]
    assert smooth.data_ptr() % 16 == 4 and smooth.is_contiguous()
    _check(x, smooth)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_column_strided_x_is_copied(dtype):
    """A transposed x (column stride != 1) is made contiguous explicitly by the binding."""
    x = _activation(300, 33, dtype).t()
    assert x.stride(1) != 1
    _check(x, torch.rand(300, device="cuda") + 0.5)


def test_broadcast_rows_with_zero_row_stride():
    row = _activation(1, 4096, torch.bfloat16)
    x = row.expand(7, 4096)
    assert x.stride() == (0, 1)
    q, s = _check(x)
    assert (q == q[0]).all() and (s == s[0]).all()


def test_single_row_with_odd_row_stride():
    # M == 1: the row stride is irrelevant and must not push the kernel off the 16-byte path
    # incorrectly (or read out of bounds).
    big = _activation(2, 4096 + 3, torch.float16)
    x = big[:1, :4096]
    _check(x)


@pytest.mark.parametrize(
    "dtype,k", [(torch.bfloat16, 65536), (torch.float32, 40001), (torch.float16, 16383)]
)
def test_rows_longer_than_the_registers(dtype, k):
    """The chunk loop: bf16 65536 (2 chunks of 4096 packs), fp32 40001 (one-element path, 5
    chunks of 8192, the last ragged), fp16 16383 (one-element path, 2 chunks)."""
    x = _activation(3, k, dtype)
    _check(x, torch.rand(k, device="cuda") + 0.5)
    _check(x)


def test_many_short_rows():
    """2^20 + 3 rows of 64: 32 rows per block, ragged last block, a million blocks."""
    x = _activation(2**20 + 3, 64, torch.bfloat16)
    _check(x, entry_points=(_kernel,))


def test_more_than_2_31_elements():
    """Offsets past 2^31 elements (int64 row offsets): M * K = 2^31 + 32768 fp16 values (4 GiB in,
    2 GiB out). Rows are independent, so a few of them are checked against the reference."""
    m, k = 2**16 + 1, 2**15
    if torch.cuda.mem_get_info()[0] < 8 * 2**30:
        pytest.skip("needs 8 GiB of free GPU memory")
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    q, s = _kernel(x)
    torch.cuda.synchronize()
    rows = torch.tensor([0, m // 2, m - 2, m - 1])
    want = _reference(x[rows])
    _assert_exact((q[rows], s[rows]), want, "rows past 2^31 elements")
    assert torch.isfinite(s).all() and (s > 0).all()
    del x, q, s
    torch.cuda.empty_cache()  # give the 6 GiB back to other tests


# ---------------------------------------------------------------------------------------------
# integration: streams, devices, backend choice


def test_runs_on_the_current_stream_and_captures_in_a_cuda_graph():
    """Launching on any stream but the current one fails stream capture, and so does anything
    that synchronises; replaying the graph then quantises new data in the captured buffers."""
    k = 4096
    x = _activation(33, k, torch.bfloat16)
    smooth = torch.rand(k, device="cuda") + 0.5
    _kernel(x, smooth)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q, s = _kernel(x, smooth)
    x.copy_(_activation(33, k, torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    _assert_exact((q, s), _reference(x, smooth), "graph replay")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_while_the_first_is_current():
    x = _activation(17, 4096, torch.bfloat16, device="cuda:1")
    smooth = torch.rand(4096, device="cuda:1") + 0.5
    with torch.cuda.device(0):
        q, s = _kernel(x, smooth)
    assert q.device == x.device and s.device == x.device
    torch.cuda.synchronize(1)
    _assert_exact((q, s), _reference(x, smooth), "cuda:1")


def test_auto_backend_picks_the_cuda_kernel():
    from leanops.ops import int8 as int8_ops

    x = _activation(3, 64, torch.float16)
    assert int8_ops._quantize_per_token_backends.select(x.device, (x, None)) == "cuda"
    _assert_exact(ops.quantize_per_token_int8(x), _reference(x), "auto backend")


def test_empty_batch():
    q, s = _kernel(torch.empty(0, 64, device="cuda", dtype=torch.bfloat16))
    assert q.shape == (0, 64) and q.dtype == torch.int8 and s.shape == (0,)


# ---------------------------------------------------------------------------------------------
# errors: the kernel's own checks (torch.ops.leanops_C.* is callable directly)


def test_rejects_bad_arguments():
    x = torch.randn(4, 64, device="cuda")
    with pytest.raises(ValueError, match="x must have dtype float16, bfloat16 or float32"):
        _kernel(x.to(torch.int32))
    with pytest.raises(ValueError, match="x must have dtype float16, bfloat16 or float32"):
        _kernel(x.double())
    with pytest.raises(ValueError, match=r"x must be 2-D"):
        _kernel(x.view(2, 2, 64))
    with pytest.raises(ValueError, match="at least one column"):
        _kernel(x[:, :0])
    with pytest.raises(ValueError, match=r"smooth must have shape \[K\] = \[64\]"):
        _kernel(x, torch.ones(63, device="cuda"))
    with pytest.raises(ValueError, match=r"smooth must have shape \[K\]"):
        _kernel(x, torch.ones(1, 64, device="cuda"))
    with pytest.raises(ValueError, match="smooth must have a floating-point dtype"):
        _kernel(x, torch.ones(64, device="cuda", dtype=torch.int32))
    with pytest.raises(ValueError, match="smooth must be on x's device"):
        _kernel(x, torch.ones(64))
    with pytest.raises(ValueError, match="x must be a CUDA tensor"):
        _kernel(x.cpu(), torch.ones(64, device="cuda"))

