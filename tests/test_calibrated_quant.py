"""Calibrated weight quantisation (leanops.quant.gptq / awq / hqq / obs, leanops.ptq): every
algorithm writes the ordinary packed formats, beats round-to-nearest on held-out real
activations, and round-trips exactly through the format and save/load."""

import copy
import logging
import pathlib
import subprocess
import sys
import sysconfig

import leanops
import pytest
import torch
from leanops import calibration, ptq
from leanops.models import tiny_llama
from leanops.nn import Int4WeightOnlyLinear, Int8WeightOnlyLinear, SparseLinear
from leanops.quant import awq, gptq, grid, hqq, obs
from leanops.quant.int4 import dequantize_int4, quantize_int4, unpack_int4
from leanops.quant.int8 import dequantize_int8_per_channel, quantize_int8_per_channel
from leanops.sparsity import sparse24 as sparse_format
from leanops.sparsity.pruning import prune_sparsegpt
from torch import nn

CALIBRATED = ("awq", "gptq", "awq+gptq")


# ------------------------------------------------------------------ real data, demo model

def _source_tokens(first_file: int, n_seq: int, seq_len: int) -> torch.Tensor:
    """Byte tokens [n_seq, seq_len] of the standard library's own source files (sorted), one
    file per sequence from `first_file` on: real text on every machine, no download."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    seqs = []
    for path in files[first_file:]:
        data = path.read_bytes()[:seq_len]
        if len(data) == seq_len:
            seqs.append(torch.tensor(list(data)))
        if len(seqs) == n_seq:
            break
    return torch.stack(seqs)


@pytest.fixture(scope="module")
def demo():
    """The demo TinyLlama (random weights with outlier channels, as `leanops demo`), byte
    tokens of 12 stdlib files to calibrate on and of 4 other files held out, and every linear
    layer's held-out inputs in the float model."""
    torch.manual_seed(0)
    model = tiny_llama("demo")
    calib, held = _source_tokens(0, 12, 192), _source_tokens(40, 4, 192)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    inputs = calibration.collect_input_statistics(
        model, layers, lambda m: m(held), lambda x, prev: x.clone(), purpose="test"
    )
    return model, calib, inputs


def _held_out_errors(model, results, inputs, rtn):
    """name -> (method's held-out output error, RTN's) for every layer in results."""
    out = {}
    for name, res in results.items():
        w = model.get_submodule(name).weight.detach().float()
        x = inputs[name].float()
        mine = (x @ (w - res.effective_weight()).t()).norm().item()
        base = (x @ (w - rtn(w)).t()).norm().item()
        out[name] = (mine, base)
    return out


def _rtn4(group_size, symmetric):
    return lambda w: dequantize_int4(*quantize_int4(w, group_size, symmetric), group_size).float()


def _run(model, config, calibrate):
    """ptq's per-layer results on a copy of model (folds happen in the copy)."""
    work = copy.deepcopy(model)
    targets = {n: m for n, m in work.named_modules() if isinstance(m, nn.Linear)}
    return ptq.quantize_model_(work, targets, config, calibrate, swap=False)


@pytest.mark.parametrize("algorithm", CALIBRATED)
def test_never_worse_than_rtn_on_held_out_data_demo_model(demo, algorithm):
    model, calib, inputs = demo
    config = leanops.Int4WeightOnlyConfig(128, symmetric=False, algorithm=algorithm)
    results = _run(model, config, lambda m: m(calib))
    errors = _held_out_errors(model, results, inputs, _rtn4(128, False))
    worse = {n: e for n, e in errors.items() if e[0] >= e[1]}
    assert not worse, worse
    ratio = sum(e[0] for e in errors.values()) / sum(e[1] for e in errors.values())
    # Measured (held-out error norms summed over the 29 layers, method / RTN; worst layer):
    # awq 0.57 (0.82), gptq 0.28 (0.35), awq+gptq 0.24 (0.35).
    assert ratio < {"awq": 0.7, "gptq": 0.4, "awq+gptq": 0.35}[algorithm], ratio


