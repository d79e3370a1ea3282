"""Shared by the pytest-benchmark suites in bench/: every test is one `leanops.bench.runner.Case`,
the same cases `leanops bench` runs, timed by pytest-benchmark (wall clock, a synchronize after
each call on a GPU). Device-event timing with L2 flushing, CUDA-graph replay, roofline and energy
come from `leanops bench`; these suites are for pytest-benchmark's comparisons and JSON.

    pytest bench/ --benchmark-json out.json        # GPU sizes on a GPU, tiny ones on a CPU
    pytest bench/ --collect-only -q                # what CI checks

(The helpers live in benchcase.py, not here: a second module named `conftest` would clash with
tests/conftest.py when both folders are collected in one run.)
"""

import leanops
import pytest
import torch
from leanops.bench.runner import cannot_run

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
DTYPE = torch.bfloat16 if GPU else torch.float32


def case_id(case) -> str:
    return f"{case.op}-{case.provider}-{case.shape}".replace(" ", "_")


@pytest.fixture
def run_case(benchmark):
    """run_case(case) -> the output of one call, after benchmarking the call."""

    def run(case):
        if case.skip:
            pytest.skip(case.skip)
        sync = torch.cuda.synchronize if GPU else (lambda: None)
        try:
            with leanops.use_backend(case.backend):
                inputs = case.make_inputs()

                def call():
                    out = case.fn(*inputs)
                    sync()
                    return out

                out = benchmark(call)
        except Exception as exc:
            if cannot_run(case, exc):
                pytest.skip(f"cannot run here: {type(exc).__name__}: {exc}")
            raise
        benchmark.extra_info.update(op=case.op, provider=case.provider, backend=case.backend,
                                    shape=case.shape, dtype=str(case.dtype), flops=case.flops)
        if benchmark.stats is not None:  # None under --benchmark-disable
            benchmark.extra_info["tflops"] = case.flops / benchmark.stats.stats.median / 1e12
        return out

    return run
