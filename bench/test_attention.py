"""pytest-benchmark view of the attention suite: the same cases as `leanops bench attention`
(every SDPA backend that can run the shape, leanops attention and leanops int8 attention), causal
and not, forward, backward and forward + backward, at 1k/4k/16k tokens and head dims 64 and 128
on a GPU, or tiny sizes on a CPU."""

import pytest
import torch
from benchcase import DEVICE, DTYPE, GPU, case_id
from leanops.bench.attention import PASSES, attention_cases

SIZES = ([dict(seqlens=(1024, 4096, 16384), heads=32, head_dim=d) for d in (64, 128)] if GPU
         else [dict(seqlens=(64,), heads=2, head_dim=32)])
CASES = [c for sizes in SIZES for causal in (False, True)
         for c in attention_cases(**sizes, causal=causal, dtype=DTYPE, device=DEVICE, passes=PASSES)]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_attention(run_case, case):
    out = run_case(case)
    d = case.dims
    outs = out if isinstance(out, tuple) else (out,)  # backward passes: (dq, dk, dv)
    assert len(outs) == (1 if case.op == "attention" else 3)
    for t in outs:
        assert t.shape == (d["B"], d["H"], d["Sq"], d["D"]) and bool(torch.isfinite(t.float()).all())