# ------------------------------------------------------------------ layer level

def _correlated(t, k, seed=0):
    """t tokens of activations with correlated channels and a few outlier channels, like a
    transformer's: one distribution per k, `seed` draws the tokens."""
    mix = torch.randn(k, k, generator=torch.Generator().manual_seed(k)) / k**0.5
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(k)
    scale[:: k // 6] = 8.0
    return (torch.randn(t, k, generator=g) @ mix + 0.2 * torch.randn(t, k, generator=g)) * scale


def _out_err(x, w, w_hat):
    return ((x @ (w - w_hat.float()).t()).norm() / (x @ w.t()).norm()).item()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_int4_lies_on_its_grid_and_beats_rtn(symmetric, act_order):
    k, n, g = 192, 40, 64
    x = _correlated(1024, k)
    held = _correlated(512, k, seed=1)
    w = torch.randn(n, k) * 0.05
    w_hat, scales, zeros = gptq.gptq_int4(w, x.t() @ x, g, symmetric, act_order=act_order)
    assert w_hat.dtype == torch.float32 and scales.shape == (n, k // g)
    assert (zeros is None) == symmetric
    # On the grid: re-encoding with the solver's grid reproduces w_hat bit for bit.
    packed, s2, z2 = quantize_int4(w_hat, g, symmetric, scales=scales, zeros=zeros)
    assert torch.equal(dequantize_int4(packed, s2, z2, g), w_hat)
    rtn = _rtn4(g, symmetric)(w)
    assert _out_err(held, w, w_hat) < 0.85 * _out_err(held, w, rtn)


def test_gptq_bfloat16_weight_grid_and_dead_channels():
    k, n, g = 128, 24, 32
    x = _correlated(512, k)
    x[:, 7] = 0.0  # a channel that never fires
    w = (torch.randn(n, k) * 0.05).to(torch.bfloat16)
    w_hat, scales, zeros = gptq.gptq_int4(w, x.t() @ x, g, False)
    assert w_hat.dtype == scales.dtype == torch.bfloat16
    packed, _, _ = quantize_int4(w_hat, g, False, scales=scales, zeros=zeros)
    assert torch.equal(dequantize_int4(packed, scales, zeros, g), w_hat)
    # A dead input carries no signal: its weights go to the code of 0.0.
    assert bool((w_hat[:, 7] == 0).all())


def test_gptq_int8_beats_rtn_and_reencodes_exactly():
    k, n = 160, 48
    x, held = _correlated(1024, k), _correlated(512, k, seed=1)
    w = torch.randn(n, k) * 0.05
    w_hat, scale = gptq.gptq_int8(w, x.t() @ x)
    q, s2 = quantize_int8_per_channel(w_hat, scale)
    assert torch.equal(dequantize_int8_per_channel(q, s2), w_hat)
    q0, s0 = quantize_int8_per_channel(w)
    assert _out_err(held, w, w_hat) < 0.85 * _out_err(held, w, dequantize_int8_per_channel(q0, s0))


def test_gptq_argument_errors():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match=r"hessian must be a tensor of shape \(64, 64\)"):
        gptq.gptq_int4(w, torch.eye(32), 32)
    with pytest.raises(ValueError, match="damp must be a positive number"):
        gptq.gptq_int4(w, torch.eye(64), 32, damp=0)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        gptq.gptq_int4(w, torch.eye(64), 48)
    with pytest.raises(ValueError, match="hessian contains NaN or Inf"):
        gptq.gptq_int8(w, torch.full((64, 64), float("nan")))


def test_inverse_hessian_factor_and_blocks():
    x = _correlated(300, 96)
    h = x.t() @ x
    u = obs.inverse_hessian_cholesky(h.clone(), 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(96)
    torch.testing.assert_close(u.t() @ u, torch.linalg.inv(damped), rtol=1e-3, atol=1e-6)
    assert torch.equal(u, u.triu())
    blocks = grid.hessian_blocks(h, 32)
    assert blocks.shape == (3, 32, 32) and torch.equal(blocks[1], h[32:64, 32:64])
    # A rank-deficient H (fewer tokens than inputs) still factors thanks to the retries.
    few = x[:10]
    assert torch.isfinite(obs.inverse_hessian_cholesky(few.t() @ few, 1e-8)).all()
    with pytest.raises(ValueError, match="damp must be positive"):
        obs.inverse_hessian_cholesky(h, 0)


@pytest.mark.parametrize("span,blocksize,multiple,expected", [
    (32, 128, 1, 128), (96, 128, 1, 96), (256, 128, 1, 128), (192, 128, 4, 96), (8128, 128, 4, 64),
])
def test_aligned_blocksize(span, blocksize, multiple, expected):
    b = obs.aligned_blocksize(blocksize, span, multiple)
    assert b == expected and b % multiple == 0
    assert (b % span == 0) or (span % b == 0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_loses_to_rtn_by_its_loss(symmetric):
    n, k, g = 16, 128, 32
    w = torch.randn(n, k)
    w[:, 5] *= 6  # outliers: clipping them pays off for the rest of the group
    groups = w.reshape(n, k // g, g)
    x = _correlated(256, k)
    blocks = grid.hessian_blocks(x.t() @ x, g)
    rtn_s, rtn_z = grid.int4_grid(groups, symmetric, torch.float32)
    rtn_loss = grid.group_loss(grid.int4_fake(groups, rtn_s, rtn_z) - groups, blocks)
    s, z = grid.search_int4_grid(groups, symmetric, torch.float32, blocks)
    loss = grid.group_loss(grid.int4_fake(groups, s, z) - groups, blocks)
    assert bool((loss <= rtn_loss).all()) and float(loss.sum()) < 0.95 * float(rtn_loss.sum())
    # ratio 1 is RTN: the grid of quantize_int4, zero points included.
    _, s0, z0 = quantize_int4(w, g, symmetric)
    assert torch.equal(rtn_s, s0) and (symmetric or torch.equal(rtn_z.to(torch.uint8), z0))


@pytest.mark.parametrize("symmetric", [True, False])
def test_hqq_lies_on_the_grid_and_lowers_weight_error(symmetric):
    n, k, g = 32, 256, 64
    w = torch.randn(n, k) * 0.02
    w_hat, scales, zeros = hqq.hqq_int4(w, g, symmetric)
    packed, _, _ = quantize_int4(w_hat, g, symmetric, scales=scales, zeros=zeros)
    assert torch.equal(dequantize_int4(packed, scales, zeros, g), w_hat)
    per_group = lambda a: (w - a).reshape(n, k // g, g).pow(2).sum(-1)  # noqa: E731
    rtn_err, hqq_err = per_group(_rtn4(g, symmetric)(w)), per_group(w_hat)
    # Each group keeps its best grid by squared error, RTN's included.
    assert bool((hqq_err <= rtn_err).all())
    assert float(hqq_err.sum()) < 0.97 * float(rtn_err.sum())
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\]"):
        hqq.hqq_int4(w, g, p=2)


def test_awq_scale_search_includes_rtn_and_helps_outlier_channels():
    k, n, g = 128, 32, 32
    x = _correlated(1024, k)
    h = x.t() @ x
    w = torch.randn(n, k) * 0.05
    fake = awq.int4_rtn_fake(g, False, torch.float32)
    s, alpha = awq.search_scales([w], h, x.shape[0], fake, awq.block_width_for(k, g))
    assert s.shape == (k,) and bool((s > 0).all())
    loss = lambda scale: float(((w - fake(w * scale) / scale) @ h * (w - fake(w * scale) / scale)).sum())  # noqa: E731
    assert loss(s) <= loss(torch.ones(k))
    assert alpha > 0  # the outlier channels make scaling worth it
    torch.testing.assert_close(awq.activation_rms(h, 1024), x.pow(2).mean(0).sqrt(), rtol=1e-4, atol=0)


# ------------------------------------------------------------------ through quantize_

def _tiny(seed=0):
    torch.manual_seed(seed)
    return tiny_llama("test"), _source_tokens(0, 6, 96)


@pytest.mark.parametrize("algorithm", ["hqq", *CALIBRATED])
def test_quantize_with_an_algorithm_swaps_packed_layers_and_round_trips(algorithm, tmp_path):
    model, tokens = _tiny()
    dense = copy.deepcopy(model)
    config = leanops.Int4WeightOnlyConfig(group_size=32, symmetric=False, algorithm=algorithm)
    leanops.quantize_(model, config, calibrate=lambda m: m(tokens))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, Int4WeightOnlyLinear)}
    assert len(layers) == 15 and not any(type(m) is nn.Linear for m in model.modules())
    # AWQ folds into the norms (q/k/v, gate/up, lm_head), v_proj (o_proj) and up_proj
    # (down_proj): no layer of a TinyLlama carries a scale.
    assert not any(m.input_scale is not None for m in layers.values())
    assert torch.equal(model.norm.weight, dense.norm.weight) != algorithm.startswith("awq")
    rtn = copy.deepcopy(dense)
    leanops.quantize_(rtn, leanops.Int4WeightOnlyConfig(group_size=32, symmetric=False))
    with torch.no_grad():
        sqnr = leanops.quant.sqnr_db(dense(tokens), model(tokens))
        rtn_sqnr = leanops.quant.sqnr_db(dense(tokens), rtn(tokens))
    # better than RTN on the calibration tokens (measured: RTN 14.4 dB, HQQ 16.0, AWQ 18.8,
    # GPTQ 25.5, AWQ+GPTQ 28.5 dB on this random-weight model)
    assert sqnr > rtn_sqnr, (sqnr, rtn_sqnr)
    path = tmp_path / "m.safetensors"
    leanops.save_quantized(model, path)
    fresh = tiny_llama("test")  # AWQ's folds live in the float norms: saved with the model
    leanops.load_quantized(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


def test_awq_folds_leave_the_float_model_unchanged():
    model, tokens = _tiny()
    with torch.no_grad():
        before = model(tokens)
    targets = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    results = ptq.quantize_model_(
        model, targets, leanops.Int4WeightOnlyConfig(32, algorithm="awq"), lambda m: m(tokens), swap=False
    )
    folded = {n: r.folded_into for n, r in results.items()}
    assert folded["layers.0.attn.q_proj"] == "layers.0.attn_norm"
    assert folded["layers.0.attn.o_proj"] == "layers.0.attn.v_proj"
    assert folded["layers.1.mlp.down_proj"] == "layers.1.mlp.up_proj"
    assert folded["lm_head"] == "norm"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), before, rtol=1e-4, atol=1e-4)


def test_awq_carries_the_scale_where_nothing_can_absorb_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    x = _correlated(512, 64)
    dense = copy.deepcopy(model)
    leanops.quantize_(model, leanops.Int4WeightOnlyConfig(32, algorithm="awq"), calibrate=lambda m: m(x))
    layer = model[0]
    assert layer.input_scale is not None and model[2].input_scale is not None
    assert "input-scaled" in repr(layer) and layer.spec()["input_scale"] is True
    with torch.no_grad():
        codes_w = dequantize_int4(layer.weight_packed, layer.weight_scale, layer.weight_zero, 32)
        manual = (x * layer.input_scale) @ codes_w.t() + layer.bias
        torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x @ layer.dequantized_weight().t() + layer.bias, manual, rtol=1e-4, atol=1e-4)
        out = model(x)
        assert leanops.quant.sqnr_db(dense(x), out) > 15
    path = tmp_path / "m.safetensors"
    leanops.save_quantized(model, path)
    fresh = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    leanops.load_quantized(fresh, path)
    assert torch.equal(fresh[0].input_scale, model[0].input_scale)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)


