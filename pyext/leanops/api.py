"""Whole-model entry points: quantize_ (swap nn.Linear layers in place) and save/load of
quantised models through safetensors (no pickle)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable

from torch import nn

from leanops import ptq
from leanops._version import FORMAT_VERSION, __version__
from leanops.nn.packed import PackedLinear, packed_linear_from_spec
from leanops.nn.quantized import Int4WeightOnlyLinear, Int8Linear, Int8WeightOnlyLinear
from leanops.nn.swap import FilterFn, replace_module, select_linears
from leanops.quant import int4 as int4_format
from leanops.quant.config import (
    Int4WeightOnlyConfig,
    Int8DynamicConfig,
    Int8TrainingConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
)
from leanops.quant.smoothquant import collect_activation_amax, smoothing_factors
from leanops.training.linear import Int8TrainingLinear

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

def format_unsupported(linear: nn.Linear, config: QuantConfig) -> str | None:
    """Why the kernels of `config` cannot take `linear` (beyond the generic reasons of
    leanops.nn.swap), or None: today only int4's group size, which must divide in_features."""
    if isinstance(config, Int4WeightOnlyConfig):
        group_size = config.group_size_for(linear.in_features)
        try:
            int4_format.check_group_size(group_size, linear.in_features)
        except ValueError as exc:
            return f"int4: {exc}"
    return None


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

    calibrated = getattr(config, "algorithm", "rtn") != "rtn"
    if calibrated and config.needs_calibration and calibrate is None:
        raise ValueError(
            f"algorithm={config.algorithm!r} needs calibrate=, a callable that runs sample "
            "inputs through the model, e.g. calibrate=lambda m: m(sample_batch)"
        )

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


# ------------------------------------------------------------------------------ save / load

_FORMAT_KEY = "leanops_format_version"


def save_quantized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's whole state_dict to a .safetensors file, with metadata describing each
    quantised layer so load_quantized can rebuild them. Tied (shared) tensors are stored once."""
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
    tensor is loaded. Returns the model."""
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
