"""Small odd-shaped calls of every GPU kernel through every GPU backend that has it, compared
with the reference. bench/gpu_check.sh runs this file under compute-sanitizer (memcheck), so it
stays small: what it looks for is out-of-bounds and uninitialised accesses at ragged edges."""

import leanops
import pytest
import torch
from leanops import ops
from leanops.quant import quantize_int4, quantize_int8_per_channel

pytestmark = [pytest.mark.cuda, pytest.mark.sanitize]

SHAPES = [(1, 33, 64), (3, 72, 96), (17, 40, 160)]  # (M, N, K): ragged against every tile


def _gpu_backends(op):
    report = leanops.backends()
    names = []
    if report["triton"]["available"]:
        names.append("triton")
    if op in report["cuda"]["ops"] and report["cuda"]["available"]:
        names.append("cuda")
    if not names:
        pytest.skip(f"no GPU backend can run {op} here")
    return names


def _calls(m, n, k):
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w, ws = quantize_int8_per_channel(torch.randn(n, k, device=dev))
    packed, scales, zeros = quantize_int4(torch.randn(n, k, device=dev), 32, False, torch.bfloat16)
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16)
    xq, xs = ops.quantize_per_token_int8(x)
    return {
        "quantize_per_token_int8": lambda: ops.quantize_per_token_int8(x, torch.rand(k, device=dev) + 0.5),
        "int8_mm": lambda: ops.int8_mm(xq, w, xs, ws, bias, torch.bfloat16),
        "int8_weight_mm": lambda: ops.int8_weight_mm(x, w, ws, bias),
        "int4_weight_mm": lambda: ops.int4_weight_mm(x, packed, scales, zeros, 32, bias),
    }


@pytest.mark.parametrize("op", ["quantize_per_token_int8", "int8_mm", "int8_weight_mm", "int4_weight_mm"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gpu_kernels_on_ragged_shapes(op, m, n, k):
    calls = _calls(m, n, k)
    with leanops.use_backend("reference"):
        expected = calls[op]()
    for backend in _gpu_backends(op):
        with leanops.use_backend(backend):
            got = calls[op]()
        torch.cuda.synchronize()
        if op == "quantize_per_token_int8":
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), backend
        else:
            torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2, msg=backend)