def test_sequential_gptq_runs_calibrate_once_per_stage():
    model, tokens = _tiny()
    calls = []

    def calibrate(m):
        calls.append(1)
        m(tokens)

    config = leanops.Int4WeightOnlyConfig(32, algorithm="gptq", sequential=True)
    leanops.quantize_(model, config, calibrate=calibrate)
    # 2 blocks x (q/k/v, o, gate/up, down) + lm_head
    assert len(calls) == 9
    assert sum(isinstance(m, Int4WeightOnlyLinear) for m in model.modules()) == 15


def test_collect_grams_groups_layers_by_shared_input():
    model, tokens = _tiny()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    grams, stages = calibration.collect_grams(model, layers, lambda m: m(tokens), "test")
    assert stages[0] == ["layers.0.attn.q_proj", "layers.0.attn.k_proj", "layers.0.attn.v_proj"]
    assert stages[2] == ["layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"] and stages[-1] == ["lm_head"]
    assert grams["layers.0.attn.q_proj"] is grams["layers.0.attn.v_proj"]
    ref = calibration.collect_input_statistics(model, layers, lambda m: m(tokens), calibration.gram, "x")
    for name in layers:
        torch.testing.assert_close(grams[name][0], ref[name][0], rtol=1e-5, atol=1e-3)
        assert grams[name][1] == ref[name][1] == tokens.numel()
    first, stages2 = calibration.collect_grams(model, layers, lambda m: m(tokens), "test", first_stage_only=True)
    assert stages2 == stages and set(first) == set(stages[0])


