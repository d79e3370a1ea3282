"""The CUDA C++ tensor-core GEMMs (kernels/cuda/int4_weight_mm.cu, int8_mm.cu) on the GPU,
forced through the "cuda" backend, against the reference, on the shapes that stress them: every
tile configuration (M = 1, 3, 17, 100, 1024 pick the small, medium and large ones), ragged N and
K against every tile, split-K (small M with long K), the Llama-7B/13B linear shapes, every group
size, symmetric and zero-point weights, fp16 and bf16, with and without bias, strided and
misaligned activations.

Accuracy bars (tests/gemm_checks.py, the same as the Triton kernels'): int8_mm is bit-exact (the
kernel's epilogue follows the reference's order with IEEE _rn intrinsics and int32 sums are
exact, split or not), checked as "within 1 ulp" plus an exact-equality count; int4_weight_mm
within 2x PyTorch's own same-dtype matmul error (the dequantised weights are bit-identical, only
the fp32 summation order differs).
"""

import importlib

import leanops
import pytest
import torch
from gemm_checks import (
    DEV,
    assert_int4_output,
    int4_case,
    int8_mm_case,
    reference,
    run_on,
)
from helpers import assert_within_ulp
from leanops import ops

pytestmark = [pytest.mark.cuda, pytest.mark.cuda_kernels("int4_weight_mm", "int8_mm")]

MS = (1, 3, 17, 100, 1024)
# (K, N): Llama-7B attention/MLP and Llama-13B (5120) linears, plus small odd multiples of the
# tiles (64-wide N tiles, 64/128-wide K tiles) that leave ragged edges in N.
LLAMA = [(4096, 4096), (4096, 11008), (11008, 4096), (5120, 13824), (13824, 5120)]
ODD = [(64 * 3, 8 * 9), (128 * 5, 64 * 3 + 8), (32 * 7, 200)]
SHAPES = LLAMA + ODD
IDS = [f"K{k}xN{n}" for k, n in SHAPES]
GROUPS = (32, 64, 128, 256)


def _cuda(fn, *args):
    return run_on("cuda", fn, *args)


_reference = reference


# ---------------------------------------------------------------------------------------------
# int4_weight_mm (W4A16)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_weight_mm(m, k, n, dtype):
    i = MS.index(m) + SHAPES.index((k, n))
    g = next(gs for gs in GROUPS[i % 4 :] + GROUPS if k % gs == 0)
    args = int4_case(m, k, n, g, symmetric=i % 2 == 0, dtype=dtype, bias=i % 3 != 0)
    assert_int4_output(_cuda(ops.int4_weight_mm, *args), args)


@pytest.mark.parametrize("g", [*GROUPS, 4096])  # 4096 = K: per-channel
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 100])
def test_int4_weight_mm_every_group_size(g, symmetric, dtype, m):
    args = int4_case(m, 4096, 520, g, symmetric, dtype)
    assert_int4_output(_cuda(ops.int4_weight_mm, *args), args)


def test_int4_weight_mm_group_straddling_a_k_tile():
    # g = 96: groups start mid-tile (the 64/128-wide K tiles), every 32-column run in one group.
    args = int4_case(5, 96 * 7, 72, 96, False, torch.float16)
    assert_int4_output(_cuda(ops.int4_weight_mm, *args), args)


@pytest.mark.parametrize("m", [1, 100])
def test_int4_weight_mm_strided_and_misaligned_x(m):
    x, packed, scales, zeros, g, b = int4_case(m, 4096, 1000, 128, False, torch.bfloat16)
    for view in (x.t().contiguous().t(), torch.cat([x, x], 1)[:, 5 : 5 + 4096], x[:, :] * 1):
        assert_int4_output(
            _cuda(ops.int4_weight_mm, view, packed, scales, zeros, g, b),
            (view, packed, scales, zeros, g, b),
        )


