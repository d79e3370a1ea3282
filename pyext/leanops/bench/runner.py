"""The one benchmark runner every suite feeds: cases in, rows out.

A suite (matmul, attention, model) only describes `Case`s: what is computed (op), by whom
(provider, and the leanops backend forced while it runs), on which shape, the FLOPs and minimum
bytes of the ideal kernel, which measured ceiling bounds it, how to build random inputs and what
to call. The runner does the rest, the same way for every suite:

  warm-up call (compiles, autotunes) -> peak memory of one call (CUDA) -> timing (eager with L2
  flushed; CUDA-graph replay for small launches, rotating input copies; on a CPU with
  Settings.rounds > 1, the cases of one shape interleaved round by round, at the case's thread
  count) -> energy (meter read around >= 1 s loops, several trials, idle power subtracted) ->
  throughput, % of the measured roofline, TFLOP/J, J/token -> ratios against the dense baseline
  of the same shape.

Cases compare with the case marked `baseline=True` in their group (same family, dtype and shape),
which each suite lists first. A case that cannot run here (a forced backend that does not
support the call, an SDPA backend with no kernel for the shape, out of memory) is *skipped* with
the reason; any other exception is a *failure*: both are reported, neither silently dropped.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import leanops
from leanops.bench.energy import (
    EnergyMeter,
    EnergyResult,
    measure_energy,
    measure_idle_power,
    meter_for,
)
from leanops.bench.progress import PlainProgress, as_progress
from leanops.bench.roofline import Ceilings
from leanops.bench.timing import (
    GRAPH_CUDA,
    Timing,
    cuda_graph_replayer,
    graph_calls_for,
    time_case,
    time_interleaved,
)


@dataclass
class Case:
    suite: str  # "matmul", "attention", "model"
    op: str  # what is computed: "dense", "int4_weight_mm", "attention", "tiny-llama decode" ...
    provider: str  # who computes it: "torch:F.linear", "leanops:triton", a model variant ...
    backend: str | None  # the leanops backend forced while it runs (None: automatic choice)
    dtype: torch.dtype
    dims: dict  # the shape, e.g. {"M": 1, "K": 4096, "N": 4096}
    flops: float  # of one call (dense-equivalent for sparse kernels)
    min_bytes: float  # each input read once, the output written once
    rate: str | None  # the ceiling that bounds the arithmetic: "bf16", "fp16", "int8", None
    make_inputs: Callable[[], tuple]  # fresh random inputs (never zeros); called again to rotate
    fn: Callable[..., object]  # fn(*make_inputs()) is one call
    baseline: bool = False  # the dense baseline its group compares with
    family: str | None = None  # cases sharing (family, dtype, shape) compare; default: the suite
    small: bool = False  # launch-bound size (decode): time by CUDA-graph replay in "auto" mode
    tokens: int | None = None  # tokens per call (model level): tokens/s and J/token
    extra: dict = field(default_factory=dict)  # suite-specific row fields (errors, sizes)
    skip: str | None = None  # why it cannot run here, known before running
    skip_on: tuple = ()  # exception types that mean "cannot run this shape here" (baselines)
    threads: int | None = None  # CPU: torch.set_num_threads while it runs (None: as it is)

    @property
    def shape(self) -> str:
        return ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.dims.items())

    @property
    def group(self) -> tuple:
        return (self.family or self.suite, str(self.dtype), self.shape)

    @property
    def label(self) -> str:
        return f"{self.op} {self.provider} {self.shape}"


@dataclass
class Settings:
    energy: bool = False
    energy_trials: int = 3
    energy_seconds: float = 1.0  # per trial, at least; the meter may demand more (NVML: 1 s)
    idle_seconds: float = 2.0
    graph: str = "auto"  # CUDA-graph replay: "auto", "always", "never"
    warmup_ms: float = 25
    rep_ms: float = 100
    min_calls: int = 5  # CPU timing: at least this many calls (after a warm-up call)
    rounds: int = 1  # CPU timing: > 1 interleaves the cases of a shape over this many rounds


@dataclass
class Results:
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # {"op", "provider", "shape", "reason"}
    failed: list = field(default_factory=list)  # {"op", "provider", "shape", "error", "traceback"}

    def extend(self, other: Results) -> None:
        self.rows += other.rows
        self.skipped += other.skipped
        self.failed += other.failed


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def nbytes(obj) -> int:
    """Bytes of the tensors in `obj`: a tensor, a module (parameters and buffers), an object
    with an nbytes() method (a KV cache), or a list/tuple/dict of these."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, torch.nn.Module):
        return sum(nbytes(t) for t in itertools.chain(obj.parameters(), obj.buffers()))
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(nbytes(o) for o in obj.values())
    if callable(getattr(obj, "nbytes", None)):
        return int(obj.nbytes())
    return 0