def test_int8_weight_only_algorithms():
    model, tokens = _tiny()
    dense = copy.deepcopy(model)
    errs = {}
    for algorithm in ("rtn", "gptq", "awq", "awq+gptq"):
        m = copy.deepcopy(dense)
        leanops.quantize_(m, leanops.Int8WeightOnlyConfig(algorithm=algorithm), calibrate=lambda x: x(tokens))
        assert sum(isinstance(x, Int8WeightOnlyLinear) for x in m.modules()) == 15
        with torch.no_grad():
            errs[algorithm] = leanops.quant.sqnr_db(dense(tokens), m(tokens))
    assert errs["gptq"] > errs["rtn"] + 1 and errs["awq+gptq"] > errs["rtn"] + 1, errs


def test_algorithm_errors_and_few_token_warning(caplog):
    model, tokens = _tiny()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        leanops.Int4WeightOnlyConfig(algorithm="smooth")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        leanops.Int8WeightOnlyConfig(algorithm="hqq")
    with pytest.raises(ValueError, match="damp must be None"):
        leanops.Int4WeightOnlyConfig(algorithm="gptq", damp=-1)
    with pytest.raises(ValueError, match=r"algorithm='gptq' needs calibrate="):
        leanops.quantize_(model, leanops.Int4WeightOnlyConfig(32, algorithm="gptq"))
    with caplog.at_level(logging.WARNING, logger="leanops"):
        leanops.quantize_(model, leanops.Int4WeightOnlyConfig(32, algorithm="gptq"),
                          calibrate=lambda m: m(tokens[:1, :40]))
    assert any("fewer calibration tokens than inputs" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="needs method='sparsegpt'"):
        leanops.SemiSparseConfig(method="wanda", quantize=leanops.Int4WeightOnlyConfig(128, algorithm="gptq"))
    with pytest.raises(ValueError, match="supports algorithm 'rtn' or 'gptq'"):
        leanops.SemiSparseConfig(method="sparsegpt", quantize=leanops.Int4WeightOnlyConfig(128, algorithm="awq"))
    with pytest.raises(ValueError, match="prepare_ trains"):
        leanops.qat.prepare_(nn.Sequential(nn.Linear(64, 64)), leanops.Int4WeightOnlyConfig(32, algorithm="gptq"))


