"""Energy per call from a hardware counter, never an estimate.

NVML's total-energy counter (mJ since driver load, updated about every 100 ms) is read around a
loop of calls lasting at least `min_seconds`, over several trials; idle power is read first over
a quiet interval and subtracted for the "dynamic" figure. Where no counter can be read, every
number is None and `reason` says why.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class EnergyResult:
    joules_per_call: float | None
    dynamic_joules_per_call: float | None
    avg_power_w: float | None
    idle_power_w: float | None
    source: str | None
    reason: str | None = None
    calls_per_trial: int | None = None
    trials: int | None = None
    temperature_c: float | None = None
    sm_clock_mhz: float | None = None

    @classmethod
    def unavailable(cls, reason: str) -> EnergyResult:
        return cls(None, None, None, None, None, reason)

    def as_dict(self) -> dict:
        return asdict(self)


class NvmlEnergyMeter:
    """The GPU's total-energy counter through nvidia-ml-py (pynvml)."""

    source = "nvml total energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ)"

    def __init__(self, device: torch.device, nvml=None):
        self.reason = None
        self._nvml = nvml
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            # NVML numbers GPUs its own way; torch maps a CUDA index to it (CUDA_VISIBLE_DEVICES
            # and CUDA_DEVICE_ORDER included) so we never read another GPU's counter.
            try:
                nvml_index = torch.cuda._get_nvml_device_index(index)
            except Exception:
                nvml_index = index
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(nvml_index)
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install 'leanops[bench]')"
        except Exception as exc:  # NVMLError_NotSupported, NoPermission, driver missing ...
            self.reason = f"NVML energy counter not readable: {type(exc).__name__}: {exc}"

    def read_joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0

    def conditions(self) -> dict:
        out = {}
        try:
            out["temperature_c"] = float(self._nvml.nvmlDeviceGetTemperature(self._handle, 0))
            out["sm_clock_mhz"] = float(self._nvml.nvmlDeviceGetClockInfo(self._handle, 1))
        except Exception:
            pass
        return out


def meter_for(device: torch.device):
    """The energy meter for `device`, or None and the reason there is none."""
    if device.type == "cuda":
        meter = NvmlEnergyMeter(device)
        return (None, meter.reason) if meter.reason else (meter, None)
    return None, f"no energy meter for {device.type} tensors in this version (RAPL support is planned)"


def measure_idle_power(device: torch.device, meter, seconds: float = 1.0) -> float:
    """Average power (W) over `seconds` with nothing running (after a synchronize)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    e0, t0 = meter.read_joules(), time.perf_counter()
    time.sleep(seconds)
    return (meter.read_joules() - e0) / (time.perf_counter() - t0)


def measure_energy(
    fn: Callable[[], object],
    device: torch.device,
    meter=None,
    min_seconds: float = 1.0,
    trials: int = 3,
    idle_power_w: float | None = None,
) -> EnergyResult:
    """Energy of one call of `fn`: median over `trials` loops of at least `min_seconds` each.
    Pass `idle_power_w` (from measure_idle_power) to share one idle reading across many cases."""
    if meter is None:
        meter, reason = meter_for(device)
        if meter is None:
            return EnergyResult.unavailable(reason)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    idle_w = measure_idle_power(device, meter) if idle_power_w is None else idle_power_w

    # Calls per trial so that each trial lasts at least min_seconds (the counter's ~100 ms update
    # period is then at most ~10% of a trial).
    fn()
    sync()
    start = time.perf_counter()
    probe = 0
    while probe < 3 or time.perf_counter() - start < 0.05:
        fn()
        probe += 1
    sync()
    per_call = (time.perf_counter() - start) / probe
    calls = max(1, math.ceil(min_seconds / per_call))

    joules, watts, seconds = [], [], []
    for _ in range(trials):
        sync()
        e0, t0 = meter.read_joules(), time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        e1, t1 = meter.read_joules(), time.perf_counter()
        joules.append((e1 - e0) / calls)
        watts.append((e1 - e0) / (t1 - t0))
        seconds.append((t1 - t0) / calls)
    j, w, s = statistics.median(joules), statistics.median(watts), statistics.median(seconds)
    return EnergyResult(
        joules_per_call=j,
        dynamic_joules_per_call=max(0.0, (w - idle_w) * s),
        avg_power_w=w,
        idle_power_w=idle_w,
        source=meter.source,
        calls_per_trial=calls,
        trials=trials,
        **meter.conditions(),
    )
