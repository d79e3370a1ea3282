"""Whole-model entry points: quantize_ (swap nn.Linear layers for quantised ones in place),
prune_ / sparsify_ (2:4 sparsity: zero weights in place, or swap in SparseLinear with the
compressed weight), and save/load of quantised models through safetensors (no pickle)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from leanops import calibration, ptq
from leanops._version import FORMAT_VERSION, __version__
from leanops.nn.packed import PackedLinear, packed_linear_from_spec
from leanops.nn.quantized import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.nn.sparse import SparseLinear
from leanops.nn.swap import FilterFn, format_unsupported, replace_module, select_linears
from leanops.nn.training import Int8TrainingLinear
from leanops.quant.common import ValueChecks
from leanops.quant.config import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8TrainingConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from leanops.quant.gptq import Int4ColumnQuantizer
from leanops.quant.grid import hessian_blocks
from leanops.quant.smoothquant import collect_activation_amax, smoothing_factors
from leanops.sparsity import pruning
from leanops.sparsity import sparse24 as sparse_format
from leanops.sparsity.config import SemiSparseConfig
from leanops.sparsity.masks import check_nm

logger = logging.getLogger("leanops")


@contextlib.contextmanager
def log_level(level: int):
    """Set the "leanops" logger's level inside the block only (e.g. logging.ERROR to silence the
    per-layer skip messages of quantize_ in a benchmark), restoring it afterwards."""
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)

def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: FilterFn | None = None,
    calibrate: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` that `filter_fn(module, name)` accepts (all,
    by default) with the quantised module of `config`; return the model.

    Layers the kernels cannot take (a group size that does not divide in_features, a non-float
    weight, a projection read directly by nn.MultiheadAttention, ...) are left dense and each is
    logged with its reason on the "leanops" logger. `calibrate(model)` runs sample inputs through
    the model; it is needed by Int8DynamicConfig(smoothquant_alpha=...) and by the weight-only
    configs' algorithm="awq", "gptq" and "awq+gptq" (leanops.ptq runs those and "hqq").
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(
            "config must be Int8DynamicConfig(), Int8WeightOnlyConfig(), "
            f"Int4WeightOnlyConfig(...) or Int8TrainingConfig(), got {type(config).__name__}"
        )
    if isinstance(model, nn.Linear):
        raise ValueError(
            "quantize_ swaps layers inside a model; to quantise a single nn.Linear use "
            "Int8Linear/Int8WeightOnlyLinear/Int4WeightOnlyLinear.from_linear(layer)"
        )
    smoothquant = isinstance(config, Int8DynamicConfig) and config.smoothquant_alpha is not None
    if smoothquant and calibrate is None:
        raise ValueError(
            "Int8DynamicConfig(smoothquant_alpha=...) needs calibrate=, a callable that runs "
            "sample inputs through the model, e.g. calibrate=lambda m: m(sample_batch)"
        )

    calibrated = getattr(config, "algorithm", "rtn") != "rtn"  # leanops.ptq (it checks calibrate)
    targets = select_linears(
        model, filter_fn, "quantize_", why_not=lambda name, linear: format_unsupported(linear, config)
    )
    if calibrated:
        ptq.quantize_model_(model, targets, config, calibrate)
        logger.info("quantize_: %d layer(s) quantised with %s", len(targets), config)
        return model

    act_amax = collect_activation_amax(model, targets, calibrate) if smoothquant else {}

    for name, linear in targets.items():
        if isinstance(config, Int8DynamicConfig):
            smoothing = None
            if smoothquant:
                smoothing = smoothing_factors(act_amax[name], linear.weight, config.smoothquant_alpha)
            new = Int8Linear.from_linear(linear, smoothing=smoothing)
        elif isinstance(config, Int8WeightOnlyConfig):
            new = Int8WeightOnlyLinear.from_linear(linear)
        elif isinstance(config, Int4WeightOnlyConfig):
            new = Int4WeightOnlyLinear.from_linear(
                linear, config.group_size_for(linear.in_features), config.symmetric
            )
        elif isinstance(config, Int8TrainingConfig):
            new = Int8TrainingLinear.from_linear(linear)
        else:
            raise TypeError(f"quantize_: unsupported config {type(config).__name__}")
        new.train(linear.training)
        replace_module(model, name, new)
    logger.info("quantize_: %d layer(s) quantised with %s", len(targets), config)
    return model


# ------------------------------------------------------------------------------ 2:4 sparsity

_PURPOSE = {"wanda": "Wanda", "sparsegpt": "SparseGPT"}


def _select(model, filter_fn, why_not, caller) -> dict[str, nn.Linear]:
    if isinstance(model, nn.Linear):
        raise ValueError(
            f"{caller} swaps or prunes layers inside a model; for a single nn.Linear use "
            "leanops.SparseLinear.from_linear(layer) or leanops.sparsity.prune_magnitude(weight)"
        )
    return select_linears(model, filter_fn, caller, why_not)


def _statistics(model, targets, method, calibrate, caller):
    if method == "magnitude":
        return {}
    if calibrate is None:
        raise ValueError(
            f"{caller}: method={method!r} needs calibrate=, a callable that runs sample inputs "
            "through the model, e.g. calibrate=lambda m: m(sample_batch)"
        )
    update = calibration.sum_of_squares if method == "wanda" else calibration.gram
    return calibration.collect_input_statistics(
        model, targets, calibrate, update, purpose=_PURPOSE[method]
    )


def _prune(weight, method, stat, n, m, blocksize, damp):
    if method == "magnitude":
        return pruning.prune_magnitude(weight, n, m)
    if method == "wanda":
        return pruning.prune_wanda(weight, stat.sqrt(), n, m)
    return pruning.prune_sparsegpt(weight, stat[0].to(weight.device), n, m, blocksize, damp)


def _prune_and_quantize(linear, hessian, config, group_size):
    """SparseGPT's joint pass: (the 2:4 weight on the int4 grid, keep-mask, {scales, zeros})."""
    w = linear.weight
    k = w.shape[1]
    h = hessian.to(w.device)
    quantizer = Int4ColumnQuantizer(
        w.shape[0], k, group_size, config.quantize.symmetric, w.dtype, w.device,
        importance=hessian_blocks(h.float(), group_size),
    )
    pruned, mask = pruning.prune_sparsegpt(
        w, h, 2, 4, config.blocksize, config.damp, quantizer=quantizer
    )
    return pruned, mask, {"scales": quantizer.scales, "zeros": quantizer.zero_codes()}