# ------------------------------------------------------------------ 2:4 + int4 in one pass

def test_sparsegpt_joint_pass_prunes_and_quantises_onto_the_grid():
    k, n, g = 256, 48, 128
    x, held = _correlated(2048, k), _correlated(512, k, seed=1)
    w = torch.randn(n, k) * 0.05
    h = x.t() @ x
    quantizer = gptq.Int4ColumnQuantizer(n, k, g, False, torch.float32, w.device, grid.hessian_blocks(h, g))
    joint, mask = prune_sparsegpt(w, h, quantizer=quantizer)
    assert bool((mask.reshape(n, -1, 4).sum(-1) == 2).all()) and not bool(joint[~mask].any())
    values, scales, zeros, meta = sparse_format.compress_24_int4(
        joint, g, False, mask, scales=quantizer.scales, zeros=quantizer.zero_codes()
    )
    assert torch.equal(sparse_format.decompress_24_int4(values, scales, zeros, meta, g), joint)
    # Versus pruning first and rounding the kept values after (SparseGPT + RTN).
    pruned, mask2 = prune_sparsegpt(w, h)
    v2, s2, z2, m2 = sparse_format.compress_24_int4(pruned, g, False, mask2)
    rtn = sparse_format.decompress_24_int4(v2, s2, z2, m2, g)
    assert _out_err(held, w, joint) < _out_err(held, w, rtn)


