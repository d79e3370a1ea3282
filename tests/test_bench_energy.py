"""Energy meters against fakes: NVML (counter and integrated power) and a powercap tree in
tmp_path (RAPL: package domains summed, wrap-around, permissions, missing driver). A meter either
reads hardware-shaped numbers or says why not; nothing is ever estimated."""

import os
import time

import pytest
import torch
from leanops.bench.energy import (
    COUNTER,
    INTEGRATED_POWER,
    EnergyMeter,
    EnergyResult,
    NvmlEnergyMeter,
    NvmlPowerMeter,
    RaplEnergyMeter,
    measure_energy,
    meter_for,
)


class FakeNvml:
    """Stands in for pynvml: an energy counter (mJ) and a power reading (mW) that follow the
    wall clock at `watts`; either can be made unsupported."""

    class NVMLError_NotSupported(Exception):
        pass

    def __init__(self, watts=300.0, counter=True, power=True):
        self.watts, self.counter, self.power = watts, counter, power

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.counter:
            raise self.NVMLError_NotSupported("Not Supported")
        return int(time.perf_counter() * self.watts * 1000)

    def nvmlDeviceGetPowerUsage(self, handle):
        if not self.power:
            raise self.NVMLError_NotSupported("Not Supported")
        return int(self.watts * 1000)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 40

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980


@pytest.fixture
def cpu_index(monkeypatch):
    # The NVML meters map a CUDA index to NVML's; without a GPU pretend index 0 maps to 0.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: i)


CUDA0 = torch.device("cuda", 0)  # a device object only: nothing runs on it here


# ------------------------------------------------------------------------------------ NVML


def test_nvml_counter_meter_measures_from_the_counter(cpu_index):
    meter = NvmlEnergyMeter(CUDA0, nvml=FakeNvml(watts=250.0))
    assert meter.reason is None and meter.kind == COUNTER and meter.min_seconds == 1.0
    meter.min_seconds = 0.05  # the fake counter has no 100 ms update period to average over
    result = measure_energy(lambda: time.sleep(0.001), torch.device("cpu"), meter, min_seconds=0.05,
                            trials=2, idle_power_w=50.0)
    # The fake draws 250 W whatever runs: the measured average power must say so.
    assert result.avg_power_w == pytest.approx(250.0, rel=0.05)
    assert result.idle_power_w == 50.0
    assert result.joules_per_call == pytest.approx(250.0 * result.seconds_per_trial / result.calls_per_trial, rel=0.05)
    # dynamic = (P - P_idle) * t per call = 200/250 of the total here
    assert result.dynamic_joules_per_call == pytest.approx(0.8 * result.joules_per_call, rel=0.05)
    assert result.joules_per_call_min <= result.joules_per_call <= result.joules_per_call_max
    assert result.source.startswith("nvml total energy counter") and result.kind == COUNTER
    assert result.reason is None and result.temperature_c == 40 and result.sm_clock_mhz == 1980


def test_nvml_loops_last_at_least_the_meters_minimum(cpu_index):
    meter = NvmlEnergyMeter(CUDA0, nvml=FakeNvml())
    meter.min_seconds = 0.2  # the real one is 1 s (ten updates of the ~100 ms counter)
    result = measure_energy(lambda: None, torch.device("cpu"), meter, min_seconds=0.01, trials=1, idle_power_w=0.0)
    assert result.seconds_per_trial >= 0.2


def test_unreadable_counter_gives_the_reason(cpu_index):
    meter = NvmlEnergyMeter(CUDA0, nvml=FakeNvml(counter=False))
    assert "NVML energy counter not readable" in meter.reason and "Not Supported" in meter.reason


def test_without_the_counter_nvml_power_is_integrated_and_named_so(cpu_index):
    fake = FakeNvml(watts=120.0, counter=False)
    meter, reason = meter_for(CUDA0, nvml=fake)
    assert reason is None and isinstance(meter, NvmlPowerMeter)
    assert meter.kind == INTEGRATED_POWER and "integrated over time" in meter.source
    meter.min_seconds = 0.1
    try:
        result = measure_energy(lambda: time.sleep(0.002), torch.device("cpu"), meter, min_seconds=0.1,
                                trials=2, idle_power_w=20.0)
    finally:
        meter.close()
    assert result.kind == INTEGRATED_POWER and result.avg_power_w == pytest.approx(120.0, rel=0.05)


def test_nvml_with_nothing_readable_is_null_with_both_reasons(cpu_index):
    meter, reason = meter_for(CUDA0, nvml=FakeNvml(counter=False, power=False))
    assert meter is None
    assert "energy counter not readable" in reason and "power reading not readable" in reason


def test_meter_for_prefers_the_counter(cpu_index):
    meter, reason = meter_for(CUDA0, nvml=FakeNvml())
    assert isinstance(meter, NvmlEnergyMeter) and reason is None


# ------------------------------------------------------------------------------------ RAPL


