"""Statistics of linear layers' inputs, gathered by forward pre-hooks while a user's callable
runs sample inputs through the model: the one home for calibration hooks.

    stats = collect_input_statistics(model, {"layers.0.mlp.up_proj": layer, ...},
                                     calibrate=lambda m: m(sample_batch), update=sum_of_squares,
                                     purpose="Wanda")

`update(x2d, previous)` folds one call's input (fp32 [tokens, in_features]) into the running
statistic. The statistics used in leanops:
  amax            SmoothQuant: max |x_j| per input channel
  sum_of_squares  Wanda: sum over tokens of x_j^2 per input channel (||X_j||^2)
  gram            SparseGPT: X^T X [in, in] and the token count (its Hessian, up to a factor)
  collect_grams   GPTQ / AWQ: the same, shared by layers that read one input, with the order in
                  which those sets of layers run (for GPTQ's sequential mode)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def collect_input_statistics(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibrate: Callable[[nn.Module], object],
    update: Callable[[torch.Tensor, object], object],
    purpose: str,
) -> dict[str, object]:
    """Run `calibrate(model)` with forward pre-hooks on `layers`; return name -> statistic.

    Raises ValueError if an input holds NaN/Inf or if calibrate never ran one of the layers
    (`purpose` names the algorithm in the message). Hooks are removed even if calibrate raises.
    """
    stats: dict[str, object] = {}

    def record(name, x2d, x):
        stats[name] = update(x2d, stats.get(name))

    _run_with_hooks(model, layers, calibrate, record, purpose)
    return stats


def _run_with_hooks(model, layers, calibrate, record, purpose) -> None:
    """Run calibrate(model) with forward pre-hooks calling record(name, x2d, x) for every input
    x (x2d: x detached, as [tokens, in_features]); the checks of collect_input_statistics."""
    seen = set()

    def hook(name):
        def pre(module, args):
            x = args[0].detach()
            x2d = x.reshape(-1, x.shape[-1])
            if not bool(torch.isfinite(x2d).all()):
                raise ValueError(f"calibration input to {name!r} contains NaN or Inf")
            seen.add(name)
            record(name, x2d, args[0])

        return pre

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        calibrate(model)
    finally:
        for h in handles:
            h.remove()
    missing = sorted(set(layers) - seen)
    if missing:
        raise ValueError(
            f"calibrate(model) never ran these layers, so {purpose} cannot calibrate them: {missing}"
        )


# Pending rows per stage before they are folded into its Gram (4 M fp32 values, 16 MB).
_FLUSH_ELEMENTS = 1 << 22


@torch.no_grad()
def collect_grams(
    model: nn.Module,
    layers: dict[str, nn.Module],
    calibrate: Callable[[nn.Module], object],
    purpose: str,
    first_stage_only: bool = False,
) -> tuple[dict[str, tuple[torch.Tensor, int]], list[list[str]]]:
    """Run `calibrate(model)` once and return (name -> (X^T X fp32 [in, in], tokens T), stages).

    stages: the layers grouped by the input they read, in the order they first run: layers
    called one after the other on the very same tensor (q, k and v after one norm; gate and up)
    form one stage and share one Gram (the same tuple; computed once per call). A layer that
    once reads a tensor its predecessor did not is a stage of its own. first_stage_only: keep
    the Grams of the first stage only (the others are still timed to find the stages), for
    GPTQ's sequential mode, whose later stages must see the outputs of the quantised earlier
    ones. Raises ValueError as collect_input_statistics does.
    """
    stages: list[list[str]] = []
    stage_of: dict[str, int] = {}
    acc: dict[int, list] = {}  # stage -> [X^T X, tokens, pending rows, pending count]
    last = {"x": None, "stage": None}

    def flush(entry):
        # Rows are gathered and multiplied in one GEMM: a call's few tokens (one sentence) would
        # otherwise each re-read and re-write the whole K x K accumulator.
        if entry[2]:
            x = torch.cat(entry[2])
            entry[0].addmm_(x.t(), x)
            entry[2], entry[3] = [], 0

    def record(name, x2d, x):
        if name not in stage_of:
            if stages and x is last["x"] and last["stage"] == len(stages) - 1:
                stages[-1].append(name)
            else:
                stages.append([name])
            stage_of[name] = len(stages) - 1
        stage = stage_of[name]
        if x is last["x"] and stage == last["stage"]:
            return  # a sibling already counted this very tensor
        last["x"], last["stage"] = x, stage
        if first_stage_only and stage != 0:
            return
        x32 = x2d.float()
        k = x32.shape[1]
        if stage not in acc:
            acc[stage] = [torch.zeros(k, k, device=x32.device), 0, [], 0]
        entry = acc[stage]
        entry[1] += x32.shape[0]
        entry[2].append(x32 if x32 is not x2d else x32.clone())
        entry[3] += x32.shape[0]
        if entry[3] * k >= _FLUSH_ELEMENTS:
            flush(entry)

    _run_with_hooks(model, layers, calibrate, record, purpose)
    grams = {}
    for stage, entry in acc.items():
        flush(entry)
        shared = (entry[0], entry[1])
        for name in stages[stage]:
            grams[name] = shared
    return grams, stages


def amax(x2d: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """max |x_j| over tokens, fp32 [in]."""
    cur = x2d.abs().amax(dim=0).float()
    return cur if previous is None else torch.maximum(previous, cur)


def sum_of_squares(x2d: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """sum over tokens of x_j^2, fp32 [in] (||X_j||_2^2 over every calibration token)."""
    cur = x2d.float().pow(2).sum(dim=0)
    return cur if previous is None else previous + cur


def gram(x2d: torch.Tensor, previous: tuple[torch.Tensor, int] | None) -> tuple[torch.Tensor, int]:
    """(X^T X fp32 [in, in], number of tokens) accumulated over calls."""
    x = x2d.float()
    cur = x.t() @ x
    if previous is None:
        return cur, x.shape[0]
    return previous[0] + cur, previous[1] + x.shape[0]