def test_sparsify_with_gptq_quantisation(tmp_path):
    model, tokens = _tiny()
    config = leanops.SemiSparseConfig(
        method="sparsegpt", quantize=leanops.Int4WeightOnlyConfig(64, symmetric=False, algorithm="gptq")
    )
    leanops.sparsify_(model, config, calibrate=lambda m: m(tokens))
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    # down_proj (K = 160) does not take g64 and stays dense (logged)
    assert len(layers) == 13 and all(m.group_size == 64 and not m.symmetric for m in layers)
    path = tmp_path / "s.safetensors"
    leanops.save_quantized(model, path)
    fresh = tiny_llama("test")
    leanops.load_quantized(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


def test_packed_codes_are_the_solvers_codes():
    """The layer stores exactly the codes the GPTQ column quantiser chose."""
    k, n, g = 128, 16, 32
    x = _correlated(512, k)
    w = torch.randn(n, k) * 0.05
    w_hat, scales, zeros = gptq.gptq_int4(w, x.t() @ x, g, False, act_order=False)
    layer = Int4WeightOnlyLinear.from_weight(w_hat, None, g, False, scales=scales, zeros=zeros)
    codes = unpack_int4(layer.weight_packed).float().reshape(n, k // g, g)
    expected = torch.round(w_hat.reshape(n, k // g, g) / scales[..., None]) + zeros.float()[..., None]
    assert torch.equal(codes, expected)
    assert torch.equal(layer.dequantized_weight(), w_hat)


def test_quantisation_speed_benchmark_runs(tmp_path):
    import importlib.util
    import json

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "quantize_speed.py"
    spec = importlib.util.spec_from_file_location("quantize_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "q.json"
    rows = bench.main(["--shapes", "64x128", "--repeats", "2", "--tokens", "256", "--no-memory",
                       "--json", str(out)])
    assert {r["method"] for r in rows} == set(bench.METHODS)
    assert all(r["repeats"] == 2 and 0 < r["min_s"] <= r["median_s"] <= r["max_s"] for r in rows)
    assert json.loads(out.read_text())["env"]["tokens"] == 256
    # The memory probe runs in a fresh process (as main runs it): GPTQ holds at least a copy of
    # H and W (fp32) beyond its inputs.
    child = subprocess.run(
        [sys.executable, str(path), "--memory-of", "256x512:gptq", "--tokens", "512"],
        check=True, capture_output=True, text=True,
    )
    assert int(child.stdout.split()[-1]) >= 4 * (512 * 512 + 256 * 512)
