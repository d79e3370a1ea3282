"""The hand-written CUDA kernel leanops_C::sparse24_mm (kernels/cuda/sparse24_mm.cu, mma.sp on the
sparse tensor cores), forced through the "cuda" backend and compared with fp64 math on the
decompressed weight; which calls the dispatcher gives it. GPU tests skip without a GPU (marked
`cuda` like tests/test_sparse_cuda.py); the cuda_supports rule is also checked on the CPU.

Tolerance as in tests/test_sparse_cuda.py (flash-attention's rule): error vs an fp64 evaluation
at most 2x that of PyTorch's same-dtype F.linear on the same decompressed weight, plus one ulp at
the largest output. Odd M and N cover ragged tiles of both kernel configs (M <= 64 takes the
decode config, larger M the 128 x 128 one); K = 64 and 192 leave most of the decode config's
256-wide k-tile empty, K = 4096 runs the pipeline over many tiles.
"""

import leanops
import pytest
import torch
from gemm_checks import assert_matches_dense, strided_views
from helpers import poisoned_memory
from leanops import ops
from leanops.ops import sparse24 as sparse24_ops
from leanops.sparsity import compress_24, decompress_24, nm_mask

DEV = "cuda"
MS = (1, 3, 17, 100, 1024)
NS = (8, 72, 200, 4096)
KS = (64, 192, 4096)
DTYPES = (torch.float16, torch.bfloat16)


def _case(m, n, k, dtype, bias):
    w = torch.randn(n, k, device=DEV)
    values, meta = compress_24(w.to(dtype), nm_mask(w.abs()))
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    b = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    return x, values, meta, b


def _cuda(x, values, meta, bias):
    with poisoned_memory(), leanops.use_backend("cuda"):
        out = ops.sparse24_mm(x, values, meta, bias)
    torch.cuda.synchronize()
    return out


def _assert_matches_weight(got, x, values, meta, bias):
    assert_matches_dense(got, x, decompress_24(values, meta).to(x.dtype), bias)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_mm")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
def test_matches_reference_on_odd_shapes(m, n, k, dtype, bias):
    args = _case(m, n, k, dtype, bias)
    _assert_matches_weight(_cuda(*args), *args)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_mm")
@pytest.mark.parametrize("m", [3, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_non_contiguous_x_and_other_bias_dtypes(m, dtype):
    n, k = 200, 192
    x, values, meta, bias = _case(m, n, k, dtype, True)
    for name, view in strided_views(x).items():
        got = _cuda(view, values, meta, bias)
        _assert_matches_weight(got, view, values, meta, bias)
        # the same numbers as the contiguous copy: only the addressing differs
        assert torch.equal(got, _cuda(view.contiguous(), values, meta, bias)), name
    # an fp32 bias (the public op takes floating biases in x's dtype or fp32, not fp64)
    b = bias.float()
    _assert_matches_weight(_cuda(x, values, meta, b), x, values, meta, b)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_mm")
def test_deterministic_and_no_cross_talk_between_calls():
    x, values, meta, bias = _case(100, 4096, 4096, torch.bfloat16, True)
    first = _cuda(x, values, meta, bias)
    assert torch.equal(first, _cuda(x, values, meta, bias))
    # a decode-size call with the same weight agrees with the rows of the large one (to fp32
    # summation order: the two configs sum K in different orders)
    torch.testing.assert_close(_cuda(x[:3], values, meta, bias), first[:3], rtol=1e-2, atol=1e-2)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_mm")
def test_dispatcher_picks_cuda_for_supported_calls():
    backends = sparse24_ops._sparse24_mm_backends
    device = torch.device(DEV)
    for m in (1, 1024):
        args = _case(m, 4096, 4096, torch.float16, True)
        assert backends.select(device, args) == "cuda"
    # what the kernel does not take goes to Triton (or the reference), never to the kernel
    x, values, meta, bias = _case(3, 72, 200, torch.bfloat16, True)  # K % 64 != 0
    assert backends.select(device, (x, values, meta, bias)) != "cuda"
    fp32 = _case(3, 72, 256, torch.float32, False)
    assert backends.select(device, fp32) != "cuda"
    with leanops.use_backend("cuda"), pytest.raises(RuntimeError, match="multiple of 64"):
        ops.sparse24_mm(x, values, meta, bias)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_mm")
def test_direct_call_checks_arguments():
    x, values, meta, _ = _case(3, 72, 192, torch.float16, False)
    op = torch.ops.leanops_C.sparse24_mm
    with pytest.raises(ValueError, match="x must have dtype float16 or bfloat16"):
        op(x.float(), values, meta)
    with pytest.raises(ValueError, match="values must have x's dtype"):
        op(x, values.bfloat16(), meta)
    with pytest.raises(ValueError, match="multiple of 64"):
        op(x[:, :120].contiguous(), values[:, :60].contiguous(), meta[:, :15].contiguous())
    with pytest.raises(ValueError, match="meta must be uint8"):
        op(x, values, meta[:, :-1].contiguous())
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, values, meta, torch.zeros(5, device=DEV))


# ---------------------------------------------------------------------------------------------
# The routing rule itself (no GPU needed)


@pytest.mark.parametrize(
    "x_dtype,values_dtype,k,reason",
    [
        (torch.float16, torch.float16, 128, None),
        (torch.bfloat16, torch.bfloat16, 64, None),
        (torch.float32, torch.float32, 128, "float16/bfloat16 x"),
        (torch.bfloat16, torch.float32, 128, "values in x's dtype"),
        (torch.float16, torch.float16, 200, "multiple of 64"),
    ],
)
def test_cuda_supports_rule(x_dtype, values_dtype, k, reason):
    x = torch.zeros(3, k, dtype=x_dtype)
    values = torch.zeros(5, k // 2, dtype=values_dtype)
    meta = torch.full((5, k // 8), 0x44, dtype=torch.uint8)
    got = sparse24_ops._sparse24_mm_cuda_supports(x, values, meta, None)
    if reason is None:
        assert got is None
    else:
        assert reason in got and "\n" not in got
