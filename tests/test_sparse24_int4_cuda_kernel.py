"""The hand-written CUDA kernel leanops_C::sparse24_int4_mm (kernels/cuda/sparse24_int4_mm.cu,
mma.sp on the sparse tensor cores with the kept values dequantised from int4 codes in
registers), forced through the "cuda" backend and compared with fp64 math on the decompressed
weight; which calls the dispatcher gives it. GPU tests skip without a GPU (marked `cuda` like
tests/test_sparse24_cuda_kernel.py); the cuda_supports rule is also checked on the CPU.

Tolerance as in tests/test_sparse24_cuda_kernel.py (flash-attention's rule): error vs an fp64
evaluation of x @ W^T, W = decompress_24_int4(...) in x's dtype, at most 2x that of PyTorch's
same-dtype F.linear on the same W, plus one ulp at the largest output. The kernel's weights are
bit-identical to W by construction ((q - z) * s rounded once), so only the summation differs.
Odd M and N cover ragged tiles of both kernel configs (M <= 64 takes the decode config, larger
M the 128 x 128 one); K = 128 and 384 leave part of the decode config's 256-wide k-tile empty,
K = 4096 runs the pipeline over many tiles; group sizes 64 .. K (per-channel).
"""

import leanops
import pytest
import torch
from gemm_checks import assert_matches_dense, strided_views
from helpers import poisoned_memory
from leanops import ops
from leanops.ops import sparse24 as sparse24_ops
from leanops.sparsity import compress_24_int4, decompress_24_int4, nm_mask

DEV = "cuda"
MS = (1, 3, 17, 100, 1024)
NS = (8, 72, 200, 4096)
KS = (128, 384, 4096)
DTYPES = (torch.float16, torch.bfloat16)


def _case(m, n, k, dtype, bias, group_size=128, zeros=False, scale_dtype=None):
    w = torch.randn(n, k, device=DEV)
    values, scales, z, meta = compress_24_int4(
        w, group_size, symmetric=not zeros, mask=nm_mask(w.abs()), scale_dtype=scale_dtype or dtype
    )
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    b = torch.randn(n, device=DEV, dtype=dtype) if bias else None
    return x, values, meta, scales, z, group_size, b


def _cuda(x, values, meta, scales, zeros, group_size, bias):
    with poisoned_memory(), leanops.use_backend("cuda"):
        out = ops.sparse24_int4_mm(x, values, meta, scales, zeros, group_size, bias)
    torch.cuda.synchronize()
    return out


def _assert_matches_weight(got, x, values, meta, scales, zeros, group_size, bias):
    dense = decompress_24_int4(values, scales, zeros, meta, group_size).to(x.dtype)
    assert_matches_dense(got, x, dense, bias)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_int4_mm")
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("m", MS)
def test_matches_reference_on_odd_shapes(m, n, k, dtype, zeros, bias):
    args = _case(m, n, k, dtype, bias, group_size=128, zeros=zeros)
    _assert_matches_weight(_cuda(*args), *args)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_int4_mm")
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("group", [64, 128, 256, "K"])
@pytest.mark.parametrize("m,n,k", [(1, 200, 4096), (17, 72, 384), (100, 200, 4096), (3, 8, 128)])
def test_group_sizes(m, n, k, group, dtype, zeros):
    group_size = k if group == "K" else group
    if k % group_size:
        pytest.skip(f"group_size {group_size} does not divide K = {k}")
    args = _case(m, n, k, dtype, True, group_size=group_size, zeros=zeros)
    _assert_matches_weight(_cuda(*args), *args)


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_int4_mm")
@pytest.mark.parametrize("m", [3, 100])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_non_contiguous_x_and_other_bias_dtypes(m, dtype):
    n, k = 200, 384
    x, values, meta, scales, zeros, g, bias = _case(m, n, k, dtype, True, zeros=True)
    for name, view in strided_views(x).items():
        got = _cuda(view, values, meta, scales, zeros, g, bias)
        _assert_matches_weight(got, view, values, meta, scales, zeros, g, bias)
        # the same numbers as the contiguous copy: only the addressing differs
        assert torch.equal(got, _cuda(view.contiguous(), values, meta, scales, zeros, g, bias)), (
            name
        )
    # an fp32 bias (the public op takes floating biases in x's dtype or fp32, not fp64)
    b = bias.float()
    _assert_matches_weight(
        _cuda(x, values, meta, scales, zeros, g, b), x, values, meta, scales, zeros, g, b
    )


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_int4_mm")
def test_deterministic_and_no_cross_talk_between_calls():
    x, values, meta, scales, zeros, g, bias = _case(
        100, 4096, 4096, torch.bfloat16, True, zeros=True
    )
    first = _cuda(x, values, meta, scales, zeros, g, bias)
    assert torch.equal(first, _cuda(x, values, meta, scales, zeros, g, bias))
    # a decode-size call with the same weight agrees with the rows of the large one (to fp32
    # summation order: the two configs sum K in different orders)
    torch.testing.assert_close(
        _cuda(x[:3], values, meta, scales, zeros, g, bias), first[:3], rtol=1e-2, atol=1e-2
    )


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_int4_mm")
def test_dispatcher_picks_cuda_for_supported_calls():
    backends = sparse24_ops._sparse24_int4_mm_backends
    device = torch.device(DEV)
    for m in (1, 1024):
        for zeros in (False, True):
            args = _case(m, 4096, 4096, torch.float16, True, zeros=zeros)
            assert backends.select(device, args) == "cuda"
    # what the kernel does not take goes to Triton (or the reference), never to the kernel
    fp32 = _case(3, 72, 256, torch.float32, False)
    assert backends.select(device, fp32) != "cuda"
    mixed = _case(3, 72, 256, torch.bfloat16, False, scale_dtype=torch.float32)
    assert backends.select(device, mixed) != "cuda"
    mixed16 = _case(3, 72, 256, torch.float16, False, scale_dtype=torch.bfloat16)
    assert backends.select(device, mixed16) != "cuda"


