"""Helpers shared by the test files (fixtures live in conftest.py)."""

import contextlib

import torch

# The floor of the 2x rule: one fp16 ulp (fp16) or 1e-5 (fp32) of the largest reference value.
FLOOR_2X = {torch.float16: 2.0**-10, torch.float32: 1e-5}


def assert_2x(got, ref64, base, dtype, what):
    """flash-attention's rule (DESIGN.md): the max error of `got` against the fp64 truth `ref64`
    is at most 2x that of `base` (PyTorch's same math in `dtype`) plus FLOOR_2X[dtype] times the
    largest reference value. The floor is relative to the output's magnitude, but not below 1/20
    of the O(1) inputs' scale: a gradient that is exactly zero (dq with a single visible key) is
    computed from cancelling O(1) terms, and its rounding noise is relative to those, not to
    zero."""
    assert torch.isfinite(got).all(), f"{what}: non-finite values (unwritten output?)"
    err = (got.double() - ref64).abs().max().item()
    b = (base.double() - ref64).abs().max().item()
    floor = FLOOR_2X[dtype] * max(ref64.abs().max().item(), 0.05)
    assert err <= 2 * b + floor, f"{what}: error {err:.3g} vs PyTorch {dtype} {b:.3g} (+ floor {floor:.3g})"


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
