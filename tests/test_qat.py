"""Quantisation-aware training: the fake-quant ops (opcheck, exact operands, straight-through and
LSQ gradients), prepare_ / convert_ (the QAT forward equals the converted forward), learnable
scales, composition with 2:4 sparse training, torch.compile."""

import copy
import logging

import leanops
import pytest
import torch
from leanops import ops
from leanops.nn import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.qat import QATLinear, convert_, prepare_
from leanops.quant import dequantize_int8_per_channel, quantize_int4, quantize_per_token_int8
from leanops.quant.int4 import int4_group_scales
from leanops.quant.int8 import int8_channel_scale
from torch import nn

CONFIGS = {
    "int8_dynamic": (leanops.Int8DynamicConfig(), Int8Linear),
    "int8_smoothquant": (leanops.Int8DynamicConfig(smoothquant_alpha=0.5), Int8Linear),
    "int8_weight_only": (leanops.Int8WeightOnlyConfig(), Int8WeightOnlyLinear),
    "int4_g32": (leanops.Int4WeightOnlyConfig(group_size=32), Int4WeightOnlyLinear),
    "int4_g64_asym": (leanops.Int4WeightOnlyConfig(group_size=64, symmetric=False), Int4WeightOnlyLinear),
    "int4_per_channel": (leanops.Int4WeightOnlyConfig(group_size=-1), Int4WeightOnlyLinear),
}


def _mlp(dtype=torch.float32):
    # 64 -> 192 -> 128 -> 64: every width divisible by 64 (int4 g32 / g64 / per-channel all apply)
    return nn.Sequential(
        nn.Linear(64, 192), nn.GELU(), nn.Linear(192, 128, bias=False), nn.GELU(), nn.Linear(128, 64)
    ).to(dtype)


def _trained_qat(name, learnable, dtype=torch.float32, steps=3):
    config, _ = CONFIGS[name]
    model = _mlp(dtype)
    x = torch.randn(4, 7, 64, dtype=dtype) * 2
    prepare_(model, config, learnable_scales=learnable, calibrate=lambda m: m(x))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):  # move weights and scales away from their initial values
        loss = (model(x).float() - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, x


# ------------------------------------------------------------------------------- the ops

OPCHECK_CASES = {
    "fake_quantize_int8_per_channel": lambda: (torch.randn(10, 40, requires_grad=True),),
    "fake_quantize_int8_per_channel_scale": lambda: (
        torch.randn(10, 40, requires_grad=True), (torch.rand(10) * 0.02 + 0.005).requires_grad_()),
    "fake_quantize_int4": lambda: (torch.randn(6, 64, requires_grad=True), 32, True),
    "fake_quantize_int4_scale": lambda: (
        torch.randn(6, 64, requires_grad=True), 32, False, (torch.rand(6, 2) * 0.3 + 0.05).requires_grad_()),
    "fake_quantize_per_token_int8": lambda: (torch.randn(5, 40, requires_grad=True),),
    "fake_quantize_per_token_int8_smooth": lambda: (torch.randn(5, 40, requires_grad=True), torch.rand(40) + 0.5),
}


@pytest.mark.parametrize("case", sorted(OPCHECK_CASES))
def test_opcheck(case):
    name = case.removesuffix("_scale").removesuffix("_smooth")
    torch.library.opcheck(getattr(torch.ops.leanops, name).default, OPCHECK_CASES[case]())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_ops_return_exactly_the_formats_dequantised_tensors(dtype):
    w = torch.randn(24, 128, dtype=dtype)
    w[3] = 0  # an all-zero channel / group
    q, s = leanops.quant.quantize_int8_per_channel(w)
    assert torch.equal(ops.fake_quantize_int8_per_channel(w), dequantize_int8_per_channel(q, s, dtype))
    for g, sym in [(32, True), (64, False), (128, True)]:
        expected = leanops.quant.dequantize_int4(*quantize_int4(w, g, sym), g)
        got = ops.fake_quantize_int4(w, g, sym)
        assert got.dtype == dtype and torch.equal(got, expected)
    x = torch.randn(9, 128, dtype=dtype) * torch.logspace(-2, 2, 9, dtype=dtype)[:, None]
    smooth = torch.rand(128) + 0.5
    for sm in (None, smooth):
        qx, sx = quantize_per_token_int8(x, sm)
        assert torch.equal(ops.fake_quantize_per_token_int8(x, sm), dequantize_int8_per_channel(qx, sx, dtype))


def test_given_scales_are_used_as_they_are():
    w = torch.randn(8, 64)
    s = int8_channel_scale(w) * 0.5  # half the RTN scale: the outer half of each row clips
    q, s_out = leanops.quant.quantize_int8_per_channel(w, scale=s)
    assert torch.equal(s_out, s) and int(q.abs().max()) == 127
    assert torch.equal(ops.fake_quantize_int8_per_channel(w, s), dequantize_int8_per_channel(q, s))
    groups = w.reshape(8, 2, 32)
    scales = int4_group_scales(groups, False, torch.float32) * 1.5
    packed, sc, zeros = quantize_int4(w, 32, False, scales=scales)
    assert torch.equal(sc, scales)
    assert torch.equal(ops.fake_quantize_int4(w, 32, False, scales),
                       leanops.quant.dequantize_int4(packed, sc, zeros, 32))
    with pytest.raises(ValueError, match="positive and finite"):
        leanops.quant.quantize_int8_per_channel(w, scale=-s)
    with pytest.raises(ValueError, match=r"shape \(8, 2\)"):
        quantize_int4(w, 32, scales=scales[:, :1])


def test_fake_quant_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="fake_quantize_int4: in_features .K=40. must be divisible"):
        ops.fake_quantize_int4(torch.randn(4, 40), 32)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.fake_quantize_int8_per_channel(torch.randn(4, 40), torch.ones(5))
    with pytest.raises(ValueError, match="x must be 2-D"):
        ops.fake_quantize_per_token_int8(torch.randn(40))


