"""Whole-model entry points: quantize_ (swap nn.Linear layers for quantised ones in place),
prune_ / sparsify_ (2:4 sparsity: zero weights in place, or swap in SparseLinear with the
compressed weight), and save/load of quantised models through safetensors (no pickle)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from leanops import calibration
from leanops._version import FORMAT_VERSION, __version__
from leanops.nn.packed import PackedLinear, packed_linear_from_spec
from leanops.nn.quantized import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.nn.sparse import SparseLinear
from leanops.nn.swap import FilterFn, format_unsupported, replace_module, select_linears
from leanops.nn.training import Int8TrainingLinear
from leanops.quant.config import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8TrainingConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
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
    the model; it is needed by Int8DynamicConfig(smoothquant_alpha=...).
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

    targets = select_linears(
        model, filter_fn, "quantize_", why_not=lambda name, linear: format_unsupported(linear, config)
    )

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
    for name, linear in targets.items():
        with torch.no_grad():
            pruned, mask = _prune(
                linear.weight, config.method, stats.get(name), 2, 4, config.blocksize, config.damp
            )
        new = SparseLinear.from_weight(
            pruned, linear.bias, mask=mask, group_size=group_size_for(linear),
            symmetric=True if config.quantize is None else config.quantize.symmetric,
            kernel=config.kernel,
        )
        new.train(linear.training)
        replace_module(model, name, new)
    logger.info("sparsify_: %d layer(s) made 2:4 sparse with %s", len(targets), config)
    return model


# ------------------------------------------------------------------------------ save / load

_FORMAT_KEY = "leanops_format_version"


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's whole state_dict to a .safetensors file, with metadata describing each
    quantised layer so load_quantized can rebuild them. Tied (shared) tensors are stored once.

    Arguments:
        model: any nn.Module, quantised (leanops' packed layers) or not.
        path: the file to write (str or os.PathLike), replaced if it exists.
    """
    from safetensors.torch import save_model

    layers = {name: m.spec() for name, m in model.named_modules() if isinstance(m, PackedLinear)}
    metadata = {
        _FORMAT_KEY: str(FORMAT_VERSION),
        "leanops_version": __version__,
        "leanops_layers": json.dumps(layers, sort_keys=True),
    }
    save_model(model, os.fspath(path), metadata=metadata)


def load_quantized(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load a file written by save_quantized into `model`, a freshly built model of the same
    architecture (dense, or already quantised the same way): its nn.Linear layers that were
    quantised are first replaced by empty quantised modules on the same device, then every
    tensor is loaded. Returns the model.

    Arguments:
        model: the freshly built model (its layers are swapped in place).
        path: a .safetensors file written by save_quantized.
        strict: as nn.Module.load_state_dict's: every key of the file and of the model must
            match (default True).

    Raises: ValueError if the file has no leanops metadata or another format version, or if a
    quantised layer of the file does not fit the model's layer of that name.
    """
    from safetensors import safe_open
    from safetensors.torch import load_model

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata() or {}
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
    for name, spec in json.loads(metadata["leanops_layers"]).items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} holds a quantised layer {name!r} that the model does not have") from None
        if isinstance(current, PackedLinear):
            if current.spec() != spec:
                raise ValueError(
                    f"layer {name!r} is already quantised as {current.spec()}, but {path} holds {spec}"
                )
            continue
        if not isinstance(current, nn.Linear):
            raise ValueError(
                f"{path} holds a quantised linear layer {name!r}, but the model's {name!r} is a "
                f"{type(current).__name__}"
            )
        if (current.in_features, current.out_features) != (spec["in_features"], spec["out_features"]):
            raise ValueError(
                f"layer {name!r}: the model's nn.Linear is {current.in_features}->"
                f"{current.out_features} but {path} holds {spec['in_features']}->{spec['out_features']}"
            )
        if not name:
            raise ValueError("load_quantized cannot replace the model itself; pass its parent module")
        new = packed_linear_from_spec(spec, device=current.weight.device)
        new.train(current.training)
        replace_module(model, name, new)
    load_model(model, path, strict=strict)
    return model
