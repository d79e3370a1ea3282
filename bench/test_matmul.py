"""pytest-benchmark view of the matmul suite: the same cases as `leanops bench matmul`.

    pytest bench/test_matmul.py --benchmark-json out.json            # Llama-7B shapes on a GPU
    pytest bench/test_matmul.py --benchmark-only -k int4_weight_mm   # one op

Without a GPU the cases use the tiny shapes and the reference path (a smoke test of the suite).
"""

import pytest
import torch
from benchcase import DEVICE, DTYPE, GPU, case_id
from leanops.bench.matmul import default_backends, suite_cases

CASES = suite_cases("llama-7b" if GPU else "tiny", (1, 16, 128, 2048) if GPU else (1, 17), DTYPE, DEVICE,
                    backends=default_backends(DEVICE))


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matmul(run_case, case):
    out = run_case(case)
    m, n = case.dims["M"], case.dims["N"]
    assert out.shape == (m, n) and bool(torch.isfinite(out.float()).all())
