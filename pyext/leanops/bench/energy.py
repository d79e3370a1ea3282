"""Energy per call, read from a hardware meter: never an estimate.

One interface, `EnergyMeter` (read_joules / source / kind / conditions), with three backends:

  NvmlEnergyMeter      the GPU's total-energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ
                       since the driver loaded, updated about every 100 ms): kind "counter"
  NvmlPowerMeter       where that counter is not supported (pre-Volta GPUs, some vGPUs): the
                       board power reading (nvmlDeviceGetPowerUsage, mW) sampled by a thread and
                       integrated over time: kind "integrated power", coarser, and named as such
  RaplEnergyMeter      the CPU's RAPL package counters through Linux powercap
                       (/sys/class/powercap/intel-rapl:N/energy_uj, µJ, wrapping at
                       max_energy_range_uj): kind "counter"

`meter_for(device)` picks one; where none can be read it returns None and the reason, and every
energy field of a result is then None with that reason. `measure_energy` reads the meter around
loops of calls lasting at least the meter's `min_seconds` (1 s for NVML: ten counter updates),
over several trials; idle power is measured first over a quiet interval and subtracted for the
"dynamic" figure.
"""

from __future__ import annotations

import abc
import glob
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

COUNTER = "counter"
INTEGRATED_POWER = "integrated power"
POWERCAP_ROOT = "/sys/class/powercap"


@dataclass(frozen=True)
class EnergyResult:
    joules_per_call: float | None
    dynamic_joules_per_call: float | None
    avg_power_w: float | None
    idle_power_w: float | None
    source: str | None
    reason: str | None = None
    kind: str | None = None  # "counter" or "integrated power"
    joules_per_call_min: float | None = None  # spread over the trials
    joules_per_call_max: float | None = None
    calls_per_trial: int | None = None
    trials: int | None = None
    seconds_per_trial: float | None = None
    loop: str | None = None  # "eager calls" or "cuda graph replay (...)"
    temperature_c: float | None = None
    sm_clock_mhz: float | None = None
    cpu_clock_mhz: float | None = None

    @classmethod
    def unavailable(cls, reason: str) -> EnergyResult:
        return cls(None, None, None, None, None, reason)

    def as_dict(self) -> dict:
        return asdict(self)


class EnergyMeter(abc.ABC):
    """A source of energy readings for one device.

    read_joules() is cumulative energy (J) since an arbitrary origin, non-decreasing between two
    reads (wrap-around is the backend's job). `source` names exactly what is read, `kind` says
    whether it is a hardware energy counter or power samples integrated over time, and
    `min_seconds` is the shortest measurement loop that the meter's update period resolves.
    A backend whose constructor cannot read its meter sets `reason` instead of raising.
    """

    source: str = ""
    kind: str = COUNTER
    min_seconds: float = 1.0
    reason: str | None = None

    @abc.abstractmethod
    def read_joules(self) -> float: ...

    def conditions(self) -> dict:
        """Conditions during the measurement (temperature, clocks), where the meter can tell."""
        return {}

    def close(self) -> None:  # noqa: B027  (optional: only meters with a thread need it)
        """Release what the meter holds (NvmlPowerMeter's sampling thread)."""


# ------------------------------------------------------------------------------------ NVML


def _nvml_handle(device: torch.device, nvml):
    nvml.nvmlInit()
    index = device.index if device.index is not None else torch.cuda.current_device()
    # NVML numbers GPUs its own way; torch maps a CUDA index to it (CUDA_VISIBLE_DEVICES and
    # CUDA_DEVICE_ORDER included) so we never read another GPU's counter.
    try:
        nvml_index = torch.cuda._get_nvml_device_index(index)
    except Exception:
        nvml_index = index
    return nvml.nvmlDeviceGetHandleByIndex(nvml_index)


def _import_pynvml(nvml):
    if nvml is not None:
        return nvml
    import pynvml  # nvidia-ml-py

    return pynvml


