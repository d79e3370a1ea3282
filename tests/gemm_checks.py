"""Cases and accuracy rules shared by the GPU matmul tests of every backend (Triton in
test_triton_cuda.py, the CUDA C++ kernels in test_gemm_cuda.py and the 2:4 ones in
test_sparse24_cuda_kernel.py / test_sparse24_int4_cuda_kernel.py), so all are held to one bar.

int8_mm within 1 ulp of out_dtype (normally bit-exact); weight-only matmuls within 2x the error
of PyTorch's same-dtype matmul against an fp64 evaluation, plus one ulp at the largest output.
"""

import leanops
import torch
import torch.nn.functional as F
from helpers import assert_2x_rule, assert_written, poisoned_memory
from leanops.quant import dequantize_int4, quantize_int4

DEV = "cuda"


def run_on(backend, fn, *args):
    """fn(*args) forced onto `backend`; outputs allocated over poisoned memory (an element the
    kernel never writes shows up as NaN), synchronised so launch errors surface here."""
    with poisoned_memory(), leanops.use_backend(backend):
        out = fn(*args)
    torch.cuda.synchronize()
    return out


def reference(fn, *args):
    with leanops.use_backend("reference"):
        return fn(*args)


def assert_matches_dense(got, x, dense, bias):
    """got = x @ dense^T + bias from a kernel (dense: the decompressed weight in x's dtype):
    every output written (no NaN poison left), and the 2x rule against an fp64 evaluation."""
    assert got.dtype == x.dtype and got.shape == (x.shape[0], dense.shape[0])
    assert not got.isnan().any(), "unwritten (NaN-poisoned) outputs"
    ref64 = x.double() @ dense.double().t()
    if bias is not None:
        ref64 = ref64 + bias.double()
    # The same-dtype baseline is what a user would call: F.linear takes the bias in x's dtype
    # only (an fp32 bias with bf16 x raises), so it gets the bias converted to x's dtype.
    same = F.linear(x, dense, None if bias is None else bias.to(x.dtype))
    assert_2x_rule(got, ref64, same, x.dtype)


def strided_views(x):
    """x [M, K] in the layouts a binding must either read in place or realign by copying, by
    name; every one holds the same numbers as x except the row-stride ones (fresh values)."""
    m, k = x.shape
    wide = torch.randn(m, 2 * k + 8, device=x.device, dtype=x.dtype)
    return {
        "row stride, aligned (read in place)": wide[:, 8 : 8 + k],
        "row stride, misaligned (copied)": wide[:, 3 : 3 + k],
        "column-major (copied)": x.t().contiguous().t(),
        "expanded row (stride 0)": x[:1].expand(m, k),
    }


def int8_mm_case(m, k, n, out_dtype, bias_dtype, scale_dtype=torch.float32):
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=DEV)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEV)
    sa = (torch.rand(m, device=DEV) * 1e-3 + 1e-4).to(scale_dtype)
    sb = (torch.rand(n, device=DEV) * 1e-3 + 1e-4).to(scale_dtype)
    bias = None if bias_dtype is None else torch.randn(n, device=DEV, dtype=bias_dtype)
    return a, b, sa, sb, bias, out_dtype


def int4_case(m, k, n, g, symmetric, dtype, bias=True, scale_dtype=None):
    packed, scales, zeros = quantize_int4(
        torch.randn(n, k, device=DEV), g, symmetric, scale_dtype=scale_dtype or dtype
    )
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    return x, packed, scales, zeros, g, (torch.randn(n, device=DEV, dtype=dtype) if bias else None)


def assert_int4_output(got, args):
    """got = int4_weight_mm(*args) against an fp64 evaluation of the same dequantised weight."""
    x, packed, scales, zeros, g, b = args
    dense = dequantize_int4(packed, scales, zeros, g).to(x.dtype)
    ref64 = x.double() @ dense.double().t()
    if b is not None:
        ref64 = ref64 + b.double()
    assert_written(got, ref64)
    assert_2x_rule(got, ref64, F.linear(x, dense, b), x.dtype)