def cannot_run(case: Case, exc: BaseException) -> bool:
    """Whether `exc` from running `case` means "cannot run here" (a skip) rather than a bug."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    if isinstance(exc, RuntimeError) and "cannot run this call" in str(exc):  # forced leanops backend
        return True
    return bool(case.skip_on) and isinstance(exc, case.skip_on)


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: " + (text if len(text) <= limit else text[: limit - 3] + "...")


class Runner:
    """Runs cases on one device with one energy meter (and one idle reading) for the session."""

    def __init__(self, device: torch.device, settings: Settings | None = None,
                 ceilings: Ceilings | None = None, progress=print, meter: EnergyMeter | None = None):
        self.device = device
        self.settings = settings or Settings()
        self.ceilings = ceilings
        self.progress: PlainProgress = as_progress(progress)
        self.meter, self.energy_reason, self.idle_w = None, None, None
        if not self.settings.energy:
            self.energy_reason = "energy not requested (pass --energy)"
        else:
            self.meter, self.energy_reason = (meter, None) if meter is not None else meter_for(device)
            if self.meter is None:
                self.progress.log(f"energy: not measured ({self.energy_reason})")
            else:
                self.idle_w = measure_idle_power(device, self.meter, self.settings.idle_seconds)
                self.progress.log(f"energy: {self.meter.source} [{self.meter.kind}]; idle power "
                                  f"{self.idle_w:.1f} W over {self.settings.idle_seconds:g} s")

    def energy_info(self) -> dict:
        return {
            "requested": self.settings.energy,
            "source": self.meter.source if self.meter else None,
            "kind": self.meter.kind if self.meter else None,
            "idle_power_w": self.idle_w,
            "reason": self.energy_reason,
        }

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()

    # ---------------------------------------------------------------------------------- run

    def run(self, cases: list[Case], title: str = "bench") -> Results:
        results = Results()
        baselines: dict[tuple, dict] = {}
        self.progress.start(len(cases), title)
        if self.device.type == "cpu" and self.settings.rounds > 1:
            for group in _consecutive_groups(cases):
                self._run_interleaved(group, results, baselines)
            return results
        for case in cases:
            if self._skipped(case, results):
                continue
            with _num_threads(case.threads):
                row, said = self._attempt(case, lambda c=case: self._measure(c), results)
            if row is None:
                continue
            self._cleanup()
            self._add_row(case, row, said, results, baselines)
        return results

    def _skipped(self, case: Case, results: Results) -> bool:
        if case.skip:
            results.skipped.append({**_where(case), "reason": case.skip})
            self.progress.advance(case.label, f"skipped: {case.skip}")
        return bool(case.skip)

    def _attempt(self, case: Case, fn: Callable[[], object], results: Results) -> tuple[object, list[str]]:
        """fn() with the case's backend forced: (its result, the warnings said), or (None, ...)
        with the case recorded as skipped or failed. Warnings say why a kernel was not used
        (SDPA) or that a slower path ran (leanops' fallback warning): they go into the skip
        reason or the row, never lost."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with leanops.use_backend(case.backend):
                    value = fn()
                error = None
            except Exception as exc:
                value, error = None, exc
        said = list(dict.fromkeys(" ".join(str(w.message).split())[:300] for w in caught))
        if error is not None:
            self._report_error(case, error, said, results)
        return value, said

    def _add_row(self, case: Case, row: dict, said: list[str], results: Results, baselines: dict) -> None:
        row["warnings"] = said
        for text in said:
            self.progress.log(f"  warning ({case.label}): {text}")
        if case.baseline:
            baselines[case.group] = row
        self._compare(row, baselines.get(case.group))
        results.rows.append(row)
        self.progress.advance(case.label, _summary(row))

    def _run_interleaved(self, group: list[Case], results: Results, baselines: dict) -> None:
        """The cases of one shape (and thread count) on a CPU: each built and warmed up, then
        timed round-robin (time_interleaved), then energy and the row, case by case."""
        def build(case):
            inputs = case.make_inputs()
            case.fn(*inputs)  # warm-up: lazy init, caches
            return inputs

        ready = []  # (case, inputs, warnings said while building)
        with _num_threads(group[0].threads):
            for case in group:
                if self._skipped(case, results):
                    continue
                inputs, said = self._attempt(case, lambda c=case: build(c), results)
                if inputs is not None:
                    ready.append((case, inputs, said))
            if not ready:
                return
            s = self.settings
            timings = time_interleaved(
                [lambda c=c, i=i: c.fn(*i) for c, i, _ in ready], s.rounds, s.rep_ms,
                s.min_calls, burst=lambda k: leanops.use_backend(ready[k][0].backend))
            for (case, inputs, said), timing in zip(ready, timings, strict=True):
                with leanops.use_backend(case.backend):
                    energy = self._energy(timing, lambda c=case, i=inputs: c.fn(*i))
                row = self._row(case, timing, energy, *self._peak_memory(case, inputs, lambda: None))
                self._add_row(case, row, said, results, baselines)

    def _report_error(self, case: Case, exc: BaseException, said: list, results: Results) -> None:
        where = _where(case)
        self._cleanup()
        if cannot_run(case, exc):
            reason = _short(exc) + (f" [warnings: {' | '.join(said[:3])}]" if said else "")
            results.skipped.append({**where, "reason": reason})
            self.progress.advance(case.label, f"skipped: {reason}")
        else:
            results.failed.append({**where, "error": _short(exc, 2000),
                                   "traceback": "".join(traceback.format_exception(exc))})
            self.progress.advance(case.label, f"FAILED: {_short(exc)}")

    def _cleanup(self) -> None:
        if self.device.type == "cuda":  # give the next case the GPU memory this one held
            gc.collect()
            torch.cuda.empty_cache()

    def _measure(self, case: Case) -> dict:
        device, s = self.device, self.settings
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        inputs = case.make_inputs()
        case.fn(*inputs)  # compile / autotune / lazy init outside every measurement
        sync()
        peak_mb, peak_reason = self._peak_memory(case, inputs, sync)

        # Input copies to rotate through where L2 is not flushed (graph replay, energy loops):
        # enough that the working set is 3x the L2 cache, so weights come from memory each call.
        copies = [inputs]
        if device.type == "cuda" and (s.energy or s.graph != "never"):
            l2 = torch.cuda.get_device_properties(device).L2_cache_size
            want = min(1024, math.ceil(3 * l2 / max(nbytes(inputs), 1)))
            copies += [case.make_inputs() for _ in range(want - 1)]
        cycle = itertools.cycle(copies)

        def rotating():
            return case.fn(*next(cycle))

        timing = time_case(lambda: case.fn(*inputs), device, rotating, len(copies), s.graph,
                           case.small, s.warmup_ms, s.rep_ms, s.min_calls)
        energy = self._energy(timing, rotating)
        return self._row(case, timing, energy, peak_mb, peak_reason)

    def _peak_memory(self, case: Case, inputs: tuple, sync) -> tuple[float | None, str | None]:
        """Bytes of the call's inputs (weights included) plus the high-water mark of what the
        call allocates, in MB (CUDA caching allocator); other resident tensors do not count."""
        if self.device.type != "cuda":
            return None, "measured on CUDA only (torch.cuda.max_memory_allocated); not tracked on CPU"
        sync()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = case.fn(*inputs)
        sync()
        transient = torch.cuda.max_memory_allocated(self.device) - before
        del out
        return (nbytes(inputs) + transient) / 1e6, None

    def _energy(self, timing: Timing, rotating: Callable[[], object]) -> EnergyResult:
        s = self.settings
        if self.meter is None:
            return EnergyResult.unavailable(self.energy_reason)
        fn, calls, loop = rotating, 1, "eager calls, rotating inputs"
        if timing.method.startswith(GRAPH_CUDA):
            # Small launches: the energy loop replays a graph as the timing did, so the meter sees
            # the kernels, not a GPU idling between Python launches.
            calls = graph_calls_for(timing.median_ms)
            try:
                fn = cuda_graph_replayer(rotating, self.device, calls)
                loop = f"cuda graph replay, {calls} calls per replay, rotating inputs"
            except Exception as exc:
                fn, calls = rotating, 1
                loop = f"eager calls, rotating inputs (CUDA-graph capture failed: {_short(exc, 120)})"
        return measure_energy(fn, self.device, self.meter, min_seconds=s.energy_seconds,
                              trials=s.energy_trials, idle_power_w=self.idle_w,
                              calls_per_fn=calls, loop=loop)

    def _row(self, case: Case, timing: Timing, energy: EnergyResult, peak_mb, peak_reason) -> dict:
        seconds = timing.median_ms * 1e-3
        row = {
            "suite": case.suite,
            "op": case.op,
            "provider": case.provider,
            "backend": case.backend,
            "family": case.family or case.suite,
            "dtype": _dtype_name(case.dtype),
            "shape": case.shape,
            **case.dims,
            "median_ms": timing.median_ms,
            "p20_ms": timing.p20_ms,
            "p80_ms": timing.p80_ms,
            "timing_method": timing.method,
            "eager_median_ms": timing.eager_median_ms,
            "cpu_ms": timing.cpu_ms,
            "threads": case.threads,
            "flops": case.flops,
            "min_bytes": case.min_bytes,
            "tflops": case.flops / seconds / 1e12,
            "gbps": case.min_bytes / seconds / 1e9,
            "roofline_rate": case.rate,
            "roofline_ms": None,
            "pct_of_roofline": None,
            "roofline_reason": None,
            "peak_mem_mb": peak_mb,
            "peak_mem_reason": peak_reason,
        }
        roof = self.ceilings.roofline_ms(case.flops, case.min_bytes, case.rate) if self.ceilings and case.rate else None
        if roof is not None:
            row["roofline_ms"] = roof
            row["pct_of_roofline"] = 100.0 * roof / timing.median_ms
        else:
            row["roofline_reason"] = (
                "no measured ceilings on this device (GPU only)" if self.ceilings is None
                else f"no measured ceiling for rate {case.rate!r}"
            )
        if case.tokens:
            row["tokens"] = case.tokens
            row["tokens_per_s"] = case.tokens / seconds
        row.update({f"energy_{k}": v for k, v in energy.as_dict().items()})
        j, dj = energy.joules_per_call, energy.dynamic_joules_per_call
        row["tflop_per_joule"] = case.flops / j / 1e12 if j else None
        row["dynamic_tflop_per_joule"] = case.flops / dj / 1e12 if dj else None
        if case.tokens:
            row["energy_joules_per_token"] = j / case.tokens if j is not None else None
        row.update(case.extra)
        return row

    @staticmethod
    def _compare(row: dict, base: dict | None) -> None:
        """Ratios against the dense baseline measured in the same run (None without one)."""
        row["baseline"] = base["provider"] if base else None
        row["speedup_vs_dense"] = base["median_ms"] / row["median_ms"] if base else None
        cpu, base_cpu = row.get("cpu_ms"), (base or {}).get("cpu_ms")
        row["cpu_speedup_vs_dense"] = base_cpu / cpu if cpu and base_cpu else None
        bj, j = (base or {}).get("energy_joules_per_call"), row.get("energy_joules_per_call")
        row["energy_gain_vs_dense"] = bj / j if bj and j else None


def _summary(row: dict) -> str:
    us = row["median_ms"] * 1e3
    parts = [f"{us:10.1f} us" if us < 1e5 else f"{row['median_ms']:10.1f} ms"]
    if row.get("speedup_vs_dense") is not None:
        parts.append(f"x{row['speedup_vs_dense']:.2f} vs dense")
    if row.get("pct_of_roofline") is not None:
        parts.append(f"{row['pct_of_roofline']:.0f}% of roofline")
    if row.get("energy_joules_per_call") is not None:
        parts.append(f"{row['energy_joules_per_call']:.3g} J/call")
    if row["timing_method"].startswith(GRAPH_CUDA):
        parts.append("graph")
    return ", ".join(parts)


def _where(case: Case) -> dict:
    return {"suite": case.suite, "op": case.op, "provider": case.provider,
            "dtype": _dtype_name(case.dtype), "shape": case.shape}


def _consecutive_groups(cases: list[Case]) -> list[list[Case]]:
    """Runs of consecutive cases that compare with each other (same group and thread count)."""
    groups: list[list[Case]] = []
    for case in cases:
        if groups and (groups[-1][0].group, groups[-1][0].threads) == (case.group, case.threads):
            groups[-1].append(case)
        else:
            groups.append([case])
    return groups


@contextlib.contextmanager
def _num_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` inside the block (None: unchanged)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_cases(cases: list[Case], device: torch.device, settings: Settings | None = None,
              ceilings: Ceilings | None = None, progress=print, title: str = "bench") -> Results:
    """One-shot: a Runner for `device`, run `cases`, close the meter."""
    runner = Runner(device, settings, ceilings, progress)
    try:
        return runner.run(cases, title)
    finally:
        runner.close()
