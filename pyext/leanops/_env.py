"""Leaf helpers about the process environment, shared by layers that must not import each other
(leanops.dispatch and leanops.triton). Nothing here imports another leanops module."""

from __future__ import annotations

import os


def triton_interpreter_active() -> bool:
    """True when TRITON_INTERPRET is set to something other than "" or "0": Triton then runs its
    CPU interpreter on CPU tensors instead of compiling for the GPU.

    Read at call time. Triton itself reads the variable when a @triton.jit function is defined,
    so it has to be set before leanops.triton is first imported (tests/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