class _NvmlConditions:
    def conditions(self) -> dict:
        out = {}
        try:
            out["temperature_c"] = float(self._nvml.nvmlDeviceGetTemperature(self._handle, 0))  # NVML_TEMPERATURE_GPU
            out["sm_clock_mhz"] = float(self._nvml.nvmlDeviceGetClockInfo(self._handle, 1))  # NVML_CLOCK_SM
        except Exception:
            pass
        return out


class NvmlEnergyMeter(_NvmlConditions, EnergyMeter):
    """The GPU's total-energy counter through nvidia-ml-py (pynvml)."""

    source = "nvml total energy counter (nvmlDeviceGetTotalEnergyConsumption, mJ)"
    kind = COUNTER
    min_seconds = 1.0  # ~10 updates of the ~100 ms counter

    def __init__(self, device: torch.device, nvml=None):
        self.reason = None
        try:
            self._nvml = _import_pynvml(nvml)
            self._handle = _nvml_handle(device, self._nvml)
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install 'leanops[bench]')"
        except Exception as exc:  # NVMLError_NotSupported, NoPermission, driver missing ...
            self.reason = f"NVML energy counter not readable: {type(exc).__name__}: {exc}"

    def read_joules(self) -> float:
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0


class NvmlPowerMeter(_NvmlConditions, EnergyMeter):
    """Board power (nvmlDeviceGetPowerUsage, mW) sampled every `interval_s` by a background
    thread and integrated with the trapezoid rule. Only used where the energy counter is not
    supported; the reading is the driver's (possibly averaged) power, so short loops blur:
    `min_seconds` is 2 s."""

    kind = INTEGRATED_POWER
    min_seconds = 2.0

    def __init__(self, device: torch.device, nvml=None, interval_s: float = 0.01):
        self.reason = None
        self.interval_s = interval_s
        self.source = (f"nvml board power (nvmlDeviceGetPowerUsage, mW) sampled every "
                       f"{interval_s * 1e3:g} ms and integrated over time")
        self._lock = threading.Lock()
        self._thread = None
        self._stop = threading.Event()
        try:
            self._nvml = _import_pynvml(nvml)
            self._handle = _nvml_handle(device, self._nvml)
            self._watts()
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install 'leanops[bench]')"
        except Exception as exc:
            self.reason = f"NVML power reading not readable: {type(exc).__name__}: {exc}"

    def _watts(self) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            w, t = self._watts(), time.perf_counter()
            with self._lock:
                self._joules += 0.5 * (w + self._last_w) * (t - self._last_t)
                self._last_w, self._last_t = w, t

    def read_joules(self) -> float:
        if self._thread is None:
            self._joules, self._last_w, self._last_t = 0.0, self._watts(), time.perf_counter()
            self._thread = threading.Thread(target=self._sample, name="leanops-nvml-power", daemon=True)
            self._thread.start()
        with self._lock:
            # Energy up to the last sample plus the stretch since, at the last sampled power.
            return self._joules + self._last_w * (time.perf_counter() - self._last_t)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


# ------------------------------------------------------------------------------------ RAPL

_RAPL_PERMISSION_HINT = (
    "since Linux 5.10 (CVE-2020-8694, PLATYPUS) energy_uj is readable by root only; run as root "
    "or grant read access, e.g. sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj"
)


