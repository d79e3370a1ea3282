"""The `leanops` CLI end to end on the CPU: `leanops bench --quick` (what CI runs), the suites
at tiny sizes, JSON/CSV/PNG outputs whose energy fields are meter numbers or null with a reason,
the demo, and the pytest-benchmark suites. Meters themselves: test_bench_energy.py; the runner:
test_bench_runner.py. Every command is pinned to the CPU (--device cpu, or no visible GPU for
`info`), so on a GPU machine these tests check the same CPU rows instead of running NVML energy
loops on the GPU; the GPU rows are bench/gpu_check.sh's job."""

import csv
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
from leanops import cli
from leanops.bench import runner as runner_module
from leanops.bench.energy import EnergyMeter
from leanops.bench.report import CSV_HEADER, format_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


CPU = ["--device", "cpu"]


@pytest.fixture
def no_gpu_visible(monkeypatch):
    """`leanops info` reports the default device (a GPU when one is visible): hide it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def no_rapl(tmp_path, monkeypatch):
    """CPU energy: no powercap tree (so energy is null with a reason on any host)."""
    monkeypatch.setenv("LEANOPS_POWERCAP_ROOT", str(tmp_path / "no-powercap"))


class ClockMeter(EnergyMeter):
    """A counter that follows the wall clock at 65 W (a CPU package under load, say)."""

    source = "fake rapl-like counter"
    min_seconds = 0.0

    def read_joules(self):
        return time.perf_counter() * 65.0


def check_energy_fields(rows):
    """Every energy number comes with its source; every missing one with a reason."""
    for row in rows:
        j = row["energy_joules_per_call"]
        if j is None:
            assert row["energy_reason"] and row["energy_source"] is None
            assert row["energy_avg_power_w"] is None and row["tflop_per_joule"] is None
        else:
            assert isinstance(j, float) and j > 0 and row["energy_source"] and row["energy_reason"] is None
            assert row["energy_kind"] in ("counter", "integrated power")


def test_format_table_prints_missing_values_as_dashes():
    text = format_table([{"a": "x", "b": 1.234}, {"a": "yy", "b": None}], [("A", "a", ""), ("B", "b", ".1f")])
    lines = text.splitlines()
    assert lines[0].split() == ["A", "B"] and lines[2].split() == ["x", "1.2"] and lines[3].split() == ["yy", "-"]


def test_cli_info_prints_the_backend_report(capsys, no_rapl, no_gpu_visible):
    assert cli.main(["info"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["reference"]["available"] is True
    assert report["energy"]["source"] is None and "no RAPL energy counters" in report["energy"]["reason"]


def test_bench_quick_on_cpu_writes_valid_json_and_csv(tmp_path, capsys, no_rapl):
    """The CI smoke test: every op family vs its dense baseline, tiny sizes, exit 0."""
    out, table = tmp_path / "r.json", tmp_path / "r.csv"
    assert cli.main(["bench", "--quick", *CPU, "--progress", "plain", "--out", str(out), "--csv", str(table)]) == 0
    text = capsys.readouterr().out
    assert "energy: not measured" in text and "no RAPL energy counters" in text
    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert data["format"] == "leanops-bench/1" and data["suites"] == ["matmul", "attention", "model"]
    assert data["environment"]["torch"] == torch.__version__ and data["failed"] == []
    rows = data["rows"]
    assert {r["suite"] for r in rows} == {"matmul", "attention", "model"}
    ops = {r["op"] for r in rows}
    assert {"dense", "int4_weight_mm", "int8_weight_mm", "int8_mm", "int8_dynamic_linear", "attention",
            "tiny-llama prefill", "tiny-llama decode", "mini-encoder forward"} <= ops
    for row in rows:
        assert row["median_ms"] > 0 and row["speedup_vs_dense"] > 0 and row["baseline"]
        assert row["timing_method"] == "wall clock (CPU)"
    check_energy_fields(rows)
    assert all("no RAPL energy counters" in r["energy_reason"] for r in rows)
    # each family's baseline is in it: dense F.linear, SDPA's own choice, the dense model
    baselines = {(r["suite"], r["baseline"]) for r in rows}
    assert baselines == {("matmul", "torch:F.linear"), ("attention", "torch:sdpa"), ("model", "dense")}
    # what cannot run on a CPU is listed with the reason, not silently left out
    skipped = {s["provider"]: s["reason"] for s in data["skipped"]}
    assert "sm_80" in skipped["torch:semi-structured"]
    # on a CPU the native quantised kernels are contenders: PyTorch's own and leanops' cpu backend
    providers = {r["provider"] for r in rows if r["suite"] == "matmul"}
    assert {"torch:_int_mm+dequant", "torch:_weight_int8pack_mm", "torch:_weight_int4pack_mm_for_cpu",
            "torch:quantise+_int_mm+scales", "torch:ao dynamic qlinear", "leanops:cpu"} <= providers
    # torchao is optional: measured where installed, otherwise skipped with the reason
    assert "torchao:int8 dynamic" in providers or "torchao" in skipped["torchao:int8 dynamic"]

    lines = list(csv.DictReader(table.open()))
    assert list(lines[0]) == CSV_HEADER
    metrics = {r["metric"] for r in lines}
    assert {"median_ms", "speedup_vs_dense", "tokens_per_s", "energy_joules_per_call", "tflop_per_joule",
            "output_sqnr_db"} <= metrics
    for line in lines:
        if line["value"] == "":
            assert line["reason"], line  # an empty value always says why
        else:
            float(line["value"])
    timing = [line for line in lines if line["metric"] == "median_ms"]
    assert len(timing) == len(rows) and all(line["spread"] == "p20-p80" for line in timing)
    assert all(float(line["low"]) <= float(line["value"]) <= float(line["high"]) for line in timing)


def test_bench_with_a_readable_meter_reports_its_numbers(tmp_path, capsys, monkeypatch):
    """Where a counter reads, rows carry its numbers and everything derived from them."""
    monkeypatch.setattr(runner_module, "meter_for", lambda device: (ClockMeter(), None))
    out = tmp_path / "r.json"
    assert cli.main(["bench", "matmul", "--quick", *CPU, "--batch", "3", "--providers", "dense,int8_weight_mm",
                     "--energy-seconds", "0.02", "--progress", "plain", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    check_energy_fields(data["rows"])
    assert data["energy"]["source"] == "fake rapl-like counter"
    for row in data["rows"]:
        assert row["energy_source"] == "fake rapl-like counter"
        assert row["energy_avg_power_w"] == pytest.approx(65.0, rel=0.05)
        assert math.isclose(row["tflop_per_joule"], row["flops"] / row["energy_joules_per_call"] / 1e12)
        assert row["energy_loop"].startswith("eager calls") and row["energy_calls_per_trial"] >= 1
    dense, w8 = sorted(data["rows"], key=lambda r: r["op"] != "dense")
    assert w8["energy_gain_vs_dense"] == dense["energy_joules_per_call"] / w8["energy_joules_per_call"]


def test_bench_attention_on_cpu(tmp_path, capsys, no_rapl):
    out = tmp_path / "a.json"
    assert cli.main(["bench", "attention", *CPU, "--seqlen", "32,48", "--heads", "2", "--head-dim", "16",
                     "--causal", "--progress", "plain", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    providers = {r["provider"] for r in data["rows"]}
    # leanops twice: unforced (the CPU path users get) and the reference
    assert {"torch:sdpa", "torch:sdpa[math]", "leanops:auto", "leanops:reference"} <= providers
    for r in data["rows"]:
        assert r["causal"] is True and r["H"] == 2 and r["D"] == 16
        assert r["flops"] == 4 * 1 * 2 * r["Sq"] * r["Sk"] * 16 / 2  # halved: causal
        assert r["min_bytes"] == 4 * 1 * 2 * 16 * 4 * r["Sq"]  # q, k, v, out in fp32
    check_energy_fields(data["rows"])
    # the CUDA-only SDPA backends are skipped with torch's own reason
    reasons = {s["provider"]: s["reason"] for s in data["skipped"]}
    assert "RuntimeError" in reasons["torch:sdpa[efficient]"]


def test_bench_attention_passes_and_int8_on_cpu(tmp_path, capsys, no_rapl):
    """--passes adds the backward alone and forward + backward, each compared with SDPA's
    choice for the same pass; leanops-int8 rows are held to the int8 rate."""
    out = tmp_path / "a.json"
    assert cli.main(["bench", "attention", "--seqlen", "40", "--heads", "2", "--head-dim", "16",
                     "--no-causal", "--passes", "fwd,bwd,train", "--providers", "leanops,leanops-int8",
                     "--progress", "plain", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    forward = 4 * 1 * 2 * 40 * 40 * 16
    want = {"attention": (1.0, 4), "attention backward": (2.5, 8), "attention fwd+bwd": (3.5, 10)}
    assert {(r["op"], r["provider"]) for r in rows} == {
        (op, p) for op in want
        for p in ("torch:sdpa", "leanops:auto", "leanops:reference", "leanops:reference int8")}
    for r in rows:
        factor, tensors = want[r["op"]]
        assert r["flops"] == factor * forward and r["min_bytes"] == 4 * 2 * 16 * 40 * tensors
        assert r["roofline_rate"] is None  # fp32 on a CPU: no measured ceiling
        assert r["speedup_vs_dense"] is not None  # compared with SDPA's row of the same pass
    with pytest.raises(SystemExit, match="unknown passes"):
        cli.main(["bench", "attention", "--passes", "fwd,sideways"])


def test_bench_model_on_cpu(tmp_path, capsys, no_rapl):
    out, table = tmp_path / "m.json", tmp_path / "m.csv"
    assert cli.main(["bench", "model", *CPU, "--model", "mini-encoder", "--preset", "test", "--tokens", "16",
                     "--batch", "2", "--variants", "int8 weight-only", "--progress", "plain",
                     "--out", str(out), "--csv", str(table)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["provider"], r["op"]) for r in rows] == [("dense", "mini-encoder forward"),
                                                        ("int8 weight-only", "mini-encoder forward")]
    for r in rows:
        assert r["tokens"] == 32 and r["B"] == 2 and r["S"] == 16 and r["output"] == "last hidden state"
        assert r["peak_mem_mb"] is None and r["peak_mem_reason"]  # CPU: said, not guessed
    # the test preset's embeddings (kept dense) are a third of it: int8 linears give ~2.3x overall
    assert rows[1]["output_sqnr_db"] > 20 and rows[1]["size_x"] > 2
    check_energy_fields(rows)
    text = capsys.readouterr().out
    assert "tokens/s" in text and "SQNR dB" in text


def test_bench_plot_writes_a_png(tmp_path, capsys, no_rapl):
    pytest.importorskip("matplotlib")
    png = tmp_path / "r.png"
    assert cli.main(["bench", "matmul", "--quick", *CPU, "--batch", "2", "--providers", "dense,int8_weight_mm",
                     "--progress", "plain", "--plot", str(png)]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_bench_plot_without_matplotlib_fails_before_running(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        cli.main(["bench", "matmul", "--quick", "--plot", str(tmp_path / "r.png")])
    assert "case(s)" not in capsys.readouterr().out  # nothing was benchmarked first


def test_bench_save_writes_under_the_results_dir(tmp_path, capsys, no_rapl):
    assert cli.main(["bench", "matmul", "--quick", *CPU, "--batch", "2", "--providers", "dense", "--save",
                     "--results-dir", str(tmp_path), "--progress", "plain"]) == 0
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("cpu-")
    names = sorted(p.suffix for p in folder.iterdir())
    assert ".json" in names and ".csv" in names
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["bench", "matmul", "--quick", "--save", "--results-dir", str(tmp_path / "nope")])


def test_pytest_benchmark_suites_collect():
    proc = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--collect-only", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for suite in ("test_matmul.py::test_matmul[", "test_attention.py::test_attention[", "test_model.py::test_model["):
        assert suite in proc.stdout


def test_cli_demo_runs_on_the_test_preset(tmp_path, capsys):
    path = tmp_path / "demo.json"
    assert cli.main(["demo", *CPU, "--preset", "test", "--no-energy", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "int4 weight-only g128" in text and "logit SQNR dB" in text
    rows = json.loads(path.read_text())["rows"]
    assert [r["variant"] for r in rows][0] == "dense"
    assert all(r["size_x"] > 2.5 for r in rows[1:])  # every quantised variant is much smaller


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "matmul", "--batch", "0"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "matmul", "--shapes", "tiny", "--dtype", "int3"])
    with pytest.raises(SystemExit):
        cli.main(["bench", "attention", "--heads", "two"])
    with pytest.raises(SystemExit, match="shapes must be one of"):
        cli.main(["bench", "matmul", "--shapes", "llama-70b"])
    with pytest.raises(SystemExit, match="unknown providers"):
        cli.main(["bench", "matmul", "--quick", "--providers", "dense,fp8"])
    with pytest.raises(SystemExit, match="unknown variants"):
        cli.main(["bench", "model", "--quick", "--variants", "int2"])


def test_common_options_work_before_and_after_the_suite(tmp_path, capsys, no_rapl):
    before, after = tmp_path / "before.json", tmp_path / "after.json"
    args = ["--quick", *CPU, "--batch", "2", "--providers", "dense", "--no-energy", "--progress", "plain"]
    assert cli.main(["bench", "--out", str(before), "matmul", *args]) == 0
    assert cli.main(["bench", "matmul", "--out", str(after), *args]) == 0
    for path in (before, after):
        data = json.loads(path.read_text())
        assert [r["shape"] for r in data["rows"]] == ["M=2,K=384,N=256"] and data["energy"]["requested"] is False


def test_cpu_matmul_compares_several_dtypes_and_thread_counts_in_one_run(tmp_path, capsys, no_rapl):
    out = tmp_path / "r.json"
    argv = ["bench", "matmul", "--device", "cpu", "--shapes", "quick", "--batch", "1", "--dtype", "fp32,bf16",
            "--threads", "1,2", "--rounds", "2", "--providers", "int8_dynamic_linear,torch_w8a8",
            "--progress", "plain", "--out", str(out)]
    assert cli.main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    groups = {(r["dtype"], r["T"]) for r in rows}
    assert groups == {("float32", 1), ("float32", 2), ("bfloat16", 1), ("bfloat16", 2)}
    for r in rows:  # each compares with the dense baseline of its own dtype and thread count
        assert r["baseline"] == "torch:F.linear" and r["speedup_vs_dense"] > 0
        assert "interleaved over 2 rounds" in r["timing_method"] and r["threads"] == r["T"]
    assert {r["provider"] for r in rows} == {"torch:F.linear", "leanops:cpu", "torch:quantise+_int_mm+scales"}


def test_cli_parses_thread_counts_and_dtype_lists():
    assert cli._threads("1,all")[0] == 1 and cli._threads("1,all")[1] == (os.cpu_count() or torch.get_num_threads())
    assert cli._threads("2,2") == [2]
    assert cli._dtypes("fp32,bf16") == ["fp32", "bf16"]
    for bad, parse in (("0", cli._threads), ("x", cli._threads), ("fp8", cli._dtypes)):
        with pytest.raises(Exception, match="expected"):
            parse(bad)
