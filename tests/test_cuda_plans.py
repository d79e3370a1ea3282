"""GPU-less checks of what the CUDA GEMMs decide on the host before a launch: the launch plan
(tile config, split-K, workspace, grid rows) through the test hook leanops_C::_gemm_plan (the C++
code itself, kernels/cuda/gemm_common.cuh and each kernel's plan function), and the routing rules
that keep calls the kernels cannot launch away from them. Each case here is a defect a GPU run
would otherwise have hit first: K = 0 divided by zero in plan_split_k (SIGFPE, the process dies),
M past 65535 row tiles failed the launch, and the 2:4 ops sent K = 0 to a binding that refuses it.
"""

import pytest
import torch
from leanops import dispatch, ops
from leanops.ops import int4 as int4_ops
from leanops.ops import int8 as int8_ops
from leanops.ops import sparse24 as sparse24_ops
from leanops.ops._checks import CUDA_GEMM_MAX_M

GEMMS = ("int4_weight_mm", "int8_mm")
H100_SMS = 132


@pytest.fixture(scope="module")
def plan():
    ext = dispatch.extension()
    if ext is None or not ext.with_cuda:
        pytest.skip("the plans are compiled with the CUDA kernels (leanops._C built without CUDA)")
    return torch.ops.leanops_C._gemm_plan


def _check_plan(p, k_tile, k):
    config, splits, per, workspace, m_tiles = p
    k_tiles = -(-k // k_tile)
    assert config in (0, 1, 2) and splits >= 1 and m_tiles >= 0
    if k_tiles == 0:
        assert (splits, per, workspace) == (1, 0, 0)
        return
    assert per >= 1 and splits * per >= k_tiles, "some K tiles are in no split"
    assert (splits - 1) * per < k_tiles, "an empty split (it would write zero partials)"
    assert (workspace > 0) == (splits > 1)


@pytest.mark.parametrize("op", GEMMS)
@pytest.mark.parametrize("forced_splits", [0, 1, 3, 64])
@pytest.mark.parametrize("forced_config", [-1, 0, 1, 2])
def test_k_zero_is_one_split_of_no_tiles(plan, op, forced_config, forced_splits):
    # K = 0 once divided by zero: the kernel must instead run its (empty) K loop and epilogue.
    for m, n in ((1, 4096), (100, 72), (5000, 8)):
        p = plan(op, m, n, 0, H100_SMS, forced_config, forced_splits)
        _check_plan(p, 64, 0)


@pytest.mark.parametrize("op,k_tile", [("int4_weight_mm", 64), ("int8_mm", 128)])
def test_split_k_covers_every_k_tile_once(plan, op, k_tile):
    for m in (1, 3, 16, 17, 64, 65, 1024):
        for n in (8, 200, 4096, 11008):
            for k in (32, 64, 96, 1024, 4096, 11008, 13824):
                if op == "int8_mm" and k % 16:
                    continue
                for forced in (0, 1, 2, 7, 1000):
                    p = plan(op, m, n, k, H100_SMS, -1, forced)
                    # the int4 decode config walks 128-wide K tiles, the others 64-wide
                    _check_plan(p, 128 if (op == "int4_weight_mm" and p[0] == 0) else k_tile, k)


@pytest.mark.parametrize("op", GEMMS)
def test_row_tiles_of_the_chosen_config(plan, op):
    # gridDim.y = M tiles: the large-M config's 128-row tiles up to CUDA_GEMM_MAX_M rows
    assert plan(op, CUDA_GEMM_MAX_M, 64, 64, H100_SMS)[4] == 65535
    assert plan(op, CUDA_GEMM_MAX_M + 1, 64, 64, H100_SMS)[4] == 65536  # the binding refuses this
    # a forced small config (LEANOPS_CUDA_GEMM_CONFIG=0) reaches the limit at a 16th of that M
    assert plan(op, 16 * 65535 + 1, 64, 64, H100_SMS, 0)[4] == 65536


def test_plan_hook_checks_its_arguments(plan):
    with pytest.raises(ValueError, match="op must be 'int4_weight_mm' or 'int8_mm'"):
        plan("sparse24_mm", 1, 1, 1, 1)
    with pytest.raises(ValueError, match="sm_count >= 1"):
        plan("int8_mm", 1, 1, 1, 0)


# ---------------------------------------------------------------------------------------------
# Routing rules (cuda_supports): metadata only, so CPU tensors stand in for CUDA ones. Huge M
# comes from a stride-0 expansion (no memory).


def _rows(m, k, dtype):
    return torch.zeros(1, k, dtype=dtype).expand(m, k)


@pytest.mark.parametrize("m,ok", [(CUDA_GEMM_MAX_M, True), (CUDA_GEMM_MAX_M + 1, False)])
def test_int4_and_int8_route_large_m_away_from_cuda(m, ok):
    from leanops.quant import quantize_int4

    packed, scales, zeros = quantize_int4(torch.randn(8, 64), 32, False, torch.float16)
    got = int4_ops._int4_weight_mm_cuda_supports(_rows(m, 64, torch.float16), packed, scales,
                                                 zeros, 32, None)
    assert (got is None) == ok and (ok or f"M up to {CUDA_GEMM_MAX_M}" in got)
    b = torch.zeros(8, 64, dtype=torch.int8)
    got = int8_ops._int8_mm_cuda_supports(_rows(m, 64, torch.int8), b, None, None)
    assert (got is None) == ok and (ok or f"M up to {CUDA_GEMM_MAX_M}" in got)


def test_sparse24_routes_k_zero_away_from_cuda():
    x = torch.zeros(3, 0, dtype=torch.float16)
    values = torch.zeros(5, 0, dtype=torch.float16)
    meta = torch.zeros(5, 0, dtype=torch.uint8)
    got = sparse24_ops._sparse24_mm_cuda_supports(x, values, meta, None)
    assert got is not None and "positive multiple of 64" in got
    got = sparse24_ops._sparse24_int4_mm_cuda_supports(
        x, torch.zeros(5, 0, dtype=torch.uint8), meta, torch.zeros(5, 0, dtype=torch.float16),
        None, 64, None)
    assert got is not None and "positive multiple of 64" in got


@pytest.mark.cuda
@pytest.mark.cuda_kernels("int4_weight_mm", "int8_mm")
@pytest.mark.parametrize("op", GEMMS)
def test_k_zero_on_the_gpu_returns_the_bias(op):
    """The end-to-end form of the K = 0 fix (it killed the process before): the CUDA kernel's
    empty K loop leaves the epilogue's bias (times the scales' zero product, for int8)."""
    import leanops

    dev = "cuda"
    bias = torch.randn(72, device=dev, dtype=torch.float16)
    if op == "int8_mm":
        args = (torch.zeros(5, 0, dtype=torch.int8, device=dev),
                torch.zeros(72, 0, dtype=torch.int8, device=dev), torch.rand(5, device=dev),
                torch.rand(72, device=dev), bias, torch.float16)
        fn = ops.int8_mm
    else:
        args = (torch.zeros(5, 0, dtype=torch.float16, device=dev),
                torch.zeros(72, 0, dtype=torch.uint8, device=dev),
                torch.zeros(72, 0, dtype=torch.float16, device=dev), None, 32, bias)
        fn = ops.int4_weight_mm
    with leanops.use_backend("cuda"):
        got = fn(*args)
    torch.cuda.synchronize()
    assert torch.equal(got, bias.expand(5, 72))