class RaplEnergyMeter(EnergyMeter):
    """Sum of the CPU package counters of Linux powercap's RAPL driver.

    Package domains are the top-level zones `intel-rapl:N` whose `name` starts with "package"
    (AMD CPUs appear under the same driver); sub-zones (core, uncore, dram) are inside their
    package and psys/mmio duplicates would double-count, so neither is added. Each counter wraps
    at its max_energy_range_uj (2^32..2^38 µJ, minutes at full power): every read adds the delta
    since the previous read, so reads must come less than one wrap period apart, as they do
    around a measurement loop. The counters cover the whole package: every process on it.
    """

    kind = COUNTER
    min_seconds = 0.05  # RAPL updates about every millisecond

    def __init__(self, root: str | None = None):
        root = root or os.environ.get("LEANOPS_POWERCAP_ROOT") or POWERCAP_ROOT
        self.reason = None
        self.root = root
        self._domains: list[tuple[str, int]] = []  # (energy_uj path, wrap range)
        if not os.path.isdir(root):
            self.reason = (f"no RAPL energy counters: {root} does not exist (not Linux, no powercap "
                           "driver, or a container without /sys/class/powercap)")
            return
        names = []
        for zone in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
            if os.path.basename(zone).count(":") != 1:
                continue  # a sub-zone (intel-rapl:0:1), inside its package
            try:
                with open(os.path.join(zone, "name")) as f:
                    name = f.read().strip()
            except OSError:
                continue
            if not name.startswith("package"):
                continue
            energy = os.path.join(zone, "energy_uj")
            try:
                with open(os.path.join(zone, "max_energy_range_uj")) as f:
                    wrap = int(f.read().strip())
                self._read_uj(energy)
            except PermissionError as exc:
                self.reason = f"RAPL counter {energy} not readable ({type(exc).__name__}: {exc}): {_RAPL_PERMISSION_HINT}"
                self._domains = []
                return
            except (OSError, ValueError) as exc:
                self.reason = f"RAPL counter {energy} not readable ({type(exc).__name__}: {exc})"
                self._domains = []
                return
            self._domains.append((energy, wrap))
            names.append(f"{os.path.basename(zone)} ({name})")
        if not self._domains:
            self.reason = f"no RAPL package domain under {root} (no intel-rapl:N zone named package-N)"
            return
        self.source = ("rapl package energy counter (powercap energy_uj, µJ; whole CPU package, all "
                       "processes): " + ", ".join(names))
        self._last = [self._read_uj(path) for path, _ in self._domains]
        self._total_uj = 0

    @staticmethod
    def _read_uj(path: str) -> int:
        with open(path) as f:
            return int(f.read().strip())

    def read_joules(self) -> float:
        for i, (path, wrap) in enumerate(self._domains):
            now = self._read_uj(path)
            delta = now - self._last[i]
            if delta < 0:  # wrapped once past max_energy_range_uj
                delta += wrap
            self._total_uj += delta
            self._last[i] = now
        return self._total_uj / 1e6

    def conditions(self) -> dict:
        try:
            with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq") as f:
                return {"cpu_clock_mhz": int(f.read()) / 1000.0}
        except (OSError, ValueError):
            return {}


# ------------------------------------------------------------------------------- selection


def meter_for(device: torch.device, nvml=None, powercap_root: str | None = None):
    """The energy meter for `device` as (meter, None), or (None, the reason there is none).
    CUDA: NVML's energy counter, else NVML power integrated over time; CPU: RAPL under
    `powercap_root` (default $LEANOPS_POWERCAP_ROOT or /sys/class/powercap)."""
    if device.type == "cuda":
        meter = NvmlEnergyMeter(device, nvml)
        if meter.reason is None:
            return meter, None
        if meter.reason.startswith("nvidia-ml-py is not installed"):
            return None, meter.reason
        fallback = NvmlPowerMeter(device, nvml)
        if fallback.reason is None:
            return fallback, None
        return None, f"{meter.reason}; {fallback.reason}"
    if device.type == "cpu":
        meter = RaplEnergyMeter(powercap_root)
        return (None, meter.reason) if meter.reason else (meter, None)
    return None, f"no energy meter for {device.type} devices"


def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def measure_idle_power(device: torch.device, meter: EnergyMeter, seconds: float = 1.0) -> float:
    """Average power (W) over `seconds` with nothing of ours running (after a synchronize)."""
    _sync(device)()
    e0, t0 = meter.read_joules(), time.perf_counter()
    time.sleep(seconds)
    return (meter.read_joules() - e0) / (time.perf_counter() - t0)


