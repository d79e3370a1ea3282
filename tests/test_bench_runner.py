"""The generic benchmark runner and the timing policy: ratios against the dense baseline of the
same shape, energy-derived columns, skips vs failures, CUDA-graph choice and its fallback."""

import time

import pytest
import torch
from leanops.bench import timing
from leanops.bench.energy import EnergyMeter
from leanops.bench.runner import Case, Runner, Settings, run_cases

CPU = torch.device("cpu")
FAST = Settings(warmup_ms=1, rep_ms=15)


def sleeper(seconds):
    def fn(x):
        time.sleep(seconds)
        return x
    return fn


def case(provider, seconds, shape=1, baseline=False, **kw):
    defaults = dict(suite="test", op="op", provider=provider, backend=None, dtype=torch.float32,
                    dims={"N": shape}, flops=2e9, min_bytes=1e6, rate=None,
                    make_inputs=lambda: (torch.randn(4),), fn=sleeper(seconds), baseline=baseline)
    return Case(**{**defaults, **kw})


class ClockMeter(EnergyMeter):
    """Counter following the wall clock at a constant power."""

    source = "fake clock-driven counter"
    min_seconds = 0.0

    def __init__(self, watts):
        self.watts = watts

    def read_joules(self):
        return time.perf_counter() * self.watts


class FakeClock:
    """A perf_counter that advances only when a case runs, by the case's nominal duration: the
    runner's arithmetic is tested exactly, whatever else the machine is doing (real sleeps
    overshoot under load, by milliseconds, and a 2 ms vs 4 ms ratio then drifts far off 0.5)."""

    def __init__(self, cpu_fraction=1.0):
        self.now = 1000.0
        self.cpu = 0.0
        self.cpu_fraction = cpu_fraction  # of each case's duration spent on the thread's CPU

    def perf_counter(self):
        return self.now

    def thread_time(self):  # the CPU loop also reads the thread's CPU time
        return self.cpu

    def sleeper(self, seconds, then=None):
        def fn(x):
            self.now += seconds
            self.cpu += seconds * self.cpu_fraction
            return x if then is None else then(x)
        return fn


def test_ratios_are_against_the_baseline_of_the_same_shape(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)  # the CPU timing loop reads timing.time.perf_counter and thread_time

    def timed(provider, seconds, **kw):
        return case(provider, seconds, fn=clock.sleeper(seconds), **kw)

    cases = [timed("dense", 0.004, shape=1, baseline=True), timed("fast", 0.002, shape=1),
             timed("dense", 0.002, shape=2, baseline=True), timed("slow", 0.004, shape=2),
             timed("orphan", 0.001, shape=3)]  # no baseline measured for shape 3
    rows = {(r["provider"], r["N"]): r for r in run_cases(cases, CPU, FAST, progress=lambda _: None).rows}
    assert rows["dense", 1]["speedup_vs_dense"] == 1.0 and rows["dense", 1]["baseline"] == "dense"
    assert rows["fast", 1]["median_ms"] == pytest.approx(2.0, rel=1e-9)
    assert rows["fast", 1]["speedup_vs_dense"] == pytest.approx(2.0, rel=1e-9)
    assert rows["slow", 2]["speedup_vs_dense"] == pytest.approx(0.5, rel=1e-9)
    # each ratio is exactly the quotient of the two medians in the rows
    assert rows["slow", 2]["speedup_vs_dense"] == rows["dense", 2]["median_ms"] / rows["slow", 2]["median_ms"]
    assert rows["orphan", 3]["speedup_vs_dense"] is None and rows["orphan", 3]["baseline"] is None


