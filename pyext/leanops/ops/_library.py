"""The `leanops` op namespace. Public op schemas live in Python, next to their fake kernels and
autograd formulas (one module per op family in this package), so the ops exist even when the
compiled extension does not load; the C++ kernels register under the private namespace
`leanops_C` and are reached through leanops.dispatch.OpBackends."""

import torch

LIB = torch.library.Library("leanops", "DEF")


def register(name: str, schema: str, impl) -> None:
    """Define leanops::<name> and route CPU and CUDA calls to `impl` (which picks a backend)."""
    LIB.define(f"{name}{schema}")
    LIB.impl(name, impl, "CPU")
    LIB.impl(name, impl, "CUDA")