def test_int4_weight_mm_weights_are_bit_identical_to_the_reference():
    """With x = one-hot rows the product is the dequantised weight itself (a single nonzero term
    per output, so no summation order): every weight must match the reference bit for bit."""
    k, n = 256, 72
    for dtype in (torch.float16, torch.bfloat16):
        for symmetric in (True, False):
            _, packed, scales, zeros, g, _ = int4_case(1, k, n, 32, symmetric, dtype, bias=False)
            eye = torch.eye(k, device=DEV, dtype=dtype)
            got = _cuda(ops.int4_weight_mm, eye, packed, scales, zeros, g)
            want = _reference(ops.int4_weight_mm, eye, packed, scales, zeros, g)
            assert torch.equal(got, want), (dtype, symmetric)


@pytest.mark.parametrize("config", [0, 1, 2])
def test_int4_weight_mm_k_padding_contributes_exact_zeros(monkeypatch, config):
    """K % 64 == 32: half of the last 64-column block is padding, read as code 0. With zero
    point 15 and scale 8192 (fp16), a padded weight (0 - 15) * 8192 would be -inf, and -inf times
    the zero-filled x is NaN; the real weights (q - 15) * 8192, q in {14, 15}, stay finite."""
    monkeypatch.setenv("LEANOPS_CUDA_GEMM_CONFIG", str(config))
    m, k, n, g = 5, 96, 72, 32
    codes = torch.randint(14, 16, (n, k), dtype=torch.uint8, device=DEV)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    scales = torch.full((n, k // g), 8192.0, dtype=torch.float16, device=DEV)
    zeros = torch.full((n, k // g), 15, dtype=torch.uint8, device=DEV)
    x = torch.randn(m, k, device=DEV, dtype=torch.float16) * 1e-3
    args = (x, packed, scales, zeros, g, None)
    got = _cuda(ops.int4_weight_mm, *args)
    assert torch.isfinite(got).all(), "padded K columns reached the accumulator as inf/NaN"
    assert_int4_output(got, args)


def test_int4_weight_mm_falls_back_for_what_the_kernel_does_not_take():
    # fp32 x, or fp32 scales with bf16 x: the Triton kernel runs them; forcing cuda says why.
    x, packed, scales, zeros, g, b = int4_case(
        3, 256, 64, 64, True, torch.bfloat16, scale_dtype=torch.float32
    )
    with leanops.use_backend("cuda"), pytest.raises(RuntimeError, match="scales in x's dtype"):
        ops.int4_weight_mm(x, packed, scales, zeros, g, b)
    with leanops.use_backend("cuda"), pytest.raises(RuntimeError, match="float16/bfloat16 x"):
        ops.int4_weight_mm(x.float(), packed, scales.float(), zeros, g, b)


def test_auto_dispatch_picks_cuda():
    args = int4_case(16, 4096, 4096, 128, True, torch.float16)
    backends = importlib.import_module("leanops.ops.int4")._int4_weight_mm_backends
    assert backends.select(args[0].device, args) == "cuda"
    backends = importlib.import_module("leanops.ops.int8")._int8_mm_backends
    int8_args = int8_mm_case(16, 4096, 4096, torch.bfloat16, None)
    assert backends.select(int8_args[0].device, int8_args) == "cuda"


# ---------------------------------------------------------------------------------------------
# int8_mm (W8A8)


def _check_int8_mm(args):
    got = _cuda(ops.int8_mm, *args)
    want = _reference(ops.int8_mm, *args)
    assert_within_ulp(got, want)
    # The design is bit-exact (int32 sums, the reference's epilogue order, no contraction).
    assert torch.equal(got, want), f"{(got != want).sum().item()} outputs differ in the last bit"


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", SHAPES, ids=IDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_mm(m, k, n, out_dtype):
    i = MS.index(m) + n
    bias_dtype = (None, torch.bfloat16, torch.float32)[i % 3]
    scale_dtype = (torch.float32, torch.bfloat16, torch.float16)[(i // 3) % 3]
    _check_int8_mm(int8_mm_case(m, k, n, out_dtype, bias_dtype, scale_dtype))


def test_int8_mm_extreme_codes_and_long_k():
    # -128 everywhere at the kernel's largest K: |sum| = 2^30, still exact in int32.
    k = 65536
    a = torch.full((3, k), -128, dtype=torch.int8, device=DEV)
    b = torch.full((72, k), -128, dtype=torch.int8, device=DEV)
    ones = torch.ones(3, device=DEV), torch.ones(72, device=DEV)
    _check_int8_mm((a, b, *ones, None, torch.float32))


def test_int8_mm_strides_and_default_dtype():
    a, b, sa, sb, bias, _ = int8_mm_case(64, 4096, 1000, None, torch.bfloat16)
    for view in (a.t().contiguous().t(), torch.cat([a, a], 1)[:, 7 : 7 + 4096]):
        _check_int8_mm((view, b, sa, sb, bias, None))
        assert _cuda(ops.int8_mm, view, b, sa, sb, bias, None).dtype == torch.bfloat16


def test_int8_mm_falls_back_when_k_is_not_a_multiple_of_16():
    args = int8_mm_case(5, 100, 64, torch.float16, None)
    with leanops.use_backend("cuda"), pytest.raises(RuntimeError, match="multiple of 16"):
        ops.int8_mm(*args)


def test_int8_dynamic_linear_runs_both_cuda_kernels():
    """The W8A8 layer's path on a GPU: per-token quantisation then int8_mm, both in CUDA."""
    x = torch.randn(33, 4096, device=DEV, dtype=torch.bfloat16)
    w, ws = leanops.quant.quantize_int8_per_channel(torch.randn(1000, 4096, device=DEV))
    got = _cuda(ops.int8_dynamic_linear, x, w, ws, None, None)
    want = _reference(ops.int8_dynamic_linear, x, w, ws, None, None)
    assert torch.equal(got, want)


# ---------------------------------------------------------------------------------------------
# Every tile configuration and split-K count on ragged shapes, whatever M would pick: the plan
# overrides (LEANOPS_CUDA_GEMM_CONFIG / _SPLITS, read per call by the bindings) exist so tests
# and tuning sessions can reach each compiled kernel explicitly.


@pytest.mark.parametrize("config", [0, 1, 2])
@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize("m", [1, 37, 130])
def test_every_config_and_split(monkeypatch, config, splits, m):
    monkeypatch.setenv("LEANOPS_CUDA_GEMM_CONFIG", str(config))
    monkeypatch.setenv("LEANOPS_CUDA_GEMM_SPLITS", str(splits))
    k, n = 64 * 21, 8 * 25  # 21 K tiles of 64 (10.5 of 128), N ragged against 64 and 128
    for dtype, symmetric in ((torch.float16, False), (torch.bfloat16, True)):
        args = int4_case(m, k, n, 64, symmetric, dtype, bias=True)
        assert_int4_output(_cuda(ops.int4_weight_mm, *args), args)
    _check_int8_mm(int8_mm_case(m, k, n, torch.bfloat16, torch.float32))


def test_plan_override_errors_name_the_variable(monkeypatch):
    args = int8_mm_case(4, 256, 64, torch.float16, None)
    monkeypatch.setenv("LEANOPS_CUDA_GEMM_CONFIG", "3")
    with pytest.raises(ValueError, match="LEANOPS_CUDA_GEMM_CONFIG must be 0, 1 or 2"):
        _cuda(ops.int8_mm, *args)
    monkeypatch.setenv("LEANOPS_CUDA_GEMM_CONFIG", "1")
    monkeypatch.setenv("LEANOPS_CUDA_GEMM_SPLITS", "zero")
    with pytest.raises(ValueError, match="LEANOPS_CUDA_GEMM_SPLITS must be a positive integer"):
        _cuda(ops.int8_mm, *args)
