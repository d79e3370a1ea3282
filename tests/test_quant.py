"""Quantisation formats: error bounds, SQNR floors, exact packing, edge cases (zeros, tiny, NaN)."""

import pytest
import torch
from leanops.quant import (
    dequantize_int4,
    dequantize_int8_per_channel,
    pack_int4,
    quantize_int4,
    quantize_int8_per_channel,
    quantize_per_token_int8,
    sqnr_db,
    unpack_int4,
)
from leanops.quant.int8 import FP32_TINY

# SQNR floors for N(0, 1) weights, measured at about 42.5 dB (int8 per-channel), 20.5 / 21.8 dB
# (int4 g32 sym/asym) and 19.1 / 19.9 dB (g128): the floors sit ~1 dB below, so a real loss of
# precision (a wrong rounding, a scale off by a step) fails them.
SQNR_FLOOR = {"int8": 41.5, ("int4", 32, True): 19.5, ("int4", 32, False): 20.8,
              ("int4", 128, True): 18.1, ("int4", 128, False): 18.9}


def test_int8_per_channel_error_bound_and_sqnr():
    w = torch.randn(37, 300)
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (37,)
    assert int(q.abs().max()) <= 127
    deq = dequantize_int8_per_channel(q, scale)
    # Round to nearest: each element is within half a step of its row's grid.
    assert bool(((w - deq).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all())
    # The row maximum is representable exactly up to fp32 rounding.
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6)
    assert sqnr_db(w, deq) > SQNR_FLOOR["int8"]


def test_int8_per_channel_zero_and_tiny_rows():
    w = torch.randn(4, 64)
    w[1] = 0
    w[2] = 1e-39  # fp32 subnormal: amax / 127 underflows
    q, scale = quantize_int8_per_channel(w)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    deq = dequantize_int8_per_channel(q, scale)
    assert bool((deq[1] == 0).all())
    assert float((deq[2] - w[2]).abs().max()) <= 1e-38


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weight_quantisers_reject_non_finite(bad):
    w = torch.randn(8, 64)
    w[3, 5] = bad
    with pytest.raises(ValueError, match="weight contains 1 NaN or Inf"):
        quantize_int8_per_channel(w)
    with pytest.raises(ValueError, match="weight contains 1 NaN or Inf"):
        quantize_int4(w, 32)


def test_quantisers_reject_bad_arguments():
    with pytest.raises(ValueError, match="weight must be 2-D"):
        quantize_int8_per_channel(torch.randn(4))
    with pytest.raises(ValueError, match="weight must be float16, bfloat16 or float32"):
        quantize_int8_per_channel(torch.randint(0, 3, (4, 4)))
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        quantize_int4(torch.randn(4, 96), 48)
    with pytest.raises(ValueError, match=r"K=96\) must be divisible by group_size=64"):
        quantize_int4(torch.randn(4, 96), 64)


def test_per_token_quantisation_matches_its_definition():
    x = torch.randn(17, 129) * torch.logspace(-3, 3, 17)[:, None]
    smooth = torch.rand(129) + 0.5
    q, scale = quantize_per_token_int8(x, smooth)
    xs = x * smooth
    assert q.dtype == torch.int8 and scale.shape == (17,)
    # Every row uses its full range: its largest element maps to +-127.
    assert bool((q.abs().amax(1) == 127).all())
    assert torch.equal(scale, xs.abs().amax(1) / 127)
    err = (xs - q.float() * scale[:, None]).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-6)).all())


def test_per_token_rounds_half_to_even():
    # 127 * (k + 0.5) / 127 with amax = 127: x / scale lands exactly on .5 ties.
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])
    q, scale = quantize_per_token_int8(x)
    assert float(scale) == 1.0
    assert q.tolist() == [[127, 0, 2, 2, 0, -2]]


def test_per_token_zero_nan_and_inf_rows():
    x = torch.randn(4, 33)
    x[0] = 0
    x[1, 7] = float("nan")
    x[2, 0] = float("inf")
    q, scale = quantize_per_token_int8(x)
    assert float(scale[0]) == FP32_TINY and bool((q[0] == 0).all())
    assert bool(torch.isnan(scale[1])) and bool(torch.isnan(scale[2]))
    assert bool((q[1] == 0).all()) and bool((q[2] == 0).all())
    assert bool(torch.isfinite(scale[3]))


@pytest.mark.parametrize("n,k", [(1, 2), (5, 64), (33, 250)])
def test_pack_unpack_round_trip_is_exact(n, k):
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_int4(codes)
    assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), codes)
    # The documented layout: even k in the low nibble, odd k in the high nibble.
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_pack_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.full((2, 4), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="K even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_error_bound_and_sqnr(group_size, symmetric):
    w = torch.randn(48, 512)
    packed, scales, zeros = quantize_int4(w, group_size, symmetric)
    assert scales.shape == (48, 512 // group_size) and scales.dtype == torch.float32
    assert (zeros is None) == symmetric
    deq = dequantize_int4(packed, scales, zeros, group_size)
    step = scales.repeat_interleave(group_size, dim=1)
    assert bool(((w - deq).abs() <= step / 2 * (1 + 1e-5)).all())
    assert sqnr_db(w, deq) > SQNR_FLOOR[("int4", group_size, symmetric)]


def test_int4_asymmetric_keeps_zero_exact_and_handles_one_sided_groups():
    w = torch.rand(6, 64) + 0.1  # all positive: the range is [0, max]
    w[:, 5] = 0.0
    w[3] = -w[3]  # one all-negative row
    packed, scales, zeros = quantize_int4(w, 32, symmetric=False)
    deq = dequantize_int4(packed, scales, zeros, 32)
    assert bool((deq[:, 5] == 0).all())
    assert int(zeros[0].max()) == 0 and int(zeros[3].min()) == 15


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_zero_and_tiny_groups_stay_finite(dtype, symmetric):
    w = torch.randn(3, 64).to(dtype)
    w[0, :32] = 0  # an all-zero group
    w[1, 32:] = torch.finfo(dtype).tiny / 4  # subnormal in the storage dtype
    packed, scales, zeros = quantize_int4(w, 32, symmetric)
    assert scales.dtype == dtype
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    deq = dequantize_int4(packed, scales, zeros, 32)
    assert bool(torch.isfinite(deq).all())
    assert bool((deq[0, :32] == 0).all())
    assert float((deq[1, 32:].float() - w[1, 32:].float()).abs().max()) <= torch.finfo(dtype).tiny


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_dequantises_in_the_scale_dtype_with_one_rounding(dtype):
    w = torch.randn(8, 64).to(dtype)
    packed, scales, zeros = quantize_int4(w, 32, symmetric=False)
    deq = dequantize_int4(packed, scales, zeros, 32)
    assert deq.dtype == dtype
    codes = unpack_int4(packed).float().reshape(8, 2, 32)
    exact = ((codes - zeros.float()[..., None]) * scales.float()[..., None]).reshape(8, 64)
    assert torch.equal(deq, exact.to(dtype))