def prune_(
    model: nn.Module,
    method: str = "magnitude",
    *,
    n: int = 2,
    m: int = 4,
    calibrate: Callable[[nn.Module], object] | None = None,
    filter_fn: FilterFn | None = None,
    blocksize: int = 128,
    damp: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Prune, in place, the weight of every nn.Linear that filter_fn(module, name) accepts (all
    by default) to n:m sparsity along its inputs; return name -> keep-mask (bool [out, in]).

    The layers stay nn.Linear with zeros in their weights (SparseGPT also updates the kept
    weights): for measuring accuracy, for sparse fine-tuning (enable_sparse_training) before
    compressing with sparsify_. Layers whose in_features is not a multiple of m, or whose weight
    is shared with another module (tied), are left alone and logged.

    Arguments:
        model: the model (not a bare nn.Linear: use leanops.sparsity.prune_magnitude on its
            weight).
        method: "magnitude" (|W|, default), "wanda" (|W| * ||X_j||) or "sparsegpt" (the OBS
            solver, which also updates the kept weights); the last two need calibrate.
        n, m: keep n of every m consecutive inputs (default 2:4, what sparse tensor cores run).
        calibrate: a callable run on the model with sample inputs, e.g. lambda m: m(batch).
        filter_fn: filter_fn(module, name) -> bool selects the layers (default: all).
        blocksize: SparseGPT's column block, a positive multiple of m (default 128).
        damp: SparseGPT's Hessian damping, relative to its mean diagonal (default 0.01).

    Raises: ValueError for an invalid n:m, method or blocksize, or a calibrating method without
    calibrate.
    """
    check_nm(n, m)
    if method not in pruning.METHODS:
        raise ValueError(f"method must be one of {pruning.METHODS}, got {method!r}")
    if method == "sparsegpt" and (not isinstance(blocksize, int) or blocksize <= 0 or blocksize % m):
        raise ValueError(f"blocksize must be a positive multiple of m={m}, got {blocksize!r}")
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))

    def why_not(name, linear):
        if linear.in_features % m:
            return f"in_features (K={linear.in_features}) is not a multiple of m={m}"
        if uses[id(linear.weight)] > 1:
            return "its weight is shared with another module (tied); pruning it would prune that one too"
        return None

    targets = _select(model, filter_fn, why_not, "prune_")
    stats = _statistics(model, targets, method, calibrate, "prune_")
    masks = {}
    with torch.no_grad():
        for name, linear in targets.items():
            pruned, mask = _prune(linear.weight, method, stats.get(name), n, m, blocksize, damp)
            linear.weight.copy_(pruned)
            masks[name] = mask
    logger.info("prune_: %d layer(s) pruned to %d:%d by %s", len(targets), n, m, method)
    return masks


def sparsify_(
    model: nn.Module,
    config: SemiSparseConfig | None = None,
    filter_fn: FilterFn | None = None,
    calibrate: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Replace, in place, every nn.Linear that filter_fn(module, name) accepts (all by default)
    with a SparseLinear holding its 2:4-pruned, compressed weight; return the model.

    config: SemiSparseConfig (default: magnitude, 16-bit kept values, leanops kernels).
    calibrate(model) runs sample inputs through the model; needed by "wanda" and "sparsegpt"
    (statistics of each layer's inputs, gathered in one pass over the dense model). Layers the
    format or kernel cannot take (in_features not a multiple of 8, an int4 group size that does
    not fit, a projection nn.MultiheadAttention reads directly, ...) stay dense, each logged with
    its reason on the "leanops" logger. The output head is pruned like any layer if selected;
    LLM pruning usually leaves it dense (filter_fn=lambda m, name: name != "lm_head").
    """
    config = SemiSparseConfig() if config is None else config
    if not isinstance(config, SemiSparseConfig):
        raise TypeError(f"config must be a leanops.SemiSparseConfig, got {type(config).__name__}")

    def group_size_for(linear):
        q = config.quantize
        return None if q is None else q.group_size_for(linear.in_features)

    def why_not(name, linear):
        try:
            sparse_format.check_in_features(linear.in_features)
            g = group_size_for(linear)
            if g is not None:
                sparse_format.check_int4_group_size(g, linear.in_features)
        except ValueError as exc:
            return str(exc)
        if config.kernel == "torch":
            return sparse_format.torch_semi_structured_unsupported(
                linear.out_features, linear.in_features, linear.weight.dtype
            )
        return None

    targets = _select(model, filter_fn, why_not, "sparsify_")
    stats = _statistics(model, targets, config.method, calibrate, "sparsify_")
    joint = config.quantize is not None and config.quantize.algorithm == "gptq"
    for name, linear in targets.items():
        grid_ = {}
        with torch.no_grad():
            if joint:
                pruned, mask, grid_ = _prune_and_quantize(linear, stats[name][0], config, group_size_for(linear))
            else:
                pruned, mask = _prune(
                    linear.weight, config.method, stats.get(name), 2, 4, config.blocksize, config.damp
                )
        new = SparseLinear.from_weight(
            pruned, linear.bias, mask=mask, group_size=group_size_for(linear),
            symmetric=True if config.quantize is None else config.quantize.symmetric,
            kernel=config.kernel, **grid_,
        )
        new.train(linear.training)
        replace_module(model, name, new)
    logger.info("sparsify_: %d layer(s) made 2:4 sparse with %s", len(targets), config)
    return model


# ------------------------------------------------------------------------------ save / load

_FORMAT_KEY = "leanops_format_version"
_LAYERS_KEY = "leanops_layers"
_CHECKSUM_KEY = "leanops_checksum"  # the algorithm
_CHECKSUMS_KEY = "leanops_checksums"  # JSON: tensor name -> checksum
_CHECKSUM = "crc32"
# The first bytes of what torch.save writes (a zip archive, or for its legacy format a bare
# pickle: PROTO opcode and protocol 2-5): named in the error, and never unpickled.
_TORCH_SAVE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def _tensor_checksum(t: torch.Tensor) -> str:
    """CRC-32 of a contiguous CPU tensor's dtype, shape and bytes, as 8 hex digits.

    CRC-32 detects every change of up to 32 consecutive bits and all but 2^-32 of other changes:
    a check against corruption (disk, transfer, truncation, a stray write), not against
    deliberate tampering (the checksums sit in the same file). It is zlib's, on the tensor's
    memory as it is (no copy)."""
    crc = zlib.crc32(f"{t.dtype}{tuple(t.shape)}".encode())
    return f"{zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc):08x}"


def _checksums(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    # One thread: zlib releases the GIL, but on the 2-core machine this was measured on a
    # thread pool was no faster (bench/checkpoint_io.py); not measured on a larger machine.
    return {name: _tensor_checksum(t) for name, t in tensors.items()}


def _same_view_groups(state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """name -> every name of `state` (itself included) holding the very same view of the same
    memory: tied weights, which a state_dict lists once per name. Meta tensors have no memory."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        key = (name,) if t.is_meta else (
            t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            t.stride(), t.dtype,
        )
        groups.setdefault(key, []).append(name)
    return {name: group for group in groups.values() for name in group}


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's whole state_dict to a .safetensors file, with metadata describing each
    quantised layer so load_quantized can rebuild them.

    Tied (shared) tensors are stored once (the others are named in the metadata, as
    safetensors.torch.save_model does). Each stored tensor's CRC-32 (over its dtype, shape and
    bytes) goes into the metadata; load_quantized verifies them.

    Arguments:
        model: any nn.Module, quantised (leanops' packed layers) or not.
        path: the file to write (str or os.PathLike). It is written under a temporary name in
            the same directory and renamed when complete, so a crash never leaves a partial
            file (or a damaged previous one) under `path`.

    Raises: whatever writing the file raises (OSError, ...).
    """
    from safetensors.torch import save_file

    layers = {name: m.spec() for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    state = model.state_dict()
    aliases = {}
    for name, group in _same_view_groups(state).items():
        kept = min(group)
        if name != kept:
            aliases[name] = kept
    tensors = {
        name: t.detach().to("cpu").contiguous() for name, t in state.items() if name not in aliases
    }
    metadata = {
        **aliases,
        _FORMAT_KEY: str(FORMAT_VERSION),
        "leanops_version": __version__,
        _LAYERS_KEY: json.dumps(layers, sort_keys=True),
        _CHECKSUM_KEY: _CHECKSUM,
        _CHECKSUMS_KEY: json.dumps(_checksums(tensors), sort_keys=True),
    }
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read_checkpoint(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, every tensor on the CPU) of a safetensors file, or ValueError naming the path
    when it is not one. Only the safetensors parser reads it: nothing is ever unpickled."""
    from safetensors import safe_open

    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; load_quantized reads one .safetensors file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except OSError:
        raise
    except Exception as exc:  # safetensors' own error type differs between its versions
        with open(path, "rb") as f:
            head = f.read(4)
        what = (
            "it looks like a torch.save (pickle) file, which leanops never unpickles"
            if head.startswith(_TORCH_SAVE_MAGIC) else "it is not a valid safetensors file"
        )
        raise ValueError(
            f"{path} is not a leanops checkpoint: {what} ({exc}). leanops.load_quantized reads "
            "the .safetensors files written by leanops.save_quantized"
        ) from None
    return metadata, tensors


def _layer_specs(metadata: dict[str, str], path: str) -> dict[str, dict]:
    if _FORMAT_KEY not in metadata:
        raise ValueError(
            f"{path} carries no leanops metadata: it was not written by leanops.save_quantized"
        )
    version = metadata[_FORMAT_KEY]
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} was written in leanops format version {version} (by leanops "
            f"{metadata.get('leanops_version', '?')}); this leanops {__version__} reads version "
            f"{FORMAT_VERSION} only"
        )
    try:
        layers = json.loads(metadata[_LAYERS_KEY])
    except (KeyError, ValueError):
        layers = None
    if not isinstance(layers, dict):
        raise ValueError(
            f"{path}: the metadata entry {_LAYERS_KEY!r} is missing or not a JSON object"
        )
    return layers


def _verify_checksums(metadata: dict[str, str], tensors: dict[str, torch.Tensor], path: str) -> None:
    if _CHECKSUMS_KEY not in metadata:
        logger.info("load_quantized: %s has no checksums (written before leanops wrote them); "
                    "loading it with the format checks only", path)
        return
    if metadata.get(_CHECKSUM_KEY) != _CHECKSUM:
        raise ValueError(
            f"{path}: unknown checksum algorithm {metadata.get(_CHECKSUM_KEY)!r} (this leanops "
            f"knows {_CHECKSUM!r})"
        )
    try:
        expected = json.loads(metadata[_CHECKSUMS_KEY])
    except ValueError:
        expected = None
    if not isinstance(expected, dict) or set(expected) != set(tensors):
        raise ValueError(
            f"{path} is corrupt: its checksum list is unreadable or does not name exactly the "
            "tensors the file holds"
        )
    actual = _checksums(tensors)
    bad = sorted(name for name in tensors if actual[name] != expected[name])
    if bad:
        raise ValueError(
            f"{path} is corrupt: {len(bad)} tensor(s) differ from what was saved (checksum "
            f"mismatch): {', '.join(bad[:8])}{', ...' if len(bad) > 8 else ''}. The model was not "
            "changed; save or download the file again"
        )


def _tensors_of(name: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of `tensors` under the module `name`, keyed relative to it."""
    prefix = name + "."
    return {key[len(prefix):]: t for key, t in tensors.items() if key.startswith(prefix)}


def _plan_layers(model, layers, tensors, path) -> list[tuple[str, nn.Module, PackedLinear]]:
    """(name, the model's module, the packed layer to load into it: that module if it is already
    quantised the same way, else an empty one on the meta device) for every layer of the file,
    with every spec, shape and stored value checked; ValueError naming the first problem."""
    checks = ValueChecks()  # one pass over all value checks (CPU tensors: no GPU involved)
    plan = []
    for name, spec in sorted(layers.items()):
        if not name:
            raise ValueError("load_quantized cannot replace the model itself; pass its parent module")
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} holds a quantised layer {name!r} that the model does not have") from None
        if isinstance(current, PackedLinear):
            if current.spec() != spec:
                raise ValueError(
                    f"layer {name!r} is already quantised as {current.spec()}, but {path} holds {spec}"
                )
            target = current
        elif isinstance(current, nn.Linear):
            try:
                target = packed_linear_from_spec(spec, device="meta")
            except ValueError as exc:
                raise ValueError(f"{path}, layer {name!r}: {exc}") from None
            shape = (target.in_features, target.out_features)
            if (current.in_features, current.out_features) != shape:
                raise ValueError(
                    f"layer {name!r}: the model's nn.Linear is {current.in_features}->"
                    f"{current.out_features} but {path} holds {shape[0]}->{shape[1]}"
                )
        else:
            raise ValueError(
                f"{path} holds a quantised linear layer {name!r}, but the model's {name!r} is a "
                f"{type(current).__name__}"
            )
        try:
            target.validate_state(_tensors_of(name, tensors), prefix=name + ".", checks=checks)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        plan.append((name, current, target))
    try:
        checks.run()
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return plan


def _check_dense_keys(
    model, planned: set[str], tensors, strict: bool, path: str
) -> dict[str, torch.Tensor]:
    """The file's tensors outside the quantised layers, checked against the model's (names, and
    shapes, which torch would refuse even with strict=False); tied names are satisfied by any
    one of their names."""
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear) and name not in planned and _tensors_of(name, tensors):
            raise ValueError(
                f"the model's layer {name!r} is quantised ({module.spec()}), but {path} holds it "
                "unquantised: load the file into a model built without quantising that layer"
            )
    state = model.state_dict()
    dense = {key: t for key, t in state.items() if key.rpartition(".")[0] not in planned}
    given = {key: t for key, t in tensors.items() if key.rpartition(".")[0] not in planned}
    tied = _same_view_groups(dense)
    mismatched = [
        f"{key} {tuple(t.shape)} (the model's is {tuple(dense[key].shape)})"
        for key, t in given.items() if key in dense and tuple(t.shape) != tuple(dense[key].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{path} does not fit the model: shape mismatch for {', '.join(mismatched)}"
        )
    missing = sorted(key for key in dense if not any(alias in given for alias in tied[key]))
    unexpected = sorted(key for key in given if key not in dense)
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path} does not fit the model (strict=True): missing {missing or 'nothing'}; "
            f"unexpected {unexpected or 'nothing'}"
        )
    return {key: t for key, t in given.items() if key in dense}


def load_quantized(
    model: nn.Module, path: str | os.PathLike, strict: bool = True, verify_checksums: bool = True
) -> nn.Module:
    """Load a file written by save_quantized into `model`, all or nothing.

    Before anything in `model` changes, the whole file is read and checked: header, format
    version, checksums, every layer's spec and shapes against the model, and the stored values
    (scales positive and finite, zero points in [0, 15], 2:4 metadata codes valid; see
    PackedLinear.validate_state). So a failure leaves `model` exactly as it was. The new packed
    layers are allocated before any is swapped in: the model's memory briefly holds both.

    Arguments:
        model: a freshly built model of the same architecture, dense or already quantised the
            same way. Its nn.Linear layers that were quantised are replaced by packed layers on
            the same device, then every tensor is loaded.
        path: the .safetensors file (str or os.PathLike).
        strict: True (default): the file's tensors outside the quantised layers must match the
            model's state names exactly (tied names count once); False: extra or missing ones
            are ignored. The tensors of a quantised layer are always all required.
        verify_checksums: True (default): recompute each tensor's CRC-32 and compare it with the
            one written by save_quantized (files written before checksums existed have none and
            load without). False skips only this, for very large trusted files: the format
            checks still run. Cost: see the README ("Saving and loading").

    Returns: the model.

    Raises: ValueError naming the path and the problem (not a safetensors file, not written by
    leanops, another format version, corrupt tensors, a layer or shape that does not fit, an
    invalid value); OSError when the file cannot be read.
    """
    path = os.fspath(path)
    metadata, tensors = _read_checkpoint(path)
    layers = _layer_specs(metadata, path)
    if verify_checksums:
        _verify_checksums(metadata, tensors, path)
    plan = _plan_layers(model, layers, tensors, path)
    dense = _check_dense_keys(model, {name for name, _, _ in plan}, tensors, strict, path)

    # Everything is checked. Build the new layers off the model, then change the model.
    built = {}
    for name, current, target in plan:
        if target is not current:
            layer = target.to_empty(device=current.weight.device)
            layer.load_state_dict(_tensors_of(name, tensors))
            layer.train(current.training)
            built[name] = layer
    model.load_state_dict(dense, strict=False)
    for name, current, target in plan:
        if target is current:
            current.load_state_dict(_tensors_of(name, tensors))
        else:
            replace_module(model, name, built[name])
    return model