def test_energy_columns_come_from_the_meter_and_each_other():
    settings = Settings(energy=True, energy_seconds=0.03, energy_trials=2, idle_seconds=0.02,
                        warmup_ms=1, rep_ms=10)
    runner = Runner(CPU, settings, progress=lambda _: None, meter=ClockMeter(200.0))
    cases = [case("dense", 0.004, baseline=True), case("fast", 0.002, tokens=8)]
    res = runner.run(cases)
    dense, fast = res.rows
    assert runner.idle_w == pytest.approx(200.0, rel=0.05)  # the fake draws 200 W even idle
    for r in (dense, fast):
        assert r["energy_source"] == "fake clock-driven counter" and r["energy_reason"] is None
        assert r["energy_avg_power_w"] == pytest.approx(200.0, rel=0.05)
        assert r["tflop_per_joule"] == r["flops"] / r["energy_joules_per_call"] / 1e12
    assert fast["energy_gain_vs_dense"] == dense["energy_joules_per_call"] / fast["energy_joules_per_call"]
    assert fast["energy_gain_vs_dense"] == pytest.approx(2.0, rel=0.3)  # half the time at the same power
    assert fast["energy_joules_per_token"] == fast["energy_joules_per_call"] / 8
    assert fast["tokens_per_s"] == pytest.approx(8 / (fast["median_ms"] * 1e-3))


def test_energy_off_is_null_with_a_reason():
    row = run_cases([case("dense", 0.0, baseline=True)], CPU, FAST, progress=lambda _: None).rows[0]
    assert row["energy_joules_per_call"] is None and row["tflop_per_joule"] is None
    assert row["energy_reason"] == "energy not requested (pass --energy)"


def test_skips_and_failures_are_reported_not_dropped():
    def cannot(x):
        raise RuntimeError("leanops: backend 'triton' cannot run this call: CPU tensors")

    def no_kernel(x):
        raise RuntimeError("No available kernel. Aborting execution.")

    def bug(x):
        raise ValueError("a real bug")

    lines = []
    res = run_cases([
        case("dense", 0.0, baseline=True),
        case("known", 0.0, skip="needs a GPU"),
        case("forced", 0.0, fn=cannot),
        case("sdpa", 0.0, fn=no_kernel, skip_on=(RuntimeError,)),
        case("broken", 0.0, fn=bug),
        case("broken-too", 0.0, fn=no_kernel),  # RuntimeError without skip_on: a failure
    ], CPU, FAST, progress=lines.append)
    assert [r["provider"] for r in res.rows] == ["dense"]
    skipped = {s["provider"]: s["reason"] for s in res.skipped}
    assert skipped == {"known": "needs a GPU",
                       "forced": "RuntimeError: leanops: backend 'triton' cannot run this call: CPU tensors",
                       "sdpa": "RuntimeError: No available kernel. Aborting execution."}
    failed = {f["provider"]: f for f in res.failed}
    assert set(failed) == {"broken", "broken-too"}
    assert failed["broken"]["error"] == "ValueError: a real bug" and "raise ValueError" in failed["broken"]["traceback"]
    assert any("FAILED" in line and "broken" in line for line in lines)


def test_warnings_during_a_case_land_in_the_row():
    import warnings

    def warns(x):
        warnings.warn("leanops: fell back to the reference kernel", RuntimeWarning, stacklevel=1)
        return x

    row = run_cases([case("dense", 0.0, baseline=True, fn=warns)], CPU, FAST, progress=lambda _: None).rows[0]
    assert row["warnings"] == ["leanops: fell back to the reference kernel"]


def test_rows_carry_throughput_and_the_shape():
    row = run_cases([case("dense", 0.001, baseline=True, dims={"M": 3, "K": 5})], CPU, FAST,
                    progress=lambda _: None).rows[0]
    assert row["shape"] == "M=3,K=5" and row["M"] == 3 and row["K"] == 5
    assert row["tflops"] == pytest.approx(2e9 / (row["median_ms"] * 1e-3) / 1e12)
    assert row["gbps"] == pytest.approx(1e6 / (row["median_ms"] * 1e-3) / 1e9)
    assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    assert row["pct_of_roofline"] is None and "GPU only" in row["roofline_reason"]
    assert row["peak_mem_mb"] is None and "CUDA only" in row["peak_mem_reason"]