@pytest.mark.cuda
@pytest.mark.cuda_kernels("sparse24_int4_mm")
def test_direct_call_checks_arguments():
    x, values, meta, scales, zeros, g, _ = _case(3, 72, 384, torch.float16, False, zeros=True)
    op = torch.ops.leanops_C.sparse24_int4_mm
    with pytest.raises(ValueError, match="x must have dtype float16 or bfloat16"):
        op(x.float(), values, meta, scales, zeros, g)
    with pytest.raises(ValueError, match="scales must have x's dtype"):
        op(x, values, meta, scales.bfloat16(), zeros, g)
    with pytest.raises(ValueError, match="values must have dtype uint8"):
        op(x, values.to(torch.int16), meta, scales, zeros, g)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 64"):
        op(x, values, meta, scales, zeros, 96)
    with pytest.raises(ValueError, match="scales must be"):
        op(x, values, meta, scales[:, :-1].contiguous(), zeros, g)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        op(x, values, meta, scales, zeros[:, :-1].contiguous(), g)
    with pytest.raises(ValueError, match="meta must be uint8"):
        op(x, values, meta[:, :-1].contiguous(), scales, zeros, g)
    with pytest.raises(ValueError, match="bias must have shape"):
        op(x, values, meta, scales, zeros, g, torch.zeros(5, device=DEV))


# ---------------------------------------------------------------------------------------------
# The routing rule itself (no GPU needed)


@pytest.mark.parametrize(
    "x_dtype,scale_dtype,k,reason",
    [
        (torch.float16, torch.float16, 128, None),
        (torch.bfloat16, torch.bfloat16, 64, None),
        (torch.bfloat16, torch.bfloat16, 4096, None),
        (torch.float32, torch.float32, 128, "float16/bfloat16 x"),
        (torch.bfloat16, torch.float32, 128, "scales in x's dtype"),
        (torch.float16, torch.bfloat16, 128, "scales in x's dtype"),
        (torch.float16, torch.float16, 200, "multiple of 64"),
    ],
)
@pytest.mark.parametrize("zeros", [False, True], ids=["sym", "zeros"])
def test_cuda_supports_rule(x_dtype, scale_dtype, k, reason, zeros):
    group_size = 64 if k % 64 == 0 else k  # K = 200 only exercises the K rule itself
    x = torch.zeros(3, k, dtype=x_dtype)
    values = torch.zeros(5, k // 4, dtype=torch.uint8)
    meta = torch.full((5, k // 8), 0x44, dtype=torch.uint8)
    scales = torch.ones(5, k // group_size, dtype=scale_dtype)
    z = torch.full((5, k // group_size), 8, dtype=torch.uint8) if zeros else None
    got = sparse24_ops._sparse24_int4_mm_cuda_supports(x, values, meta, scales, z, group_size, None)
    if reason is None:
        assert got is None
    else:
        assert reason in got and "\n" not in got


def test_cuda_supports_is_wired_into_the_backends():
    assert sparse24_ops._sparse24_int4_mm_backends.cuda_supports is (
        sparse24_ops._sparse24_int4_mm_cuda_supports
    )
