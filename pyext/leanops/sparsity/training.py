"""Sparse fine-tuning: keep nn.Linear weights N:M sparse while training, to recover the accuracy
one-shot pruning lost (or to learn the masks, with SR-STE).

    names = enable_sparse_training(model)                  # fixed masks from the pruned weights
    ... train as usual (any optimizer, torch.compile) ...
    finalize_sparse_training(model)                        # plain nn.Linear, weights exactly 2:4
    leanops.sparsify_(model, leanops.SemiSparseConfig())   # compress: magnitude keeps the nonzeros

Both modes are a torch.nn.utils.parametrize parametrization (SparseMask) on the weight, so the
module, its state_dict and the optimizer see an ordinary parameter (the dense `original`) and
the forward sees the masked weight:

  fixed mask   W_eff = W * mask. The gradient reaching W is grad * mask: pruned entries get none
               and are zero from the start, so the mask is exactly what it was.
  SR-STE       Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks
               From Scratch": the mask is recomputed from |W| at every forward (the top n of every
               m), the gradient is straight-through (dense: pruned weights keep learning and can
               come back) plus a decay on the pruned ones, grad_W = grad + decay * (1 - mask) * W,
               which damps the mask flipping that plain STE suffers from.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from leanops.sparsity.masks import check_nm, nm_mask, nm_mask_unchecked

logger = logging.getLogger("leanops")


class _SRSTE(torch.autograd.Function):
    """Forward: w where mask else 0. Backward: straight through, plus decay * w off the mask."""

    @staticmethod
    def forward(w, mask, decay):
        return torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device))

    @staticmethod
    def setup_context(ctx, inputs, output):
        w, mask, decay = inputs
        ctx.save_for_backward(w, mask)
        ctx.decay = decay

    @staticmethod
    def backward(ctx, grad):
        w, mask = ctx.saved_tensors
        if ctx.decay == 0:
            return grad, None, None
        return grad + ctx.decay * torch.where(mask, torch.zeros_like(w), w), None, None


class SparseMask(nn.Module):
    """Parametrization keeping a weight [out, in] N:M sparse along its inputs.

    mask: bool [out, in] for a fixed mask (at most n True per group of m), or None for SR-STE's
    dynamic mask (top n of every m by |W|, recomputed every forward) with `decay` on the pruned
    weights' gradient (decay = 0: plain straight-through estimator).
    """

    def __init__(self, mask: torch.Tensor | None = None, n: int = 2, m: int = 4, decay: float = 0.0):
        super().__init__()
        check_nm(n, m)
        if not (isinstance(decay, (int, float)) and decay >= 0):
            raise ValueError(f"decay must be a number >= 0, got {decay!r}")
        self.n, self.m, self.decay = n, m, float(decay)
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                raise ValueError("mask must be a 2-D bool Tensor [out_features, in_features]")
            if mask.shape[1] % m or bool((mask.reshape(mask.shape[0], -1, m).sum(-1) > n).any()):
                raise ValueError(f"mask must keep at most {n} of every {m} consecutive inputs")
            self.register_buffer("mask", mask.clone())
        else:
            self.mask = None

    @property
    def dynamic(self) -> bool:
        return self.mask is None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device))
        mask = nm_mask_unchecked(w.detach().abs(), self.n, self.m)
        return _SRSTE.apply(w, mask, self.decay)

    def extra_repr(self) -> str:
        kind = "fixed" if self.mask is not None else f"sr_ste(decay={self.decay:g})"
        return f"{self.n}:{self.m}, {kind}"


def enable_sparse_training(
    model: nn.Module,
    *,
    sr_ste: bool = False,
    decay: float = 2e-4,
    n: int = 2,
    m: int = 4,
    masks: dict[str, torch.Tensor] | None = None,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> list[str]:
    """Register a SparseMask on the weight of every nn.Linear that filter_fn(module, name)
    accepts (all by default); return the names of those layers.

    sr_ste=False: fixed masks: masks[name] where given (e.g. from leanops.prune_), else
    the N:M magnitude mask of the current weight (for a pruned weight: its nonzero pattern).
    Pruned entries are zeroed now. sr_ste=True: dynamic masks with SR-STE gradients (`decay`).
    Layers whose in_features is not a multiple of m are skipped and logged.
    """
    check_nm(n, m)
    masks = masks or {}
    done = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (filter_fn is not None and not filter_fn(module, name)):
            continue
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, SparseMask) for p in module.parametrizations.weight
        ):
            raise ValueError(f"{name!r} already has a SparseMask; finalize_sparse_training first")
        if module.in_features % m:
            logger.warning(
                "enable_sparse_training: left %s dense: in_features (K=%d) is not a multiple of m=%d",
                name, module.in_features, m,
            )
            continue
        if sr_ste:
            param = SparseMask(None, n, m, decay)
        else:
            mask = masks.get(name)
            if mask is None:
                mask = nm_mask(module.weight.detach().abs(), n, m)
            param = SparseMask(mask.to(module.weight.device), n, m)
            with torch.no_grad():
                module.weight.mul_(param.mask)
        parametrize.register_parametrization(module, "weight", param)
        done.append(name)
    return done


def finalize_sparse_training(model: nn.Module) -> list[str]:
    """Remove every SparseMask, leaving plain nn.Linear layers whose weights are the masked ones
    (exactly N:M); return the layer names."""
    done = []
    for name, module in list(model.named_modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        plist = module.parametrizations.weight
        if not any(isinstance(p, SparseMask) for p in plist):
            continue
        if len(plist) != 1:
            raise ValueError(
                f"{name!r}.weight has other parametrizations besides SparseMask; remove them first"
            )
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        done.append(name)
    return done
