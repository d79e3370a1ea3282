"""Small odd-shaped calls of every GPU kernel through every GPU backend that has it, compared
with the reference. bench/gpu_check.sh runs this file under compute-sanitizer (memcheck), so it
stays small: what it looks for is out-of-bounds and uninitialised accesses at ragged edges.
Triton runs one default config per shape (no_autotune): an autotuning search would compile
every candidate of every tiny shape, ~300 compiles, each slowed down by the sanitizer."""

import leanops
import pytest
import torch
from leanops import ops
from leanops.quant import quantize_int4, quantize_int8_per_channel
from leanops.sparsity import compress_24, compress_24_int4, nm_mask

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.sanitize,
    pytest.mark.usefixtures("no_autotune"),
    # the CUDA C++ kernels must be there to be checked: a broken build fails, not skips them
    pytest.mark.cuda_kernels(
        "quantize_per_token_int8", "int8_mm", "int4_weight_mm", "sparse24_mm", "sparse24_int4_mm"
    ),
]

# (M, N, K): ragged against every tile; (2, 40, 1024) takes the CUDA GEMMs' split-K path and
# (70, 136, 192) their large-M tile.
SHAPES = [(1, 33, 64), (3, 72, 96), (17, 40, 160), (2, 40, 1024), (70, 136, 192)]


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
    # 2:4: K rounded up to the CUDA kernel's multiple of 64 (64, 128, 192: partial k-tiles);
    # M and N stay ragged.
    k24 = -(-k // 64) * 64
    w24 = torch.randn(n, k24, device=dev)
    values, meta = compress_24(w24.to(torch.bfloat16), nm_mask(w24.abs()))
    # 2:4 + int4 on the same weight: group_size 64 (one group per k64 block), zero points.
    v4, s4, z4, m4 = compress_24_int4(w24, 64, False, nm_mask(w24.abs()), torch.bfloat16)
    x24 = torch.randn(m, k24, device=dev, dtype=torch.bfloat16)
    return {
        "quantize_per_token_int8": lambda: ops.quantize_per_token_int8(x, torch.rand(k, device=dev) + 0.5),
        "int8_mm": lambda: ops.int8_mm(xq, w, xs, ws, bias, torch.bfloat16),
        "int8_weight_mm": lambda: ops.int8_weight_mm(x, w, ws, bias),
        "int4_weight_mm": lambda: ops.int4_weight_mm(x, packed, scales, zeros, 32, bias),
        "sparse24_mm": lambda: ops.sparse24_mm(x24, values, meta, bias),
        "sparse24_int4_mm": lambda: ops.sparse24_int4_mm(x24, v4, m4, s4, z4, 64, bias),
    }


@pytest.mark.parametrize(
    "op",
    [
        "quantize_per_token_int8",
        "int8_mm",
        "int8_weight_mm",
        "int4_weight_mm",
        "sparse24_mm",
        "sparse24_int4_mm",
    ],
)
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