# ------------------------------------------------------------------------ timing policy


@pytest.fixture
def fake_cuda_timers(monkeypatch):
    """time_fn / time_fn_cudagraph stand-ins that record what was called (no GPU here)."""
    calls = []

    def eager(fn, device, warmup_ms=25, rep_ms=100, min_calls=5):
        calls.append("eager")
        return timing.Timing(0.020, 0.019, 0.022, timing.EAGER_CUDA)

    def graph(fn, device, rep_ms=100):
        calls.append("graph")
        fn()
        return timing.Timing(0.008, 0.0079, 0.0081, timing.GRAPH_CUDA)

    monkeypatch.setattr(timing, "time_fn", eager)
    monkeypatch.setattr(timing, "time_fn_cudagraph", graph)
    return calls


CUDA = torch.device("cuda", 0)  # only a device object: the timers above are fakes


def test_small_launches_are_replayed_from_a_graph(fake_cuda_timers):
    rotated = []
    t = timing.time_case(lambda: None, CUDA, lambda: rotated.append(1), rotation=4, small=True)
    assert fake_cuda_timers == ["eager", "graph"] and rotated  # the graph got the rotating callable
    assert t.median_ms == 0.008 and t.eager_median_ms == 0.020
    assert t.method == timing.GRAPH_CUDA + ", inputs rotated over 4 copies"


def test_fast_calls_use_the_graph_in_auto_mode_and_slow_ones_do_not(fake_cuda_timers):
    assert timing.time_case(lambda: None, CUDA).method.startswith(timing.GRAPH_CUDA)  # 20 us eager
    fake_cuda_timers.clear()
    timing.GRAPH_BELOW_MS, saved = 0.001, timing.GRAPH_BELOW_MS
    try:
        t = timing.time_case(lambda: None, CUDA)
    finally:
        timing.GRAPH_BELOW_MS = saved
    assert fake_cuda_timers == ["eager"] and t.method == timing.EAGER_CUDA and t.eager_median_ms is None


def test_graph_never_and_graph_always(fake_cuda_timers):
    assert timing.time_case(lambda: None, CUDA, small=True, graph="never").method == timing.EAGER_CUDA
    assert timing.time_case(lambda: None, CUDA, graph="always").method.startswith(timing.GRAPH_CUDA)
    with pytest.raises(ValueError, match="graph must be"):
        timing.time_case(lambda: None, CUDA, graph="sometimes")


def test_a_failed_capture_keeps_the_eager_figure_and_says_why(fake_cuda_timers, monkeypatch):
    def broken(fn, device, rep_ms=100):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(timing, "time_fn_cudagraph", broken)
    monkeypatch.setattr(timing, "_recover", lambda device: None)
    t = timing.time_case(lambda: None, CUDA, small=True)
    assert t.median_ms == 0.020 and t.eager_median_ms is None
    assert t.method == (timing.EAGER_CUDA + "; CUDA-graph replay failed (RuntimeError: operation not "
                        "permitted when stream is capturing)")


def test_cpu_timing_is_the_wall_clock_whatever_the_graph_setting():
    t = timing.time_case(lambda: time.sleep(0.001), CPU, graph="always", small=True, warmup_ms=1, rep_ms=10)
    assert t.method == timing.WALL_CPU and 1.0 <= t.median_ms < 100  # a 1 ms sleep, however loaded the CPU


