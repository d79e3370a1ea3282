"""Quantisation-aware training: prepare_ swaps nn.Linear layers for QATLinear (fake quantisation
of an inference format, straight-through gradients), convert_ swaps them for the real quantised
layers, whose forward then equals the trained one to rounding."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from leanops.nn.qat import QAT_CONFIGS, QATLinear
from leanops.nn.swap import FilterFn, format_unsupported, replace_module, select_linears
from leanops.quant.config import Int8DynamicConfig, QuantConfig
from leanops.quant.smoothquant import collect_activation_amax, smoothing_factors

logger = logging.getLogger("leanops")


def prepare_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: FilterFn | None = None,
    *,
    learnable_scales: bool = False,
    calibrate: Callable[[nn.Module], object] | None = None,
) -> nn.Module:
    """Replace, in place, every nn.Linear that `filter_fn(module, name)` accepts (all by
    default) with a QATLinear training the format of `config`; return the model.

    config: Int8DynamicConfig (int8 weights and per-token int8 activations; with
        smoothquant_alpha, `calibrate` is needed and the SmoothQuant factors are fixed now),
        Int8WeightOnlyConfig, or Int4WeightOnlyConfig(group_size, symmetric).
    learnable_scales: train the weight scales too (LSQ), starting from the RTN ones; otherwise
        the scales follow the weight's range at every step, as RTN would set them.
    The layers keep their weight and bias Parameters (an optimizer built before still works) and
    their state_dict keys (plus `weight_scale` when learnable). Layers that quantize_ would
    leave dense (a group size that does not divide in_features, ...) are left dense here too,
    with the reason logged on the "leanops" logger.
    """
    if not isinstance(config, QAT_CONFIGS):
        raise TypeError(
            "leanops.qat.prepare_: config must be Int8DynamicConfig(), Int8WeightOnlyConfig() or "
            f"Int4WeightOnlyConfig(...), got {type(config).__name__}"
        )
    if getattr(config, "algorithm", "rtn") != "rtn":
        raise ValueError(
            f"leanops.qat.prepare_ trains the weights from RTN's grid; algorithm="
            f"{config.algorithm!r} is a post-training method (quantize_); leave algorithm='rtn'"
        )
    if isinstance(model, nn.Linear):
        raise ValueError(
            "prepare_ swaps layers inside a model; for a single nn.Linear use "
            "leanops.qat.QATLinear.from_linear(layer, config)"
        )
    smoothquant = isinstance(config, Int8DynamicConfig) and config.smoothquant_alpha is not None
    if smoothquant and calibrate is None:
        raise ValueError(
            "Int8DynamicConfig(smoothquant_alpha=...) needs calibrate=, a callable that runs "
            "sample inputs through the model, e.g. calibrate=lambda m: m(sample_batch)"
        )
    for name, module in model.named_modules():
        if isinstance(module, QATLinear) and (filter_fn is None or filter_fn(module, name)):
            raise ValueError(
                f"prepare_: {name!r} is already a QATLinear; convert_ it first or leave it out "
                "with filter_fn"
            )
    targets = select_linears(
        model, filter_fn, "qat.prepare_", why_not=lambda name, linear: format_unsupported(linear, config)
    )

    act_amax = collect_activation_amax(model, targets, calibrate) if smoothquant else {}
    for name, linear in targets.items():
        smoothing = None
        if smoothquant:
            smoothing = smoothing_factors(act_amax[name], linear.weight, config.smoothquant_alpha)
        replace_module(model, name, QATLinear.from_linear(linear, config, learnable_scales, smoothing))
    logger.info("qat.prepare_: %d layer(s) prepared for %s", len(targets), config)
    return model


def convert_(model: nn.Module, *, sparse_24: bool = False) -> nn.Module:
    """Replace, in place, every QATLinear with the real quantised layer of its format
    (Int8Linear, Int8WeightOnlyLinear or Int4WeightOnlyLinear) holding the codes and scales its
    forward used; return the model. A parametrization on the weight (e.g. a 2:4 SparseMask) is
    applied: the layer is converted from the weight its forward saw.

    sparse_24=True: int4 layers whose weight is 2:4 sparse (after sparse training, e.g.
    leanops.sparsity.enable_sparse_training then finalize_sparse_training) become 2:4 + int4
    SparseLinear layers with the same dequantised weight; the others get their dense format and
    the reason is logged.
    """
    if isinstance(model, QATLinear):
        raise ValueError("convert_ swaps layers inside a model; for one layer use layer.convert()")
    names = [name for name, m in model.named_modules() if isinstance(m, QATLinear)]
    for name in names:
        layer = model.get_submodule(name)
        sparse = sparse_24
        if sparse_24:
            reason = layer.why_not_sparse_24()
            if reason is not None:
                logger.warning("qat.convert_: %s stays dense (not 2:4): %s", name, reason)
                sparse = False
        replace_module(model, name, layer.convert(sparse_24=sparse))
    logger.info("qat.convert_: %d layer(s) converted", len(names))
    return model
