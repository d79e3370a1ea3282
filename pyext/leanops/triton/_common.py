"""Pieces every Triton kernel family in leanops shares: the one home for them.

- environment: interpreter detection, the CUDA device guard, the fp32 dot precision, launch
  options, device limits
- autotuning: config helpers, a `keep()`-filtered `triton.autotune` wrapper, the shape buckets
  tuning is keyed on, and the one rule for the config a launcher uses instead of the autotuner's
  (`launch_config`, `closest_config`)

The matmul families' shared skeleton (config spaces, jit helpers, launcher body) is in
leanops.triton._matmul. Nothing here imports the layers above (ops/, nn/): kernels never know who
calls them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from collections.abc import Callable

import torch
import triton

from leanops._env import triton_interpreter_active

# ---------------------------------------------------------------------------------------------
# Environment


# True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1): no autotuning there.
interpreter = triton_interpreter_active


def device_guard(t: torch.Tensor):
    """Make t's GPU current for the launch: Triton launches on the current device's current
    stream, so without this a tensor on cuda:1 would be read by a kernel running on cuda:0."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands of `dtype`. For fp32 it follows PyTorch's global
    switch so that the Triton path and a torch.matmul reference make the same speed/accuracy
    trade: "highest" -> exact fp32 products ("ieee"); "high"/"medium" -> TF32 tensor cores.
    16-bit operands always use the tensor cores ("tf32" is ignored for them, while "ieee" could
    steer the compiler off the MMA path)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# Launch option for every kernel here: no fp contraction. Triton fuses a*b + c into one FMA by
# default, which rounds once where the reference (and PyTorch's elementwise ops) round twice;
# the epilogues are a handful of flops per output, so exactness costs nothing measurable.
LAUNCH_OPTIONS = {"enable_fp_fusion": False}

# The GPU the config spaces were written for: H100 SXM (132 SMs, 227 KiB shared memory per
# block). Used for the interpreter and for unit tests of the config rules, never to launch.
NOMINAL_SMS = 132
NOMINAL_SMEM = 227 * 1024


@functools.cache
def _cuda_limits(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.multi_processor_count, smem


def device_limits(device: torch.device) -> tuple[int, int]:
    """(SM count, shared memory bytes per block) of `device`; nominal H100 values off-GPU."""
    if device.type != "cuda":
        return NOMINAL_SMS, NOMINAL_SMEM
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_limits(index)


# ---------------------------------------------------------------------------------------------
# Autotuning


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# The tuned config depends on M through its order of magnitude only: M is keyed as the next power
# of two, capped where the best tile stops changing, so a serving loop with ever-changing batch
# sizes tunes once per bucket instead of once per M.
M_BUCKET_CAP = 4096


def m_bucket(m: int) -> int:
    return min(next_power_of_2(m), M_BUCKET_CAP)


# The attention kernels key their tuning on the query and key lengths the same way.
SEQ_BUCKET_CAP = 16384


def seq_bucket(n: int) -> int:
    return min(next_power_of_2(max(int(n), 1)), SEQ_BUCKET_CAP)


# cache_results (autotune results written to Triton's cache dir, so a cold start does not
# re-tune) exists in the Triton we target on GPUs (3.6) and here (3.8); ask instead of assuming.
_AUTOTUNE_KWARGS = (
    {"cache_results": True}
    if "cache_results" in inspect.signature(triton.autotune).parameters
    else {}
)


def autotune(configs: list, key: list[str], keep: Callable[[triton.Config, dict], bool]):
    """`triton.autotune` over `configs`, keeping for each call only those `keep(config, args)`
    accepts (args: the kernel's arguments by name). keep() must depend only on the `key` values
    (and tensor dtypes, which triton.autotune adds to the key itself): the winner is cached per
    key. If keep() rejects everything (an unusually small GPU), the config with the smallest
    tiles among those keep() calls valid when asked for hard constraints only (args carries
    "_hard_only": True) is used, never an empty set.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if keep(c, args)]
        if kept:
            return kept
        valid = [c for c in configs if keep(c, {**args, "_hard_only": True})]
        if not valid:
            raise RuntimeError("leanops.triton: no kernel config is valid for this call")
        return [min(valid, key=tile_elements)]

    return triton.autotune(
        configs=configs,
        key=key,
        prune_configs_by={"early_config_prune": prune},
        **_AUTOTUNE_KWARGS,
    )


def autotune_enabled() -> bool:
    """LEANOPS_TRITON_AUTOTUNE=0 replaces the search by `default_config`'s pick: one compile per
    shape instead of one per candidate (test sweeps, reproducible cold starts)."""
    return os.environ.get("LEANOPS_TRITON_AUTOTUNE", "1") not in ("0", "")


def launch_config(cfg: triton.Config | None, interpreter_cfg: triton.Config,
                  default: Callable[[], triton.Config]) -> triton.Config | None:
    """The config a launcher runs with, the same rule for every kernel family: `cfg` when the
    caller forces one (tests); under the interpreter the family's fixed `interpreter_cfg`; with
    autotuning off (LEANOPS_TRITON_AUTOTUNE=0) `default()`; otherwise None, and the autotuner
    picks among the configs keep() admits."""
    if cfg is not None:
        return cfg
    if interpreter():
        return interpreter_cfg
    if not autotune_enabled():
        return default()
    return None


def closest_config(configs: list, target: dict[str, int], stages: int) -> triton.Config:
    """The default config of a family without autotuning: among `configs` (those keep() admits for
    the call), the one closest to a middle-of-the-road tile: the sum over `target`'s BLOCK_*
    sizes of |log2(size / target)|, plus 1 when num_stages is not `stages`. Ties go to the
    earlier config."""

    def dist(c):
        return (sum(abs(math.log2(c.kwargs[k] / v)) for k, v in target.items())
                + (c.num_stages != stages))

    return min(configs, key=dist)


def config(num_warps: int = 4, num_stages: int = 3, **kwargs) -> triton.Config:
    return triton.Config(dict(kwargs), num_warps=num_warps, num_stages=num_stages)


def config_kwargs(cfg: triton.Config) -> dict:
    """A config's meta-parameters and launch options, for launching the kernel with it directly."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def tile_elements(cfg: triton.Config) -> int:
    """Product of a config's BLOCK_* sizes: the smallest one is the safest fallback (least shared
    memory and registers) for any kernel family, matmul or not."""
    return math.prod(v for k, v in cfg.kwargs.items() if k.startswith("BLOCK_"))