def test_graph_timed_cases_measure_energy_on_a_graph_replay_too(monkeypatch):
    """When a case was timed from a CUDA graph, its energy loop replays a graph as well (the
    meter must see the kernels, not the GPU idling between Python launches), per call."""
    from leanops.bench import runner as runner_module

    monkeypatch.setattr(runner_module, "time_case", lambda fn, *a, **k: timing.Timing(
        0.5, 0.5, 0.5, timing.GRAPH_CUDA + ", inputs rotated over 1 copies", 0.9))
    captured = []

    def replayer(fn, device, calls):
        captured.append(calls)

        def replay():
            for _ in range(calls):
                fn()
        return replay

    monkeypatch.setattr(runner_module, "cuda_graph_replayer", replayer)

    class CallMeter(EnergyMeter):  # exactly 0.01 J per call of the case's fn
        source, min_seconds, calls = "fake per-call counter", 0.0, 0

        def read_joules(self):
            return self.calls * 0.01

    meter = CallMeter()

    def counted(x):
        meter.calls += 1
        return x

    settings = Settings(energy=True, energy_seconds=0.02, energy_trials=2, idle_seconds=0.01)
    runner = Runner(CPU, settings, progress=lambda _: None, meter=meter)
    row = runner.run([case("dense", 0.0, baseline=True, fn=counted)]).rows[0]
    assert captured == [20]  # 10 ms of 0.5 ms calls per replay
    assert row["energy_loop"] == "cuda graph replay, 20 calls per replay, rotating inputs"
    assert row["energy_calls_per_trial"] % 20 == 0
    assert row["energy_joules_per_call"] == pytest.approx(0.01)  # per call, not per replay
    assert row["eager_median_ms"] == 0.9 and row["timing_method"].startswith(timing.GRAPH_CUDA)

    def broken(fn, device, calls):
        raise RuntimeError("capture invalidated")

    monkeypatch.setattr(runner_module, "cuda_graph_replayer", broken)
    row = runner.run([case("dense", 0.0, baseline=True, fn=counted)]).rows[0]
    assert row["energy_loop"].startswith("eager calls, rotating inputs (CUDA-graph capture failed: RuntimeError")
    assert row["energy_joules_per_call"] == pytest.approx(0.01)


def test_time_interleaved_runs_the_contenders_round_robin():
    calls = []
    fns = [lambda i=i: calls.append(i) for i in range(3)]
    out = timing.time_interleaved(fns, rounds=4, rep_ms=0.0, min_calls=1)
    # every round is one burst of each contender in turn (one call each here)
    assert calls == [0, 1, 2] * 4
    assert all(t.method.startswith(timing.INTERLEAVED_CPU) and t.cpu_ms is not None for t in out)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        timing.time_interleaved(fns, rounds=0)


def test_cpu_cases_of_a_shape_are_interleaved_at_their_thread_count(monkeypatch):
    clock = FakeClock(cpu_fraction=0.25)
    monkeypatch.setattr(timing, "time", clock)
    seen = {1: [], 2: []}

    def record(shape):
        def fn(x):
            seen[shape].append(torch.get_num_threads())
            return x
        return fn

    before = torch.get_num_threads()
    cases = [case("dense", 0.004, baseline=True, threads=1, fn=clock.sleeper(0.004, record(1))),
             case("fast", 0.002, threads=1, fn=clock.sleeper(0.002, record(1))),
             case("dense", 0.001, shape=2, baseline=True, fn=clock.sleeper(0.001, record(2)), threads=2)]
    rows = {(r["provider"], r["N"]): r for r in
            run_cases(cases, CPU, Settings(warmup_ms=1, rep_ms=15, rounds=3), progress=lambda _: None).rows}
    assert torch.get_num_threads() == before  # restored after each group
    assert set(seen[1]) == {1} and set(seen[2]) == {2}
    assert rows["fast", 1]["speedup_vs_dense"] == pytest.approx(2.0, rel=1e-9)
    assert rows["fast", 1]["threads"] == 1 and "interleaved over 3 rounds" in rows["fast", 1]["timing_method"]
    # the thread's CPU time per call is read apart from the wall time: here a quarter of it
    assert rows["dense", 1]["cpu_ms"] == pytest.approx(rows["dense", 1]["median_ms"] / 4, rel=1e-9)
    assert rows["fast", 1]["cpu_speedup_vs_dense"] == pytest.approx(2.0, rel=1e-9)