_CONDITIONS = ("temperature_c", "sm_clock_mhz", "cpu_clock_mhz")


def measure_energy(
    fn: Callable[[], object],
    device: torch.device,
    meter: EnergyMeter | None = None,
    min_seconds: float = 1.0,
    trials: int = 3,
    idle_power_w: float | None = None,
    calls_per_fn: int = 1,
    loop: str = "eager calls",
) -> EnergyResult:
    """Energy of one call: the median of `trials` loops of at least max(min_seconds,
    meter.min_seconds) each. `fn` may run several calls at once (a CUDA graph replay):
    `calls_per_fn` says how many. Pass `idle_power_w` (from measure_idle_power) to share one idle
    reading across many cases."""
    if meter is None:
        meter, reason = meter_for(device)
        if meter is None:
            return EnergyResult.unavailable(reason)
        try:
            return measure_energy(fn, device, meter, min_seconds, trials, idle_power_w, calls_per_fn, loop)
        finally:
            meter.close()
    sync = _sync(device)
    idle_w = measure_idle_power(device, meter) if idle_power_w is None else idle_power_w
    loop_s = max(min_seconds, meter.min_seconds)

    # Each trial calls fn in chunks until loop_s has passed (the clock is read between chunks,
    # not between calls: a chunk is about a tenth of a trial, by a probe of the call's time).
    fn()
    sync()
    start = time.perf_counter()
    probe = 0
    while probe < 3 or time.perf_counter() - start < 0.05:
        fn()
        probe += 1
    sync()
    per_fn = (time.perf_counter() - start) / probe
    chunk = max(1, math.ceil(loop_s / 10 / max(per_fn, 1e-9)))

    joules, watts, seconds, counts = [], [], [], []
    for _ in range(trials):
        sync()
        e0, t0 = meter.read_joules(), time.perf_counter()
        invocations = 0
        while invocations == 0 or time.perf_counter() - t0 < loop_s:
            for _ in range(chunk):
                fn()
            invocations += chunk
        sync()
        e1, t1 = meter.read_joules(), time.perf_counter()
        calls = invocations * calls_per_fn
        joules.append((e1 - e0) / calls)
        watts.append((e1 - e0) / (t1 - t0))
        seconds.append((t1 - t0) / calls)
        counts.append(calls)
    # Report one trial, the median one by energy per call (the lower median for an even count),
    # with its own power, duration and call count: the row's J/call, W and seconds then describe
    # the same loop (J/call = W * seconds / calls exactly); min/max show the spread of all trials.
    med = sorted(range(trials), key=lambda i: joules[i])[(trials - 1) // 2]
    j, w, s_per_call = joules[med], watts[med], seconds[med]
    return EnergyResult(
        joules_per_call=j,
        dynamic_joules_per_call=max(0.0, (w - idle_w) * s_per_call),
        avg_power_w=w,
        idle_power_w=idle_w,
        source=meter.source,
        kind=meter.kind,
        joules_per_call_min=min(joules),
        joules_per_call_max=max(joules),
        calls_per_trial=counts[med],
        trials=trials,
        seconds_per_trial=s_per_call * counts[med],
        loop=loop,
        **{k: v for k, v in meter.conditions().items() if k in _CONDITIONS},
    )


def energy_fields(fn: Callable[[], object], device: torch.device) -> dict:
    """{"joules": energy per call of fn or None, "energy_reason": why it is None, or None}: a
    measure_energy for one-off reports (the examples' step benchmarks), where a meter failing
    part-way is reported in the row rather than raised."""
    try:
        e = measure_energy(fn, device)
    except Exception as exc:
        return {"joules": None, "energy_reason": f"{type(exc).__name__}: {exc}"}
    return {"joules": e.joules_per_call, "energy_reason": e.reason}
