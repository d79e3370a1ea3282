"""Drop-in quantised linear modules: accuracy against nn.Linear, shapes, repr, state_dict round
trip, gradients, SmoothQuant."""

import leanops
import pytest
import torch
from leanops.nn import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.quant import sqnr_db
from leanops.quant.smoothquant import smoothing_factors
from torch import nn

# Layer-output SQNR floors (dB) for N(0,1)-ish inputs and nn.Linear's default init, measured at
# ~40 (int8 dynamic), ~42 (int8 weight-only), ~21 (int4 g32 asym), ~19 (int4 g128 sym); a broken
# rounding or a wrong group index drops these by far more than the 2-3 dB of slack.
BUILDERS = {
    "int8_dynamic": (lambda lin: Int8Linear.from_linear(lin), 37.0),
    "int8_weight_only": (lambda lin: Int8WeightOnlyLinear.from_linear(lin), 39.0),
    "int4_g32_asym": (lambda lin: Int4WeightOnlyLinear.from_linear(lin, 32, symmetric=False), 19.0),
    "int4_g128_sym": (lambda lin: Int4WeightOnlyLinear.from_linear(lin, 128, symmetric=True), 16.5),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
@pytest.mark.parametrize("bias", [True, False])
def test_quantised_linear_tracks_the_dense_layer(kind, bias):
    build, floor = BUILDERS[kind]
    lin = nn.Linear(256, 96, bias=bias)
    q = build(lin)
    x = torch.randn(2, 7, 256)  # N-D input: leading dims are flattened and restored
    with torch.no_grad():
        out, ref = q(x), lin(x)
    assert out.shape == ref.shape == (2, 7, 96)
    assert out.dtype == x.dtype
    assert sqnr_db(ref, out) > floor
    if bias:
        assert torch.equal(q.bias, lin.bias)
    else:
        assert q.bias is None


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_state_dict_round_trip_into_a_fresh_module(kind):
    build, _ = BUILDERS[kind]
    q = build(nn.Linear(128, 40))
    fresh = type(q)(128, 40, bias=True, **{k: v for k, v in q.format_args().items()})
    x = torch.randn(5, 128)
    assert not torch.equal(fresh(x), q(x))
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    assert fresh.spec() == q.spec()


def test_repr_shows_the_format():
    lin = nn.Linear(128, 64)
    assert "format=int4 weight-only g32 asym" in repr(Int4WeightOnlyLinear.from_linear(lin, 32, False))
    assert "format=int8 W8A8 dynamic per-token" in repr(Int8Linear.from_linear(lin))
    assert "format=int8 weight-only per-channel" in repr(Int8WeightOnlyLinear.from_linear(lin))
    assert "in_features=128, out_features=64, bias=True" in repr(Int8Linear.from_linear(lin))


def test_wrong_input_width_names_in_features():
    q = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 8))
    with pytest.raises(ValueError, match="last dimension must be in_features=64"):
        q(torch.randn(3, 65))


def test_constructor_checks_group_size():
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        Int4WeightOnlyLinear(64, 8, group_size=20)
    with pytest.raises(ValueError, match=r"K=96\) must be divisible by group_size=64"):
        Int4WeightOnlyLinear(96, 8, group_size=64)


def test_from_linear_rejects_nan_weights():
    lin = nn.Linear(128, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    for build, _ in BUILDERS.values():
        with pytest.raises(ValueError, match="weight contains 1 NaN or Inf"):
            build(lin)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_layers_keep_their_dtype(dtype):
    lin = nn.Linear(128, 32).to(dtype)
    x = torch.randn(4, 128, dtype=dtype)
    for kind, (build, floor) in BUILDERS.items():
        q = build(lin)
        out = q(x)
        assert out.dtype == dtype, kind
        # 16-bit rounding of the output costs a few dB on top of quantisation.
        assert sqnr_db(lin(x).float(), out.float()) > min(floor, 30) - 3, kind


def test_int4_scales_follow_module_to_dtype():
    q = Int4WeightOnlyLinear.from_linear(nn.Linear(64, 16), 32)
    assert q.dtype == torch.float32
    q = q.to(torch.float16)
    assert q.weight_scale.dtype == torch.float16 and q.weight_packed.dtype == torch.uint8
    assert q(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_gradients_flow_to_input_and_bias(kind):
    build, _ = BUILDERS[kind]
    lin = nn.Linear(128, 16)
    q = build(lin)
    x = torch.randn(3, 128, requires_grad=True)
    q(x).pow(2).sum().backward()
    assert x.grad is not None and bool(torch.isfinite(x.grad).all()) and float(x.grad.abs().sum()) > 0
    assert q.bias.grad is not None
    # The gradient w.r.t. x uses the layer's dequantised weight (straight-through for int8 dynamic).
    expected = 2 * q(x.detach()).detach() @ q.dequantized_weight()
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)


def test_smoothquant_factors_and_layer_equivalence():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64, bias=False)
    x = torch.randn(32, 128)
    x[:, :4] *= 50  # outlier input channels, as in trained LLMs
    act_amax = x.abs().amax(0)
    s = smoothing_factors(act_amax, lin.weight, alpha=0.5)
    w_amax = lin.weight.abs().amax(0)
    torch.testing.assert_close(s, (act_amax.sqrt() / w_amax.sqrt()).clamp(1e-4, 1e4))
    plain = Int8Linear.from_linear(lin)
    smoothed = Int8Linear.from_linear(lin, smoothing=s)
    with torch.no_grad():
        ref = lin(x)
        gain = sqnr_db(ref, smoothed(x)) - sqnr_db(ref, plain(x))
    # Migrating the outliers into the weights must pay off clearly on this input.
    assert gain > 3.0
    # Dead channels get factor 1 instead of 0 or Inf.
    act_amax[5] = 0
    assert float(smoothing_factors(act_amax, lin.weight, 0.5)[5]) == 1.0


def test_smoothquant_module_round_trip_keeps_smooth():
    lin = nn.Linear(64, 8)
    q = Int8Linear.from_linear(lin, smoothing=torch.rand(64) + 0.5)
    assert "smooth" in q.state_dict()
    fresh = Int8Linear(64, 8, smoothquant=True)
    fresh.load_state_dict(q.state_dict())
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), q(x))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        Int8Linear(64, 8, smoothquant=False).load_state_dict(q.state_dict())
    with pytest.raises(ValueError, match="smoothing must be positive and finite everywhere; 64 element"):
        Int8Linear.from_linear(lin, smoothing=torch.zeros(64))
    inf = torch.ones(64)
    inf[7] = torch.inf  # 1/s would be 0 and W * s infinite
    with pytest.raises(ValueError, match=r"smoothing must be positive and finite everywhere; 1 element\(s\), the first at index \(7,\): inf"):
        Int8Linear.from_linear(lin, smoothing=inf)
    with pytest.raises(ValueError, match=r"smoothing must be a tensor of shape \(64,\), got \(63,\)"):
        Int8Linear.from_linear(lin, smoothing=torch.ones(63))


def test_layers_are_exported_at_top_level():
    assert leanops.Int8Linear is Int8Linear
    assert leanops.Int4WeightOnlyLinear is Int4WeightOnlyLinear
