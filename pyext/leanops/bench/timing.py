"""Latency measurement. On CUDA: device events around each call with the L2 flushed in between
(triton.testing.do_bench), after warm-up; median and 20/80% quantiles. On CPU: wall clock over
repeated calls. Callers pass inputs drawn at random (never zeros: zeros run faster on some
hardware and hide unwritten outputs)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> Timing:
    if device.type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):
            p20, median, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        return Timing(median, p20, p80, "cuda events, L2 flushed per call (triton.testing.do_bench)")
    fn()  # warm-up (first-call allocations, lazy init)
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7], "wall clock (CPU)")
