"""Which calls the CUDA C++ GEMMs take (the rest run on Triton), checked on CPU tensors: the
rules are plain Python over dtypes, shapes and alignment, so CI covers them without a GPU."""

import pytest
import torch
from leanops.ops import int4 as int4_op
from leanops.ops import int8 as int8_op
from leanops.quant import quantize_int4

int4_supports = int4_op._int4_weight_mm_cuda_supports
int8_supports = int8_op._int8_mm_cuda_supports


def _int4_args(dtype, scale_dtype):
    packed, scales, zeros = quantize_int4(torch.randn(8, 64), 32, False, scale_dtype=scale_dtype)
    return torch.randn(3, 64, dtype=dtype), packed, scales, zeros, 32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_kernel_takes_16_bit_x_with_scales_in_its_dtype(dtype):
    assert int4_supports(*_int4_args(dtype, dtype)) is None


def test_int4_kernel_refuses_fp32_x_and_mixed_scales():
    assert "float16/bfloat16 x" in int4_supports(*_int4_args(torch.float32, torch.float32))
    assert "scales in x's dtype" in int4_supports(*_int4_args(torch.bfloat16, torch.float32))


def test_int4_kernel_refuses_a_misaligned_weight_view():
    x, packed, scales, zeros, g = _int4_args(torch.float16, torch.float16)
    buf = torch.zeros(packed.numel() + 1, dtype=torch.uint8)
    view = buf[1:].view(packed.shape)  # contiguous, one byte off
    view.copy_(packed)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    assert "16-byte aligned" in int4_supports(x, view, scales, zeros, g)


def _int8_args(k):
    a = torch.randint(-127, 128, (3, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (5, k), dtype=torch.int8)
    return a, b, torch.rand(3), torch.rand(5)


def test_int8_kernel_k_rules():
    assert int8_supports(*_int8_args(4096)) is None
    assert "multiple of 16" in int8_supports(*_int8_args(100))
    assert f"K <= {int8_op.INT8_MM_CUDA_MAX_K}" in int8_supports(*_int8_args(int8_op.INT8_MM_CUDA_MAX_K + 16))
