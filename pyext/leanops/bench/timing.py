"""Latency measurement.

On CUDA, two library methods (no hand-rolled loops):
  eager        device events around each call with the L2 cache flushed in between, after
               warm-up: triton.testing.do_bench; median and 20/80% quantiles
  cuda graph   for small launches, where the CPU cost of launching (Python, dispatcher) would
               otherwise be measured instead of the kernel: the calls are captured into a CUDA
               graph and replayed (triton.testing.do_bench_cudagraph). The graph does not flush
               L2, so it is given a callable that rotates through enough input copies to exceed
               the L2 cache; the capture records one call per copy in turn, and each replay
               re-reads them from memory. Capture can fail (an op that synchronises, a library
               that cannot be captured): the eager figure is kept and `method` says why.
On CPU: the wall clock over repeated calls after a warm-up call. On a shared machine the
contenders of one shape are interleaved (`time_interleaved`): every round times a burst of each
in turn, so load that comes and goes hits them alike; the row reports the median and 20/80%
quantiles over all calls of all rounds, and the median CPU time of the calling thread per call
(with one thread: the time the kernel ran, whatever else the machine was doing).

Callers pass inputs drawn at random (never zeros: zeros run faster on some hardware and hide
unwritten outputs).
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

EAGER_CUDA = "cuda events, L2 flushed per call (triton.testing.do_bench)"
GRAPH_CUDA = "cuda graph replay (triton.testing.do_bench_cudagraph)"
WALL_CPU = "wall clock (CPU)"
INTERLEAVED_CPU = "wall clock (CPU), contenders interleaved"

# Auto mode replays a CUDA graph when the eager median is below this (launch overhead is then a
# large part of the figure) or when the caller marks the case small (decode sizes).
GRAPH_BELOW_MS = 0.05


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    method: str
    eager_median_ms: float | None = None  # with a graph: the eager, L2-flushed median as well
    cpu_ms: float | None = None  # CPU: median CPU time of the calling thread per call

    def as_dict(self) -> dict:
        return asdict(self)


def time_fn(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            min_calls: int = 5) -> Timing:
    """Eager timing of `fn` (see the module docstring); on a CPU at least `min_calls` calls."""
    if device.type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):
            p20, median, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
        return Timing(median, p20, p80, EAGER_CUDA)
    fn()  # warm-up (first-call allocations, lazy init)
    times, cpu = [], []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < min_calls or time.perf_counter() < deadline:
        c0, start = time.thread_time(), time.perf_counter()
        fn()
        end, c1 = time.perf_counter(), time.thread_time()
        times.append((end - start) * 1000)
        cpu.append((c1 - c0) * 1000)
    q = statistics.quantiles(times, n=10) if len(times) > 1 else times * 9
    return Timing(statistics.median(times), q[1], q[7], WALL_CPU, cpu_ms=statistics.median(cpu))


def time_interleaved(
    fns: list[Callable[[], object]],
    rounds: int = 5,
    rep_ms: float = 100,
    min_calls: int = 5,
    burst: Callable[[int], object] | None = None,
) -> list[Timing]:
    """CPU timings of `fns` measured round-robin, so that load which comes and goes hits them
    alike. Each fn has been warmed up by the caller.

    fns: the contenders, each one call with fixed inputs.
    rounds: >= 1 rounds; each times a burst of every fn in turn (default 5).
    rep_ms: time per fn over all rounds (default 100); a burst lasts rep_ms / rounds.
    min_calls: calls per fn over all rounds at least (default 5).
    burst: burst(i) -> a context manager entered around each burst of fns[i] (e.g. the forced
        leanops backend), or None.
    Returns one Timing per fn: median and 20/80% quantiles of the per-call wall clock over all
    calls, method INTERLEAVED_CPU, cpu_ms the median CPU time of the calling thread per call.
    Raises ValueError if rounds < 1.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    walls: list[list[float]] = [[] for _ in fns]
    cpus: list[list[float]] = [[] for _ in fns]
    per_burst_s = rep_ms / 1000 / rounds
    calls_min = max(1, math.ceil(min_calls / rounds))
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            ctx = burst(i) if burst is not None else contextlib.nullcontext()
            with ctx:
                deadline = time.perf_counter() + per_burst_s
                n = 0
                while n < calls_min or time.perf_counter() < deadline:
                    c0, t0 = time.thread_time(), time.perf_counter()
                    fn()
                    t1, c1 = time.perf_counter(), time.thread_time()
                    walls[i].append((t1 - t0) * 1000)
                    cpus[i].append((c1 - c0) * 1000)
                    n += 1
    out = []
    for wall, cpu in zip(walls, cpus, strict=True):
        q = statistics.quantiles(wall, n=10) if len(wall) > 1 else wall * 9
        method = f"{INTERLEAVED_CPU} over {rounds} rounds, {len(wall)} calls"
        out.append(Timing(statistics.median(wall), q[1], q[7], method, cpu_ms=statistics.median(cpu)))
    return out


def time_fn_cudagraph(fn: Callable[[], object], device: torch.device, rep_ms: float = 100) -> Timing:
    """CUDA-graph replay timing of `fn` (raises if the capture fails)."""
    from triton.testing import do_bench_cudagraph

    with torch.cuda.device(device):
        p20, median, p80 = do_bench_cudagraph(fn, rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
    return Timing(median, p20, p80, GRAPH_CUDA)


def time_case(
    fn: Callable[[], object],
    device: torch.device,
    rotating_fn: Callable[[], object] | None = None,
    rotation: int = 1,
    graph: str = "auto",
    small: bool = False,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    min_calls: int = 5,
) -> Timing:
    """The timing a benchmark row reports. `fn` calls the op on one fixed input set (eager, L2
    flushed); `rotating_fn` cycles through `rotation` input copies (what a graph captures).
    graph: "auto" (a graph when `small` or the eager median is under GRAPH_BELOW_MS), "always"
    or "never"; on a CPU there is no graph."""
    if graph not in ("auto", "always", "never"):
        raise ValueError(f"graph must be 'auto', 'always' or 'never', got {graph!r}")
    eager = time_fn(fn, device, warmup_ms, rep_ms, min_calls)
    if device.type != "cuda" or graph == "never":
        return eager
    if graph == "auto" and not (small or eager.median_ms < GRAPH_BELOW_MS):
        return eager
    try:
        replay = time_fn_cudagraph(rotating_fn or fn, device, rep_ms)
    except Exception as exc:  # capture failures come as RuntimeError, CUDA errors, ...
        _recover(device)
        return Timing(eager.median_ms, eager.p20_ms, eager.p80_ms,
                      f"{EAGER_CUDA}; CUDA-graph replay failed ({type(exc).__name__}: {_short(exc)})")
    copies = f", inputs rotated over {rotation} copies" if rotation > 1 else ""
    return Timing(replay.median_ms, replay.p20_ms, replay.p80_ms, GRAPH_CUDA + copies, eager.median_ms)


def cuda_graph_replayer(fn: Callable[[], object], device: torch.device, calls: int) -> Callable[[], None]:
    """Capture `calls` calls of `fn` into one CUDA graph; returns its replay (for energy loops
    of small launches, matching the graph timing). Raises if the capture fails."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize(device)
    return graph.replay


def graph_calls_for(median_ms: float, target_ms: float = 10.0, limit: int = 1000) -> int:
    """Calls per captured graph so that one replay lasts about `target_ms`."""
    return max(1, min(limit, math.ceil(target_ms / max(median_ms, 1e-6))))


def _recover(device: torch.device) -> None:
    try:
        torch.cuda.synchronize(device)
    except Exception:
        pass


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
