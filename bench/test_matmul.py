"""pytest-benchmark view of the matmul suite: the same cases as `leanops bench matmul`.

    pytest bench/test_matmul.py --benchmark-json out.json            # Llama-7B shapes on a GPU
    pytest bench/test_matmul.py --benchmark-only -k int4_weight_mm   # one op

Without a GPU the cases use the tiny shapes and the reference path (a smoke test of the suite).
pytest-benchmark times with the wall clock, so each call is followed by a synchronize; the
device-event numbers with L2 flushing, roofline and energy come from `leanops bench matmul`.
"""

import leanops
import pytest
import torch
from leanops.bench.matmul import PROVIDERS, SHAPES, _cases

GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if GPU else "cpu")
SHAPE_SET = "llama-7b" if GPU else "tiny"
BATCHES = (1, 16, 128, 2048) if GPU else (1, 17)
BACKENDS = ([b for b in ("cuda", "triton") if leanops.backends()[b]["available"]] if GPU else ["reference"])

CASES = [
    case
    for (k, n) in SHAPES[SHAPE_SET]
    for m in BATCHES
    for case in _cases(k, n, m, torch.bfloat16 if GPU else torch.float32, DEVICE, 128, PROVIDERS, BACKENDS)
]


@pytest.mark.parametrize(
    "case", CASES, ids=[f"{c.op}-{c.provider}-M={c.m}-K={c.k}-N={c.n}" for c in CASES]
)
def test_matmul(benchmark, case):
    inputs = case.make_inputs()
    sync = torch.cuda.synchronize if GPU else (lambda: None)

    def call():
        out = case.fn(*inputs)
        sync()
        return out

    with leanops.use_backend(case.backend):
        out = benchmark(call)
    assert out.shape == (case.m, case.n) and bool(torch.isfinite(out.float()).all())
    benchmark.extra_info.update(op=case.op, provider=case.provider, M=case.m, K=case.k, N=case.n)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = case.flops / benchmark.stats.stats.median / 1e12