# ----------------------------------------------------- gradients against float64 autograd
#
# Finite differences of a quantiser are zero or jumps, so torch.autograd.gradcheck cannot judge
# a straight-through gradient. Instead each op's registered backward is compared with autograd
# of the same estimator written independently in float64 with the usual idiom
# v + (round(v) - v).detach() (the codes computed in fp32 as the format defines them).


def _lsq_surrogate(v64, w32, s32, qmin, qmax):
    """LSQ's estimator by autograd: round is straight-through inside [qmin, qmax] (v + a
    constant), and outside it the code is the constant qmin / qmax."""
    r = v64 + (torch.round(w32 / s32).double() - v64).detach()
    clipped = torch.clamp(r, qmin, qmax).detach()
    return torch.where((v64 >= qmin) & (v64 <= qmax), r, clipped)


def _assert_sums_close(got, expected64, grad, qmax, dims):
    # a scale's gradient sums terms grad * code of either sign: allow fp32 accumulation error
    # relative to the sum of their magnitudes
    bound = 1e-6 * (grad.double().abs() * qmax).sum(dims)
    assert bool(((got.double() - expected64).abs() <= bound).all())


def test_int8_lsq_gradients_match_float64_autograd():
    w = torch.randn(16, 96)
    scale = (int8_channel_scale(w) * (torch.rand(16) * 0.6 + 0.7)).requires_grad_()  # some clip
    w.requires_grad_()
    grad = torch.randn(16, 96)
    ops.fake_quantize_int8_per_channel(w, scale).backward(grad)

    w64 = w.detach().double().requires_grad_()
    s64 = scale.detach().double().requires_grad_()
    c = _lsq_surrogate(w64 / s64[:, None], w.detach(), scale.detach()[:, None], -127, 127)
    (c * s64[:, None]).backward(grad.double())
    assert 0 < int((w64.grad == 0).sum()) < w.numel()  # the test does exercise clipping
    torch.testing.assert_close(w.grad, w64.grad.float(), rtol=0, atol=0)
    _assert_sums_close(scale.grad, s64.grad, grad, 127, dims=1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_lsq_gradients_match_float64_autograd(symmetric):
    n, k, g = 8, 128, 32
    w = torch.randn(n, k)
    groups = w.reshape(n, k // g, g)
    scales = int4_group_scales(groups, symmetric, torch.float32) * (torch.rand(n, k // g) * 0.6 + 0.7)
    scales.requires_grad_()
    w.requires_grad_()
    grad = torch.randn(n, k)
    ops.fake_quantize_int4(w, g, symmetric, scales).backward(grad)

    w64 = w.detach().double().reshape(n, k // g, g).requires_grad_()
    s64 = scales.detach().double().requires_grad_()
    s32 = scales.detach()[..., None]
    if symmetric:
        z = torch.full((n, k // g, 1), 8.0, dtype=torch.float64)
    else:
        lo = groups.detach().amin(-1).clamp(max=0)
        z = torch.round(-lo / scales.detach()).clamp(0, 15).double()[..., None]
    c = _lsq_surrogate(w64 / s64[..., None], groups.detach(), s32, -z, 15 - z)
    (c * s64[..., None]).backward(grad.double().reshape(n, k // g, g))
    assert 0 < int((w64.grad == 0).sum()) < w.numel()
    torch.testing.assert_close(w.grad, w64.grad.reshape(n, k).float(), rtol=0, atol=0)
    _assert_sums_close(scales.grad, s64.grad, grad.reshape(n, k // g, g), 15, dims=-1)


def test_straight_through_gradients_without_learnt_scales():
    w = torch.randn(8, 64, requires_grad=True)
    grad = torch.randn(8, 64)
    ops.fake_quantize_int8_per_channel(w).backward(grad)
    assert torch.equal(w.grad, grad)
    w.grad = None
    ops.fake_quantize_int4(w, 32).backward(grad)
    assert torch.equal(w.grad, grad)
    x = torch.randn(5, 64, requires_grad=True)
    smooth = torch.rand(64) + 0.5
    ops.fake_quantize_per_token_int8(x, smooth).backward(grad[:5])
    torch.testing.assert_close(x.grad, grad[:5] * smooth, rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="smooth cannot require grad"):
        ops.fake_quantize_per_token_int8(x, smooth.requires_grad_())


# --------------------------------------------------------------- prepare_ -> convert_


def _layer_io(model, x):
    """model(x), and each linear layer's (input, output) on the way."""
    io, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, leanops.nn.PackedLinear)):
            hooks.append(m.register_forward_hook(
                lambda mod, args, out, name=name: io.__setitem__(name, (args[0], out))))
    try:
        with torch.no_grad():
            return model(x), io
    finally:
        for h in hooks:
            h.remove()


# Per-token int8 activations are a step function of the layer's input: two inputs that differ by
# rounding can straddle a rounding boundary and get codes one apart. So the converted model is
# compared with the QAT model layer by layer, on the same inputs (where only rounding differs),
# and end to end loosely for the dynamic format (measured: a few outputs in a thousand move by
# about one activation step, 1e-3, giving ~60 dB) and tightly for the weight-only ones.
_END_TO_END_SQNR = 45


@pytest.mark.parametrize("learnable", [False, True], ids=["rtn", "learnable"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_converted_forward_equals_qat_forward(name, learnable):
    _, cls = CONFIGS[name]
    model, x = _trained_qat(name, learnable)
    qat_layers = {n: copy.deepcopy(m) for n, m in model.named_modules() if isinstance(m, QATLinear)}
    assert len(qat_layers) == 3
    expected, qat_io = _layer_io(model, x)
    convert_(model)
    got, _ = _layer_io(model, x)
    for layer_name, qat in qat_layers.items():
        real = model.get_submodule(layer_name)
        assert type(real) is cls
        # the operands are bit-identical ...
        fq = qat.fake_quantized_weight().detach()
        if cls is Int4WeightOnlyLinear:
            assert torch.equal(real.dequantized_weight().to(fq.dtype), fq)
        else:
            assert torch.equal(dequantize_int8_per_channel(real.weight, real.weight_scale, fq.dtype), fq)
            if qat.smooth is not None:
                assert torch.equal(real.smooth, qat.smooth)
        if learnable:
            assert torch.equal(real.weight_scale, qat.effective_scale().detach())
            assert not torch.equal(qat.weight_scale.detach().to(qat.scale_dtype), qat._rtn_scale())
        # ... so on the same input the outputs differ by fp32 rounding only (summation order,
        # where the scales are applied)
        layer_in, layer_out = qat_io[layer_name]
        with torch.no_grad():
            torch.testing.assert_close(real(layer_in), layer_out, rtol=1e-5, atol=1e-5)
    if isinstance(CONFIGS[name][0], leanops.Int8DynamicConfig):
        assert leanops.quant.sqnr_db(expected, got) > _END_TO_END_SQNR
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int8_dynamic", "int8_weight_only", "int4_g32"])
def test_converted_forward_equals_qat_forward_in_bfloat16(name):
    model, x = _trained_qat(name, learnable=True, dtype=torch.bfloat16)
    expected, qat_io = _layer_io(model, x)
    convert_(model)
    got, _ = _layer_io(model, x)
    # same codes and scales; bf16 rounds the QAT products and sums where the kernels accumulate
    # in fp32: a few bf16 ulps per layer on the same input
    for layer_name, (layer_in, layer_out) in qat_io.items():
        with torch.no_grad():
            out = model.get_submodule(layer_name)(layer_in)
        torch.testing.assert_close(out.float(), layer_out.float(), rtol=2e-2, atol=2e-2)
        assert leanops.quant.sqnr_db(layer_out, out) > 40
    assert leanops.quant.sqnr_db(expected, got) > 35


@pytest.mark.parametrize("name", ["int8_smoothquant", "int8_weight_only", "int4_g64_asym"])
def test_converted_triton_kernels_match_the_qat_forward(name, interpreter):
    model, x = _trained_qat(name, learnable=True)
    expected, qat_io = _layer_io(model, x)
    convert_(model)
    with torch.no_grad(), leanops.use_backend("triton"):
        for layer_name, (layer_in, layer_out) in qat_io.items():
            got = model.get_submodule(layer_name)(layer_in)
            torch.testing.assert_close(got, layer_out, rtol=1e-5, atol=1e-5)


def test_learnt_scales_train_and_reduce_the_loss():
    torch.manual_seed(0)
    teacher = nn.Linear(64, 32)
    with torch.no_grad():
        teacher.weight.normal_()  # Gaussian weights: RTN's amax grid is not the best one
    x = torch.randn(256, 64)
    y = teacher(x).detach()
    losses = {}
    for learnable in (False, True):
        student = nn.Sequential(copy.deepcopy(teacher))
        prepare_(student, leanops.Int4WeightOnlyConfig(group_size=64, symmetric=True), learnable_scales=learnable)
        # only the scales train: LSQ alone must move them to a better grid than RTN's
        params = [student[0].weight_scale] if learnable else []
        opt = torch.optim.Adam(params, lr=3e-3) if params else None
        for _ in range(60 if learnable else 1):
            loss = (student(x) - y).pow(2).mean()
            if opt:
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            losses[learnable] = (student(x) - y).pow(2).mean().item()
    assert losses[True] < 0.95 * losses[False]  # measured: 0.91


def test_prepare_keeps_parameters_state_dict_keys_and_logs_skips(caplog):
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64))
    keys = set(model.state_dict())
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # built before prepare_
    with caplog.at_level(logging.WARNING, logger="leanops"):
        prepare_(model, leanops.Int4WeightOnlyConfig(group_size=64))
    assert isinstance(model[0], QATLinear) and type(model[2]) is nn.Linear  # 96 % 64 != 0
    assert any("left 2 dense" in r.getMessage() for r in caplog.records)
    assert set(model.state_dict()) == keys and list(model.parameters()) == params
    before = model[0].weight.detach().clone()
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, before)
    prepare_(model, leanops.Int8WeightOnlyConfig(), filter_fn=lambda m, n: n == "2")
    assert isinstance(model[2], QATLinear)
    with pytest.raises(ValueError, match="already a QATLinear"):
        prepare_(model, leanops.Int8WeightOnlyConfig())


def test_prepare_argument_errors():
    with pytest.raises(TypeError, match="config must be"):
        prepare_(_mlp(), leanops.Int8TrainingConfig())
    with pytest.raises(ValueError, match="needs calibrate="):
        prepare_(_mlp(), leanops.Int8DynamicConfig(smoothquant_alpha=0.5))
    with pytest.raises(ValueError, match="single nn.Linear"):
        prepare_(nn.Linear(64, 64), leanops.Int8WeightOnlyConfig())


def test_converted_model_saves_and_loads(tmp_path):
    model, x = _trained_qat("int4_g64_asym", learnable=True)
    convert_(model)
    leanops.save_quantized(model, tmp_path / "m.safetensors")
    fresh = leanops.load_quantized(_mlp(), tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------- 2:4 sparsity + QAT


def test_sparse_training_and_qat_compose():
    sparsity = pytest.importorskip("leanops.sparsity")
    model, x = _trained_qat("int4_g64_asym", learnable=False, steps=0)
    names = sparsity.enable_sparse_training(model)  # a SparseMask parametrization on each weight
    assert names == ["0", "2", "4"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, QATLinear) and sparsity.is_nm_sparse(layer.weight.detach(), 2, 4)
        # the fake-quantised weight is still 2:4: the masked zeros quantise to exact zeros
        assert sparsity.is_nm_sparse(layer.fake_quantized_weight().detach(), 2, 4)
    with torch.no_grad():
        expected = model(x)
        sparsity.finalize_sparse_training(model)
        sparse = convert_(copy.deepcopy(model), sparse_24=True)  # 2:4 + int4 SparseLinear
        convert_(model)  # dense int4 layers
        got, got_sparse = model(x), sparse(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_sparse, expected, rtol=1e-5, atol=1e-5)
    for name in names:
        dense_int4, sparse_int4 = model.get_submodule(name), sparse.get_submodule(name)
        assert isinstance(dense_int4, Int4WeightOnlyLinear) and isinstance(sparse_int4, leanops.SparseLinear)
        assert torch.equal(sparse_int4.dequantized_weight(), dense_int4.dequantized_weight())
        assert sparsity.is_nm_sparse(dense_int4.dequantized_weight(), 2, 4)


def test_convert_to_sparse_24_says_why_not(caplog):
    pytest.importorskip("leanops.sparsity")
    model, _ = _trained_qat("int8_weight_only", learnable=False, steps=0)
    with caplog.at_level(logging.WARNING, logger="leanops"):
        convert_(model, sparse_24=True)
    assert isinstance(model[0], Int8WeightOnlyLinear)
    assert any("not for int8" in r.getMessage() for r in caplog.records)
    layer = _trained_qat("int4_g64_asym", learnable=False, steps=0)[0][0]
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        layer.convert(sparse_24=True)


# ---------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_qat_model_compiles_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = _mlp()
    x = torch.randn(3, 5, 64)
    prepare_(model, leanops.Int8DynamicConfig(smoothquant_alpha=0.5), filter_fn=lambda m, n: n == "0",
             calibrate=lambda m: m(x))
    prepare_(model, leanops.Int4WeightOnlyConfig(group_size=32, symmetric=False),
             filter_fn=lambda m, n: n == "2", learnable_scales=True)
    prepare_(model, leanops.Int8WeightOnlyConfig(), filter_fn=lambda m, n: n == "4")
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True)

    eager_out = model(x)
    eager_out.square().sum().backward()
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for (name, p), p2 in zip(model.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
