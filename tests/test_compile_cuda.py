"""One torch.compile(mode="reduce-overhead", fullgraph=True) test per op family on CUDA: the
graph traces through the op's fake kernel without breaks, and its CUDA-graph replays (what
bench/NOTES.md recommends for decode) give the eager results on fresh inputs copied into the
graph's static buffers: nothing in the op's path may synchronise, allocate outside the graph's
pool in a way replay breaks, or take a host decision capture would freeze.
"""

import leanops
import pytest
import torch
from leanops import ops
from leanops.quant import quantize_int4, quantize_int8_per_channel
from leanops.sparsity import compress_24, nm_mask

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_triton")]

DEV = "cuda"
M, K, N = 16, 4096, 1024  # a decode-size batch: where graph replay pays


def _family(name):
    """(fn(x) with the weights closed over, x factory) of one op family."""
    w = torch.randn(N, K, device=DEV)
    if name == "int8":
        wq, ws = quantize_int8_per_channel(w)
        return (lambda x: ops.int8_dynamic_linear(x, wq, ws, None, None),
                lambda: torch.randn(M, K, device=DEV, dtype=torch.bfloat16))
    if name == "int4":
        packed, scales, zeros = quantize_int4(w, 128, False, torch.bfloat16)
        return (lambda x: ops.int4_weight_mm(x, packed, scales, zeros, 128, None),
                lambda: torch.randn(M, K, device=DEV, dtype=torch.bfloat16))
    if name == "sparse24":
        values, meta = compress_24(w.to(torch.bfloat16), nm_mask(w.abs()))
        return (lambda x: ops.sparse24_mm(x, values, meta, None),
                lambda: torch.randn(M, K, device=DEV, dtype=torch.bfloat16))
    assert name == "attention"
    kc, vc = (torch.randn(1, 8, 1024, 128, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    return (lambda q: leanops.attention(q, kc, vc, causal=True),
            lambda: torch.randn(1, 8, 16, 128, device=DEV, dtype=torch.bfloat16))


@pytest.mark.parametrize("family", ["int8", "int4", "sparse24", "attention"])
def test_reduce_overhead_graph_per_op_family(family):
    fn, make_x = _family(family)
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(4):  # warm-up, record, then replays
        x = make_x()
        want = fn(x)
        got = compiled(x).clone()  # the graph's output buffer is reused by the next replay
        torch.cuda.synchronize()
        assert torch.equal(got, want), f"{family}: a CUDA-graph replay differs from eager"
