"""Checkpoints that cannot corrupt a model: save_quantized writes a CRC-32 per tensor,
load_quantized reads and checks the whole file (header, version, checksums, every layer's spec,
shapes and stored values) before it changes anything, and the packed layers' own load_state_dict
is all-or-nothing too. Corruption is made the way it happens: bytes overwritten inside a
written file, the header left as it was."""

import importlib.util
import json
import logging
import os
import struct

import leanops
import pytest
import torch
from leanops.models import tiny_llama
from leanops.nn import (
    Int4WeightOnlyLinear,
    Int8Linear,
    Int8WeightOnlyLinear,
    SparseLinear,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

DATA = os.path.join(os.path.dirname(__file__), "data")


def fixture_model():
    """The architecture of tests/data/format1_no_checksum.safetensors, from the script that
    wrote it."""
    path = os.path.join(DATA, "make_format1_fixture.py")
    spec = importlib.util.spec_from_file_location("make_format1_fixture", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fixture_model()


# ------------------------------------------------------------------------------------ helpers


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def patch_tensor(path, name, edit):
    """Overwrite, inside the file, the bytes of tensor `name` with those of edit(tensor) (same
    dtype and shape): the header, its metadata and the checksums stay as they were written."""
    header, data_start = _header(path)
    begin, end = header[name]["data_offsets"]
    with safe_open(str(path), "pt") as f:
        t = f.get_tensor(name).clone()
    new = edit(t)
    assert new.dtype == t.dtype and new.shape == t.shape
    raw = new.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    assert len(raw) == end - begin
    with open(path, "r+b") as f:
        f.seek(data_start + begin)
        f.write(raw)


def set_element(index, value):
    def edit(t):
        t[index] = value
        return t

    return edit


def without_checksums(path, out):
    """A copy of `path` as save_quantized wrote it before checksums existed."""
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    del metadata["leanops_checksums"], metadata["leanops_checksum"]
    save_file(tensors, str(out), metadata=metadata)
    return out


def snapshot(model):
    """Everything load_quantized may change: which module object sits at each name, and every
    state tensor's dtype, device and bytes."""
    modules = {name: m for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    return modules, state


def assert_unchanged(model, before):
    modules, state = before
    assert {name: m for name, m in model.named_modules()} == modules  # same objects
    now = model.state_dict(keep_vars=True)
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].dtype == v.dtype and now[k].device == v.device, k
        assert torch.equal(now[k].detach(), v), f"{k} changed"


def assert_refused(model, path, match, **kwargs):
    """load_quantized(model, path, **kwargs) raises ValueError matching `match`, and `model` is
    exactly as it was."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        leanops.load_quantized(model, path, **kwargs)
    assert_unchanged(model, before)


def three_layer_model(out_last=32):
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, out_last)
    )


def quantised_three_layers():
    """The issue's case: a quantised 3-layer model, every packed format represented."""
    model = three_layer_model()
    model[0] = Int4WeightOnlyLinear.from_linear(model[0], group_size=32, symmetric=False)
    model[2] = SparseLinear.from_linear(model[2], group_size=64, symmetric=False)
    model[4] = Int8Linear.from_linear(model[4], smoothing=torch.rand(64) + 0.5)
    return model


# A value each layer's format forbids, in a tensor of that layer (first, middle, last).
CORRUPTIONS = {
    "first": ("0.weight_scale", set_element((3, 1), float("nan"))),
    "middle": ("2.weight_meta", set_element((5, 2), 0x55)),
    "last": ("4.weight_scale", set_element(7, float("nan"))),
}
CORRUPTION_ERRORS = {
    "first": r"0\.weight_scale must be positive and finite everywhere; 1 element\(s\), the first at index \(3, 1\): nan",
    "middle": r"2\.weight_meta holds 2 invalid group code\(s\) \(first: row 5, group 4, code 0x5\)",
    "last": r"4\.weight_scale must be positive and finite everywhere; 1 element\(s\), the first at index \(7,\): nan",
}


@pytest.fixture
def saved(tmp_path):
    model = quantised_three_layers()
    path = tmp_path / "m.safetensors"
    leanops.save_quantized(model, path)
    return model, path


# ------------------------------------------------------------- 1. corruption never loads silently


def test_a_nan_scale_is_caught_by_the_checksum_and_the_model_is_untouched(tmp_path):
    """Issue 15, case 1: one int8 weight scale overwritten with NaN used to load, and the model
    then output NaN."""
    model = tiny_llama("test")
    leanops.quantize_(model, leanops.Int8WeightOnlyConfig())
    path = tmp_path / "m.safetensors"
    leanops.save_quantized(model, path)
    patch_tensor(path, "layers.1.mlp.up_proj.weight_scale", set_element(5, float("nan")))
    fresh = tiny_llama("test", seed=1)
    assert_refused(fresh, path, r"m\.safetensors is corrupt: 1 tensor\(s\) differ from what was saved \(checksum mismatch\): layers\.1\.mlp\.up_proj\.weight_scale\. The model was not changed")
    # Without the checksum, the format check refuses the same byte.
    assert_refused(fresh, path, r"layers\.1\.mlp\.up_proj\.weight_scale must be positive and finite everywhere; 1 element\(s\), the first at index \(5,\): nan", verify_checksums=False)


def test_a_changed_byte_no_format_rule_can_see_is_caught_by_the_checksum(saved):
    model, path = saved
    patch_tensor(path, "4.weight", set_element((0, 0), 17))  # any int8 code is a valid code
    fresh = three_layer_model()
    assert_refused(fresh, path, r"checksum mismatch\): 4\.weight\.")
    # The opt-out loads it: the checksum is what guards such bytes (and dense tensors' bytes).
    leanops.load_quantized(fresh, path, verify_checksums=False)
    assert int(fresh[4].weight[0, 0]) == 17


def test_save_writes_one_checksum_per_stored_tensor(saved):
    model, path = saved
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        names = set(f.keys())
    assert metadata["leanops_checksum"] == "crc32"
    checksums = json.loads(metadata["leanops_checksums"])
    assert set(checksums) == names == set(model.state_dict())
    assert all(len(c) == 8 and int(c, 16) >= 0 for c in checksums.values())


def test_checksums_cover_dtype_and_shape(tmp_path):
    """Tensors with the same bytes but another dtype or shape have other checksums, so a header
    whose dtype or shape field changed is caught too."""
    def checksum(buffer):
        module = nn.Module()
        module.register_buffer("b", buffer)
        path = tmp_path / "b.safetensors"
        leanops.save_quantized(module, path)
        return json.loads(load_metadata(path)["leanops_checksums"])["b"]

    zeros = checksum(torch.zeros(8, 4))
    assert checksum(torch.zeros(8, 4)) == zeros
    assert checksum(torch.zeros(4, 8)) != zeros
    assert checksum(torch.zeros(8, 4, dtype=torch.int32)) != zeros


def load_metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_checksum_list_that_does_not_match_the_tensors_is_refused(saved, tmp_path):
    _, path = saved
    tensors = load_file(str(path))
    metadata = load_metadata(path)
    checksums = json.loads(metadata["leanops_checksums"])
    del checksums["2.bias"]
    metadata["leanops_checksums"] = json.dumps(checksums)
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    fresh = three_layer_model()
    assert_refused(fresh, edited, "is corrupt: its checksum list is unreadable or does not name exactly")


@pytest.mark.parametrize(
    "name, edit, error",
    [
        ("0.weight_scale", set_element((0, 0), 0.0), r"0\.weight_scale must be positive and finite"),
        ("0.weight_scale", set_element((1, 1), -0.5), r"0\.weight_scale must be positive and finite"),
        ("0.weight_scale", set_element((1, 1), float("inf")), r"index \(1, 1\): inf"),
        ("0.weight_zero", set_element((2, 0), 16), r"0\.weight_zero must hold codes in \[0, 15\]; 1 element\(s\), the first at index \(2, 0\): 16"),
        ("2.weight_zero", set_element((0, 0), 200), r"2\.weight_zero must hold codes in \[0, 15\]"),
        ("2.weight_scale", set_element((4, 0), float("nan")), r"2\.weight_scale must be positive and finite"),
        ("2.weight_meta", set_element((0, 0), 0x00), r"2\.weight_meta holds 2 invalid group code\(s\)"),
        ("4.weight_scale", set_element(0, -1.0), r"4\.weight_scale must be positive and finite"),
        ("4.smooth", set_element(3, float("nan")), r"4\.smooth must be positive and finite"),
    ],
)
def test_every_format_rule_is_checked_on_load(saved, tmp_path, name, edit, error):
    """What a file without checksums (or verify_checksums=False) still gets: the formats' own
    rules on every stored value."""
    _, path = saved
    old = without_checksums(path, tmp_path / "old.safetensors")
    patch_tensor(old, name, edit)
    fresh = three_layer_model()
    assert_refused(fresh, old, error)


def test_2_4_values_must_be_finite(tmp_path):
    model = nn.Sequential(SparseLinear.from_linear(nn.Linear(32, 16)))
    path = tmp_path / "s.safetensors"
    leanops.save_quantized(model, path)
    patch_tensor(path, "0.weight_values", set_element((3, 4), float("-inf")))
    with pytest.raises(ValueError, match=r"0\.weight_values must be finite; 1 element\(s\), the first at index \(3, 4\): -inf"):
        leanops.load_quantized(nn.Sequential(nn.Linear(32, 16)), path, verify_checksums=False)


def test_a_truncated_file_is_refused_with_its_path(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    fresh = three_layer_model()
    assert_refused(fresh, cut, r"cut\.safetensors is not a leanops checkpoint: it is not a valid safetensors file")


# --------------------------------------------------------- 2. a failed load changes nothing


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_layer_that_does_not_fit_leaves_the_model_as_it_was(saved, where):
    """Issue 15, case 2: loading into a model whose last Linear had another shape used to swap
    the earlier layers for all-zero quantised ones before raising."""
    _, path = saved
    fresh = three_layer_model()
    index = {"first": 0, "middle": 2, "last": 4}[where]
    fresh[index] = nn.Linear(64, 24)
    assert_refused(fresh, path, rf"layer '{index}': the model's nn.Linear is 64->24 but .* holds 64->")


@pytest.mark.parametrize("where", sorted(CORRUPTIONS))
@pytest.mark.parametrize("into", ["dense", "quantised"])
def test_an_invalid_value_leaves_the_model_as_it_was(saved, tmp_path, where, into):
    """A file without checksums with one invalid value at the first, a middle or the last
    layer, loaded into a dense model or into one already quantised the same way (whose packed
    tensors must not be overwritten either)."""
    model, path = saved
    old = without_checksums(path, tmp_path / "old.safetensors")
    name, edit = CORRUPTIONS[where]
    patch_tensor(old, name, edit)
    fresh = three_layer_model() if into == "dense" else quantised_three_layers()
    assert_refused(fresh, old, CORRUPTION_ERRORS[where])
    # The intact file still loads into the same model afterwards.
    leanops.load_quantized(fresh, path)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_corrupt_tensor_found_by_its_checksum_leaves_the_model_as_it_was(saved, where):
    _, path = saved
    name = {"first": "0.weight_packed", "middle": "2.weight_values", "last": "4.bias"}[where]
    patch_tensor(path, name, lambda t: t.view(torch.uint8).bitwise_xor_(1).view(t.dtype))
    fresh = three_layer_model()
    assert_refused(fresh, path, rf"checksum mismatch\): {name}\.")


def test_missing_and_unexpected_dense_tensors_leave_the_model_as_it_was(saved):
    _, path = saved
    bigger = nn.Sequential(*three_layer_model(), nn.Linear(32, 8))  # "5.*" is not in the file
    assert_refused(bigger, path, r"does not fit the model \(strict=True\): missing \['5.bias', '5.weight'\]; unexpected nothing")
    extra = bigger[5].weight.detach().clone()
    leanops.load_quantized(bigger, path, strict=False)  # the extra layer keeps its weights
    assert torch.equal(bigger[5].weight, extra)
    assert isinstance(bigger[4], Int8Linear)



def test_missing_and_unexpected_tensors_of_a_packed_layer_leave_the_model_as_it_was(saved, tmp_path):
    """A packed layer's tensors are all required, whatever `strict` says."""
    _, path = saved
    tensors = load_file(str(path))
    metadata = load_metadata(path)
    del tensors["2.weight_meta"]
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    fresh = three_layer_model()
    assert_refused(fresh, edited, r"2\.weight_meta is missing", strict=False, verify_checksums=False)
    layers = json.loads(metadata["leanops_layers"])
    layers["4"]["bias"] = False
    save_file(load_file(str(path)), str(edited), metadata={**metadata, "leanops_layers": json.dumps(layers)})
    assert_refused(fresh, edited, r"4\.bias is not a tensor of this layer \(it holds smooth, weight, weight_scale\)", strict=False)


def test_a_layer_the_file_holds_dense_but_the_model_has_quantised_is_refused(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
    model[0] = Int8WeightOnlyLinear.from_linear(model[0])
    path = tmp_path / "m.safetensors"
    leanops.save_quantized(model, path)  # model[2] stays dense
    both = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
    both[2] = Int8WeightOnlyLinear.from_linear(both[2])
    assert_refused(both, path, r"the model's layer '2' is quantised .* holds it unquantised", strict=False)


def test_a_dense_tensor_of_another_shape_leaves_the_model_as_it_was(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    model[0] = Int8WeightOnlyLinear.from_linear(model[0])
    path = tmp_path / "m.safetensors"
    leanops.save_quantized(model, path)
    other = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(16))
    assert_refused(other, path, r"shape mismatch for 1\.bias \(32,\) \(the model's is \(16,\)\), 1\.weight \(32,\) \(the model's is \(16,\)\)", strict=False)


@pytest.mark.parametrize(
    "edit, error",
    [
        (lambda spec: spec.update(type="Int3Linear"), "unknown leanops layer type 'Int3Linear'"),
        (lambda spec: spec.update(dtype="float64"), "spec dtype must be one of"),
        (lambda spec: spec.pop("symmetric"), "invalid Int4WeightOnlyLinear spec .*: the layer it builds has spec"),
        (lambda spec: spec.update(group_size="32"), "invalid Int4WeightOnlyLinear spec"),
        (lambda spec: spec.update(colour="red"), "invalid Int4WeightOnlyLinear spec"),
    ],
)
def test_an_invalid_layer_spec_leaves_the_model_as_it_was(saved, tmp_path, edit, error):
    _, path = saved
    tensors = load_file(str(path))
    metadata = load_metadata(path)
    layers = json.loads(metadata["leanops_layers"])
    edit(layers["0"])
    metadata["leanops_layers"] = json.dumps(layers)
    edited = tmp_path / "spec.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    fresh = three_layer_model()
    assert_refused(fresh, edited, rf"spec\.safetensors, layer '0': {error}")


def test_load_round_trip_and_a_second_load_into_the_quantised_model(saved):
    model, path = saved
    fresh = three_layer_model()
    leanops.load_quantized(fresh, path)
    leanops.load_quantized(fresh, path)  # into the now quantised model: same specs
    assert [type(m) for m in fresh] == [type(m) for m in model]
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ------------------------------------------------------------------ the formats' validators


def test_format_validators_accept_what_the_quantisers_write_and_name_what_is_wrong():
    from leanops.quant.int4 import check_int4, quantize_int4
    from leanops.quant.int8 import check_int8_per_channel, quantize_int8_per_channel
    from leanops.sparsity import nm_mask
    from leanops.sparsity import sparse24 as F24

    w = torch.randn(8, 128)
    packed, scales, zeros = quantize_int4(w, 32, symmetric=False)
    check_int4(packed, scales, zeros, 32)
    check_int4(*quantize_int4(w, 64), 64)
    with pytest.raises(ValueError, match=r"scales must be float16, bfloat16 or float32 of shape \(8, 4\) \(one per group of 32 inputs of w_packed\), got torch.float32 \(8, 2\)"):
        check_int4(packed, scales[:, :2], zeros, 32)
    with pytest.raises(ValueError, match=r"zeros must be uint8 of shape \(8, 4\) or None \(symmetric\), got torch.int8"):
        check_int4(packed, scales, zeros.to(torch.int8), 32)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        check_int4(packed, scales, zeros, 48)
    with pytest.raises(ValueError, match=r"w_packed must be uint8 \[N, K/2\], got torch.int8"):
        check_int4(packed.view(torch.int8), scales, zeros, 32)

    q, scale = quantize_int8_per_channel(w)
    check_int8_per_channel(q, scale)
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(8,\) \(one scale per row of q\), got torch.float16 \(8,\)"):
        check_int8_per_channel(q, scale.half())
    with pytest.raises(ValueError, match=r"q must be int8 \[N, K\], got torch.uint8"):
        check_int8_per_channel(q.view(torch.uint8), scale)

    values, meta = F24.compress_24(w, nm_mask(w.abs(), 2, 4))
    F24.check_24(values, meta)
    with pytest.raises(ValueError, match=r"meta must be uint8 \[N, K/8\] = \(8, 16\) for values of shape \(8, 64\)"):
        F24.check_24(values, meta[:, :8])
    kept, s4, z4, meta4 = F24.compress_24_int4(w, 64, False, nm_mask(w.abs(), 2, 4))
    F24.check_24_int4(kept, s4, z4, meta4, 64)
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 64"):
        F24.check_24_int4(kept, s4, z4, meta4, 32)
    with pytest.raises(ValueError, match=r"scales must be .* of shape \(8, 2\)"):
        F24.check_24_int4(kept, s4[:, :1], z4, meta4, 64)


# ------------------------------------------------ load_state_dict of the packed layers themselves

LAYERS = {
    "int8_dynamic": lambda: Int8Linear.from_linear(nn.Linear(64, 24), smoothing=torch.rand(64) + 0.5),
    "int8_weight_only": lambda: Int8WeightOnlyLinear.from_linear(nn.Linear(64, 24)),
    "int4_asym": lambda: Int4WeightOnlyLinear.from_linear(nn.Linear(64, 24), 32, symmetric=False),
    "sparse": lambda: SparseLinear.from_linear(nn.Linear(64, 24)),
    "sparse_int4": lambda: SparseLinear.from_linear(nn.Linear(64, 24), group_size=64, symmetric=False),
}
# A key of each layer holding a scale (or values) that must be positive (finite).
SCALE_KEY = {"int8_dynamic": "weight_scale", "int8_weight_only": "weight_scale",
             "int4_asym": "weight_scale", "sparse": "weight_values", "sparse_int4": "weight_scale"}


def _layer_snapshot(layer):
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def assert_load_refused(layer, state, error, match, module=None, **kwargs):
    """layer.load_state_dict(state, **kwargs) raises `error` matching `match`, and `module`
    (default: the layer itself) is exactly as it was."""
    module = layer if module is None else module
    before = _layer_snapshot(module)
    with pytest.raises(error, match=match):
        layer.load_state_dict(state, **kwargs)
    now = module.state_dict()
    assert now.keys() == before.keys()
    for k, v in before.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), f"{k} changed"


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_packed_load_state_dict_refuses_invalid_values_and_changes_nothing(kind):
    source, target = LAYERS[kind](), LAYERS[kind]()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    key = SCALE_KEY[kind]
    state[key].view(-1)[-1] = float("nan")  # the last element: the others load first in torch
    assert_load_refused(target, state, ValueError, rf"^{key} must be (positive and )?finite")


@pytest.mark.parametrize("cls", [Int4WeightOnlyLinear, Int8WeightOnlyLinear])
@pytest.mark.parametrize("bad", [float("nan"), -2.0, 0.0])
def test_a_stored_input_scale_is_checked_like_a_built_one(cls, bad):
    """AWQ's input_scale (1/s) must be positive and finite when a layer is loaded too, not only
    when it is built (from_weight refuses the same tensor)."""
    w = torch.randn(24, 128)
    source = cls.from_weight(w, input_scale=torch.rand(128) + 0.5)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["input_scale"][5] = bad
    target = cls.from_weight(w, input_scale=torch.ones(128))
    match = r"^input_scale must be positive and finite everywhere; 1 element\(s\), the first at index \(5,\)"
    assert_load_refused(target, state, ValueError, match)
    with pytest.raises(ValueError, match=match):
        target.validate_state(state)
    with pytest.raises(ValueError, match=match):
        cls.from_weight(w, input_scale=state["input_scale"])


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_packed_load_state_dict_with_a_wrong_shape_changes_nothing(kind):
    """torch reports a size mismatch only after copying the layer's other tensors; a packed
    layer reports it (the same way: RuntimeError) without copying any."""
    source, target = LAYERS[kind](), LAYERS[kind]()
    state = {**source.state_dict(), "bias": torch.zeros(25)}
    assert_load_refused(
        target, state, RuntimeError,
        r"bias must be float32 of shape \(24,\) for .*, got float32 of shape \(25,\)",
    )


def test_packed_load_state_dict_missing_or_unexpected_keys_change_nothing():
    source, target = LAYERS["int4_asym"](), LAYERS["int4_asym"]()
    state = source.state_dict()
    del state["weight_zero"]
    assert_load_refused(
        target, state, RuntimeError,
        r"\(nothing was loaded\): Missing key\(s\) in state_dict: 'weight_zero'",
    )
    state = {**source.state_dict(), "weight_extra": torch.zeros(1)}
    assert_load_refused(target, state, RuntimeError, r"Unexpected key\(s\) in state_dict: 'weight_extra'")


def test_packed_load_state_dict_checks_the_values_it_keeps_with_strict_false():
    """strict=False loads what is given; the layer after the load (given tensors plus kept
    ones) must still be valid."""
    layer = LAYERS["int4_asym"]()
    zeros = {"weight_zero": torch.full_like(layer.weight_zero, 99)}
    assert_load_refused(layer, zeros, ValueError, "weight_zero must hold codes in", strict=False)
    new_scale = layer.weight_scale * 2
    layer.load_state_dict({"weight_scale": new_scale}, strict=False)
    assert torch.equal(layer.weight_scale, new_scale)


def test_packed_load_state_dict_checks_float_tensors_as_they_will_be_stored():
    """A float tensor of another dtype is cast, as torch does, and its values are checked after
    the cast: an fp32 scale that underflows to 0 in fp16 is refused; an integer tensor of
    another dtype is never reinterpreted."""
    layer = Int4WeightOnlyLinear.from_linear(nn.Linear(64, 24).half(), 32)
    state = layer.state_dict()
    good = {**state, "weight_scale": state["weight_scale"].float()}
    fresh = Int4WeightOnlyLinear(64, 24, group_size=32, dtype=torch.float16)
    fresh.load_state_dict(good)
    assert torch.equal(fresh.weight_scale, layer.weight_scale)
    tiny = good["weight_scale"].clone()
    tiny[2, 1] = 1e-10
    assert_load_refused(
        fresh, {**state, "weight_scale": tiny}, ValueError,
        r"weight_scale must be positive and finite everywhere; 1 element\(s\), the first at index \(2, 1\): 0\.0",
    )
    int8 = Int8WeightOnlyLinear.from_linear(nn.Linear(64, 24))
    wrong = {**int8.state_dict(), "weight": int8.weight.view(torch.uint8)}
    assert_load_refused(
        Int8WeightOnlyLinear(64, 24), wrong, RuntimeError,
        r"weight must be int8 of shape \(24, 64\) .* got uint8",
    )


def test_a_model_level_load_state_dict_still_works_and_checks_each_packed_layer():
    model = quantised_three_layers()
    fresh = quantised_three_layers()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    state = model.state_dict()
    state["4.smooth"] = state["4.smooth"].clone()
    state["4.smooth"][0] = 0
    assert_load_refused(fresh, state, ValueError, r"4\.smooth must be positive and finite", module=fresh[4])


def test_validate_state_checks_a_layer_in_place():
    layer = LAYERS["sparse_int4"]()
    layer.validate_state()
    layer.weight_meta[1, 1] = 0xFF
    with pytest.raises(ValueError, match=r"weight_meta holds 2 invalid group code\(s\) \(first: row 1, group 2, code 0xf\)"):
        layer.validate_state()


def test_value_checks_of_many_layers_read_back_once(monkeypatch):
    """One device-to-host read for all the value checks of a whole model (on a GPU: one
    synchronisation, not one per layer and tensor)."""
    from leanops.quant.common import ValueChecks

    model = quantised_three_layers()
    reads = []
    for method in ("tolist", "item", "__bool__", "__int__", "__float__"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _o=original, _m=method: reads.append(_m) or _o(self, *a))
    checks = ValueChecks()
    for name in ("0", "2", "4"):
        model.get_submodule(name).validate_state(prefix=name + ".", checks=checks)
    assert reads == []
    checks.run()
    assert reads == ["tolist"]


# ------------------------------------------------------------- files written before checksums


def test_a_format_1_file_without_checksums_still_loads_exactly(caplog):
    """tests/data/format1_no_checksum.safetensors was written by save_quantized before it wrote
    checksums (see make_format1_fixture.py); it loads with the format checks only, and the
    model computes what the saved one computed."""
    path = os.path.join(DATA, "format1_no_checksum.safetensors")
    assert "leanops_checksums" not in load_metadata(path)
    io = load_file(os.path.join(DATA, "format1_no_checksum_io.safetensors"))
    model = fixture_model()
    with caplog.at_level(logging.INFO, logger="leanops"):
        leanops.load_quantized(model, path)
    assert any("has no checksums" in r.getMessage() for r in caplog.records)
    assert [type(m).__name__ for m in model][::2] == [
        "Int8Linear", "Int4WeightOnlyLinear", "SparseLinear", "SparseLinear", "Int8WeightOnlyLinear", "Linear"
    ]
    # y came from the reference ops (the CPU kernels, later, sum in another order: ~1e-8 apart)
    with torch.no_grad(), leanops.use_backend("reference"):
        assert torch.equal(model(io["x"]), io["y"])


def test_a_corrupt_format_1_file_is_refused_by_the_format_checks(tmp_path):
    path = tmp_path / "old.safetensors"
    path.write_bytes(open(os.path.join(DATA, "format1_no_checksum.safetensors"), "rb").read())
    patch_tensor(path, "0.weight_scale", set_element(9, float("nan")))
    model = fixture_model()
    assert_refused(model, path, r"0\.weight_scale must be positive and finite everywhere")


# ------------------------------------------------------------------ 5. the minor errors


@pytest.mark.parametrize("cls", [Int8Linear, Int8WeightOnlyLinear, Int4WeightOnlyLinear, SparseLinear])
def test_from_linear_on_the_meta_device_says_so(cls):
    linear = nn.Linear(128, 32, device="meta")
    with pytest.raises(ValueError, match=r"weight is on the meta device: it has a shape but no values to quantise.*device='meta'"):
        cls.from_linear(linear)


def test_a_torch_save_file_is_named_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "model.pt"
    torch.save({"weight": torch.zeros(2), "trap": Trap()}, path)
    fresh = three_layer_model()
    assert_refused(fresh, path, r"model\.pt is not a leanops checkpoint: it looks like a torch\.save \(pickle\) file, which leanops never unpickles")
    assert not marker.exists()
    legacy = tmp_path / "legacy.pt"
    torch.save({"weight": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match=r"legacy\.pt is not a leanops checkpoint: it looks like a torch\.save"):
        leanops.load_quantized(fresh, legacy)


def test_other_unreadable_paths_are_named(tmp_path):
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors is not a leanops checkpoint: it is not a valid safetensors file"):
        leanops.load_quantized(three_layer_model(), empty)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        leanops.load_quantized(three_layer_model(), tmp_path)
    with pytest.raises(FileNotFoundError):
        leanops.load_quantized(three_layer_model(), tmp_path / "absent.safetensors")


# --------------------------------------------------------------------------- saving safely


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_partial_one(saved, monkeypatch):
    model, path = saved
    good = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        leanops.save_quantized(model, path)
    assert path.read_bytes() == good
    assert os.listdir(path.parent) == [path.name]
