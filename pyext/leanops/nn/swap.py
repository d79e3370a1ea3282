"""Finding and swapping a model's nn.Linear layers: the one home for what quantize_,
leanops.qat.prepare_ and leanops.sparsify_ share (which layers can be replaced, logging the ones
left dense with the reason, and the in-place swap)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from torch import nn

from leanops.quant import int4 as int4_format
from leanops.quant.common import FLOAT_DTYPES
from leanops.quant.config import Int4WeightOnlyConfig, QuantConfig

logger = logging.getLogger("leanops")

FilterFn = Callable[[nn.Module, str], bool]
ReasonFn = Callable[[str, nn.Linear], "str | None"]


def multihead_attention_children(model: nn.Module) -> set[str]:
    """Names of the submodules of every nn.MultiheadAttention in `model`."""
    return {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, nn.MultiheadAttention)
        for child, _ in m.named_children()
    }


def why_not_swappable(name: str, linear: nn.Linear, mha_children: set[str]) -> str | None:
    """Why `linear` cannot be replaced by a leanops layer whatever the format, or None."""
    if name in mha_children:
        return "nn.MultiheadAttention reads this projection's weight directly, not through forward()"
    if type(linear).forward is not nn.Linear.forward:
        return f"{type(linear).__name__} overrides nn.Linear.forward; replacing it would drop that behaviour"
    w = linear.weight
    if w.is_meta:
        return "its weight is on the meta device (not materialised)"
    if w.dtype not in FLOAT_DTYPES:
        return f"weight dtype {w.dtype} is not float16/bfloat16/float32"
    return None


def format_unsupported(linear: nn.Linear, config: QuantConfig) -> str | None:
    """Why the kernels of `config` cannot take `linear` (beyond the generic reasons above), or
    None: today only int4's group size, which must divide in_features. quantize_ and
    leanops.qat.prepare_ both ask it, so QAT never prepares a layer it could not convert."""
    if isinstance(config, Int4WeightOnlyConfig):
        group_size = config.group_size_for(linear.in_features)
        try:
            int4_format.check_group_size(group_size, linear.in_features)
        except ValueError as exc:
            return f"int4: {exc}"
    return None


def select_linears(
    model: nn.Module, filter_fn: FilterFn | None, caller: str, why_not: ReasonFn | None = None
) -> dict[str, nn.Linear]:
    """The nn.Linear layers of `model` that `filter_fn(module, name)` accepts (all by default)
    and that can be swapped: neither the generic reasons above nor the format's `why_not(name,
    linear)` object. Each layer left dense for a reason is logged as "<caller>: left <name>
    dense: <reason>" on the "leanops" logger; layers filter_fn rejects are the user's choice and
    are not logged."""
    mha_children = multihead_attention_children(model)
    targets: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        reason = why_not_swappable(name, module, mha_children)
        if reason is None and why_not is not None:
            reason = why_not(name, module)
        if reason is not None:
            logger.warning("%s: left %s dense: %s", caller, name, reason)
            continue
        targets[name] = module
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (dotted path, not "") of `model` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
