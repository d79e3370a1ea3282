"""Model-level sparsity: prune_ (zero weights in place, layers stay nn.Linear) and sparsify_
(prune and swap in SparseLinear with the compressed weight)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from leanops import calibration
from leanops.nn.sparse import SparseLinear
from leanops.nn.swap import FilterFn, replace_module, select_linears
from leanops.quant.gptq import Int4ColumnQuantizer
from leanops.quant.grid import hessian_blocks
from leanops.sparsity import format as sparse_format
from leanops.sparsity import pruning
from leanops.sparsity.config import SemiSparseConfig
from leanops.sparsity.masks import check_nm

logger = logging.getLogger("leanops")


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
    compressing with sparsify_. method: "magnitude", "wanda" or "sparsegpt" (the last two need
    calibrate). Layers whose in_features is not a multiple of m, or whose weight is shared with
    another module (tied), are left alone and logged.
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
