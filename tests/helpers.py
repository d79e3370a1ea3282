"""Helpers shared by the test files (fixtures live in conftest.py): poisoned allocations, the
accuracy rules every kernel test is judged by, and the rule for when a missing CUDA kernel is a
failure rather than a skip."""

import contextlib
import os

import torch


@contextlib.contextmanager
def poisoned_memory():
    """Inside the block torch.empty returns memory filled with NaN (floats) or the dtype's
    maximum (ints), so an output or workspace element a kernel never writes shows up. Use it only
    around the call under test: deterministic mode makes some cuBLAS references raise."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev)
        torch.utils.deterministic.fill_uninitialized_memory = prev_fill


# ---------------------------------------------------------------------------------------------
# Accuracy rules (DESIGN.md: "Tolerances that mean something")


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One ulp of `dtype` at each |ref| (as fp64), floored at the smallest normal."""
    fi = torch.finfo(dtype)
    mag = ref.double().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


def assert_written(got, want):
    assert torch.equal(got.isnan(), want.isnan()), "NaN pattern differs: an output was not written?"


def assert_within_ulp(got, want):
    """Every element of `got` within one ulp of `want`'s dtype at `want` (same NaN pattern)."""
    assert_written(got, want)
    assert got.dtype == want.dtype
    diff = (got.double() - want.double()).abs()
    bad = diff > ulp(want, want.dtype)
    assert not bad.any(), f"{bad.sum().item()} outputs off by > 1 ulp (max {diff.max():.3g})"


def assert_2x_rule(got, ref, base, dtype, *, what="output", rel_floor=None, floor_scale=0.0,
                   finite=False):
    """flash-attention's rule: max |got - ref| <= 2 max |base - ref| + floor.

    ref is the truth (an fp64 or fp32 evaluation), base PyTorch's own result in `dtype` (the same
    computation at the same precision). floor = rel_floor x max(max |ref|, floor_scale):
    rel_floor defaults to one ulp of `dtype` at 1.0 (finfo.eps); floor_scale keeps the floor from
    vanishing where the truth is ~0 but the terms summed to it are O(floor_scale). finite: fail
    on any NaN/inf in got first (an unwritten, NaN-poisoned element, or an overflow)."""
    if finite:
        assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    ref64 = ref.double()
    err = (got.double() - ref64).abs().max().item()
    b = (base.double() - ref64).abs().max().item()
    rel = torch.finfo(dtype).eps if rel_floor is None else rel_floor
    floor = rel * max(ref64.abs().max().item(), floor_scale)
    assert err <= 2 * b + floor, (
        f"{what}: error {err:.3g} vs PyTorch {dtype} {b:.3g} (+ floor {floor:.3g})"
    )


# ---------------------------------------------------------------------------------------------
# CUDA kernels on a GPU machine


def require_cuda_kernels(*ops: str) -> None:
    """Skip without a GPU; on a GPU machine, fail unless the CUDA C++ backend can run every op
    in `ops`. A broken or missing build must not turn hundreds of kernel tests into skips. The
    two deliberate exceptions skip: LEANOPS_NO_EXTENSION=1 (installed without leanops._C on
    purpose) and a GPU older than the kernels support (sm_80)."""
    import pytest
    from leanops import dispatch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    for op in ops or (None,):
        reason = dispatch.cuda_unavailable(torch.device("cuda"), op)
        if reason is None:
            continue
        if os.environ.get("LEANOPS_NO_EXTENSION") == "1" or "leanops GPU kernels need sm_" in reason:
            pytest.skip(reason)
        pytest.fail(f"a GPU is present but the CUDA backend cannot run {op or 'anything'}: {reason}")