def make_zone(root, name, zone_name, energy_uj, max_range=2**32, readable=True):
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(zone_name + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    if not readable:
        (zone / "energy_uj").chmod(0o200)
    return zone / "energy_uj"


def test_rapl_sums_the_package_domains_only(tmp_path):
    p0 = make_zone(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    p1 = make_zone(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    core = make_zone(tmp_path, "intel-rapl:0:0", "core", 0)  # inside package-0: not added again
    psys = make_zone(tmp_path, "intel-rapl:2", "psys", 0)  # the whole platform: would double-count
    meter = RaplEnergyMeter(str(tmp_path))
    assert meter.reason is None and meter.kind == COUNTER
    assert "intel-rapl:0 (package-0)" in meter.source and "intel-rapl:1 (package-1)" in meter.source
    assert "psys" not in meter.source and "core" not in meter.source
    start = meter.read_joules()
    p0.write_text("3000000\n")  # +2 J
    p1.write_text("5500000\n")  # +0.5 J
    core.write_text("999999999\n")
    psys.write_text("999999999\n")
    assert meter.read_joules() - start == pytest.approx(2.5)


def test_rapl_handles_wrap_around(tmp_path):
    wrap = 262_143_328_850  # a real package's max_energy_range_uj
    energy = make_zone(tmp_path, "intel-rapl:0", "package-0", wrap - 1_000_000, max_range=wrap)
    meter = RaplEnergyMeter(str(tmp_path))
    start = meter.read_joules()
    energy.write_text("2000000\n")  # wrapped: 1 J to the top, then 2 J from zero
    assert meter.read_joules() - start == pytest.approx(3.0)
    energy.write_text("2500000\n")  # and it keeps counting from there
    assert meter.read_joules() - start == pytest.approx(3.5)


def test_rapl_permission_denied_is_null_with_the_reason(tmp_path, monkeypatch):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 1, readable=False)  # mode 0200, as since 5.10
    if os.geteuid() == 0:
        # root reads any file: raise what open() raises for everyone else
        def denied(path):
            raise PermissionError(13, "Permission denied", path)
        monkeypatch.setattr(RaplEnergyMeter, "_read_uj", staticmethod(denied))
    meter, reason = meter_for(torch.device("cpu"), powercap_root=str(tmp_path))
    assert meter is None
    assert "PermissionError" in reason and "intel-rapl:0/energy_uj" in reason and "root" in reason


def test_no_powercap_tree_is_null_with_the_reason(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-dir"
    meter, reason = meter_for(torch.device("cpu"), powercap_root=str(missing))
    assert meter is None and str(missing) in reason and "does not exist" in reason
    # measure_energy with no meter: every number None, the reason kept, not an estimate
    monkeypatch.setenv("LEANOPS_POWERCAP_ROOT", str(missing))
    result = measure_energy(lambda: None, torch.device("cpu"))
    assert result == EnergyResult.unavailable(reason)


def test_powercap_without_a_package_domain_is_null(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "psys", 1)
    meter, reason = meter_for(torch.device("cpu"), powercap_root=str(tmp_path))
    assert meter is None and "no RAPL package domain" in reason


def test_env_var_points_the_cpu_meter_at_another_tree(tmp_path, monkeypatch):
    make_zone(tmp_path, "intel-rapl:0", "package-0", 1)
    monkeypatch.setenv("LEANOPS_POWERCAP_ROOT", str(tmp_path))
    meter, reason = meter_for(torch.device("cpu"))
    assert isinstance(meter, RaplEnergyMeter) and reason is None


def test_no_meter_for_other_devices():
    meter, reason = meter_for(torch.device("meta"))
    assert meter is None and "meta" in reason


# ------------------------------------------------------------------------- measure_energy


class ClockMeter(EnergyMeter):
    """A meter whose counter follows the wall clock at `watts` (what a real counter does under
    constant load)."""

    source = "fake clock-driven counter"
    min_seconds = 0.0

    def __init__(self, watts):
        self.watts = watts

    def read_joules(self):
        return time.perf_counter() * self.watts


class CallMeter(EnergyMeter):
    """A counter that advances by exactly `joules` per call made (no clock involved)."""

    source = "fake per-call counter"
    min_seconds = 0.0

    def __init__(self, joules):
        self.joules, self.calls = joules, 0

    def call(self):
        self.calls += 1

    def read_joules(self):
        return self.calls * self.joules


def test_energy_of_a_graph_replay_is_divided_by_its_calls():
    meter = CallMeter(0.25)

    def replay_of_four():  # one invocation = four calls, as a captured graph's replay
        for _ in range(4):
            meter.call()

    result = measure_energy(replay_of_four, torch.device("cpu"), meter, min_seconds=0.02, trials=3,
                            idle_power_w=0.0, calls_per_fn=4, loop="cuda graph replay (fake)")
    assert result.joules_per_call == pytest.approx(0.25)  # per call, not per replay
    assert result.joules_per_call_min == pytest.approx(0.25) and result.joules_per_call_max == pytest.approx(0.25)
    assert result.calls_per_trial % 4 == 0 and result.loop == "cuda graph replay (fake)"
