"""Helpers shared by the test files (fixtures live in conftest.py)."""

import contextlib

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
