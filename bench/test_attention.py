"""pytest-benchmark view of the attention suite: the same cases as `leanops bench attention`
(every SDPA backend that can run the shape, and leanops attention once it exists), causal and
not, at 1k/4k/16k tokens on a GPU or tiny sizes on a CPU."""

import pytest
import torch
from benchcase import DEVICE, DTYPE, GPU, case_id
from leanops.bench.attention import attention_cases

SIZES = dict(seqlens=(1024, 4096, 16384), heads=32, head_dim=128) if GPU else dict(seqlens=(64,), heads=2, head_dim=32)
CASES = [c for causal in (False, True) for c in attention_cases(**SIZES, causal=causal, dtype=DTYPE, device=DEVICE)]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_attention(run_case, case):
    out = run_case(case)
    d = case.dims
    assert out.shape == (d["B"], d["H"], d["Sq"], d["D"]) and bool(torch.isfinite(out.float()).all())
