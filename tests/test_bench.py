"""The benchmark library and the CLI: energy meters never invent numbers, outputs are valid."""

import csv
import json

import pytest
import torch
from leanops import cli
from leanops.bench.energy import EnergyResult, NvmlEnergyMeter, measure_energy
from leanops.bench.report import format_table


class FakeNvml:
    """Stands in for pynvml: an energy counter (mJ) that advances with the wall clock."""

    class NVMLError_NotSupported(Exception):
        pass

    def __init__(self, watts=300.0, supported=True):
        import time

        self.watts, self.supported, self.time = watts, supported, time

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise self.NVMLError_NotSupported("Not Supported")
        return int(self.time.perf_counter() * self.watts * 1000)

    def nvmlDeviceGetTemperature(self, handle, sensor):
        return 40

    def nvmlDeviceGetClockInfo(self, handle, clock):
        return 1980


@pytest.fixture
def cpu_index(monkeypatch):
    # NvmlEnergyMeter maps a CUDA index to NVML's; without a GPU pretend index 0 maps to 0.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "_get_nvml_device_index", lambda i: i)


def test_nvml_meter_measures_from_the_counter(cpu_index):
    meter = NvmlEnergyMeter(torch.device("cuda", 0), nvml=FakeNvml(watts=250.0))
    assert meter.reason is None
    result = measure_energy(lambda: None, torch.device("cpu"), meter, min_seconds=0.05, trials=2, idle_power_w=50.0)
    # The fake draws 250 W whatever runs: the measured average power must say so.
    assert result.avg_power_w == pytest.approx(250.0, rel=0.05)
    assert result.idle_power_w == 50.0
    assert result.joules_per_call > 0 and result.dynamic_joules_per_call > 0
    assert result.source.startswith("nvml") and result.reason is None
    assert result.temperature_c == 40 and result.sm_clock_mhz == 1980


def test_unreadable_counter_gives_null_with_reason(cpu_index):
    meter = NvmlEnergyMeter(torch.device("cuda", 0), nvml=FakeNvml(supported=False))
    assert "NVML energy counter not readable" in meter.reason and "Not Supported" in meter.reason


def test_no_meter_on_cpu_is_null_not_an_estimate():
    result = measure_energy(lambda: None, torch.device("cpu"))
    assert result == EnergyResult.unavailable(result.reason)
    assert result.joules_per_call is None and result.avg_power_w is None and result.reason


def test_format_table_prints_missing_values_as_dashes():
    text = format_table([{"a": "x", "b": 1.234}, {"a": "yy", "b": None}], [("A", "a", ""), ("B", "b", ".1f")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B"] and lines[2].split() == ["x", "1.2"] and lines[3].split() == ["yy", "-"]


def test_cli_info_prints_the_backend_report(capsys):
    assert cli.main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"]["available"] is True


def test_cli_bench_matmul_writes_valid_json_and_csv(tmp_path, capsys):
    out, table = tmp_path / "r.json", tmp_path / "r.csv"
    assert cli.main(["bench", "matmul", "--shapes", "tiny", "--batch", "3", "--energy",
                     "--providers", "dense,int4_weight_mm,int8_mm", "--out", str(out), "--csv", str(table)]) == 0
    data = json.loads(out.read_text())
    ops = sorted(r["op"] for r in data["rows"])
    assert ops == ["dense", "dense", "int4_weight_mm", "int4_weight_mm", "int8_mm", "int8_mm"]
    for row in data["rows"]:
        assert row["median_ms"] > 0 and row["speedup_vs_dense"] > 0
        # Energy on a CPU: null with the reason, never a number made up.
        assert row["energy_joules_per_call"] is None and "no energy meter" in row["energy_reason"]
    assert data["environment"]["torch"] == torch.__version__
    rows = list(csv.DictReader(table.open()))
    metrics = {r["metric"] for r in rows}
    assert {"median_ms", "speedup_vs_dense", "energy_joules_per_call"} <= metrics
    assert all(r["energy_reason"] for r in rows if r["metric"] == "energy_joules_per_call")


def test_cli_demo_runs_on_the_test_preset(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert cli.main(["demo", "--preset", "test", "--no-energy", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "int4 weight-only g128" in text and "logit SQNR dB" in text
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows][0] == "dense"
    assert all(r["size_x"] > 2.5 for r in rows[1:])  # every quantised variant is much smaller


def test_cli_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["bench", "matmul", "--batch", "0"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "matmul", "--shapes", "tiny", "--dtype", "int3"])
