"""Pieces shared by every quantisation format: input checks, checks of stored values, safe
scales, the error measure."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_float_matrix(t: torch.Tensor, name: str) -> None:
    """A 2-D floating tensor with only finite values, or a ValueError naming `name`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if t.is_meta:
        # Checked before any value is read: reading a meta tensor raises torch's own error.
        raise ValueError(
            f"{name} is on the meta device: it has a shape but no values to quantise. Load or "
            "initialise the weights first (e.g. model.to_empty(device=...) then load_state_dict), "
            "or build the empty leanops layer directly with device='meta'"
        )
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s); quantisation needs finite values"
        )


class ValueChecks:
    """Conditions on the values of stored tensors (scales, zero points, metadata codes), checked
    together so that checking many tensors on a GPU costs one synchronisation, not one each.

    `require(bad, message)` records a bool tensor marking the violating elements; `run()` reads
    every violation count back (one device-to-host copy per device) and raises ValueError with
    the first failing condition's `message()`, which is only built then. The format validators
    (leanops.quant.int4.check_int4, ...) take `checks=` to add to a caller's batch, or run their
    own at once.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[torch.Tensor, Callable[[], str]]] = []

    def require(self, bad: torch.Tensor, message: Callable[[], str]) -> None:
        """bad: bool tensor, True where an element breaks the condition (any shape, any device);
        message: builds the error text, called only if some element is bad."""
        self._pending.append((bad.sum(), message))

    def run(self) -> None:
        """Raise ValueError for the first recorded condition that some element breaks (in the
        order they were recorded), then forget them all; return None if all hold."""
        pending, self._pending = self._pending, []
        counts = [0] * len(pending)
        by_device: dict[torch.device, list[int]] = {}
        for i, (count, _) in enumerate(pending):
            by_device.setdefault(count.device, []).append(i)
        for indices in by_device.values():
            values = torch.stack([pending[i][0] for i in indices]).tolist()
            for i, value in zip(indices, values, strict=True):
                counts[i] = value
        for (_, message), count in zip(pending, counts, strict=True):
            if count:
                raise ValueError(message())


@contextlib.contextmanager
def value_checks(checks: ValueChecks | None) -> Iterator[ValueChecks]:
    """`with value_checks(checks) as c:` gives `checks` to add to (its owner runs it), or, when
    `checks` is None, a new ValueChecks that runs when the block ends: how a validator that takes
    `checks=` either joins a caller's batch or checks at once."""
    if checks is not None:
        yield checks
        return
    own = ValueChecks()
    yield own
    own.run()


def first_bad(values: torch.Tensor, bad: torch.Tensor) -> str:
    """'N element(s), the first at index (i, j): v', for an error message about the elements of
    `values` that `bad` (bool, same shape) marks."""
    index = tuple(int(i) for i in bad.nonzero()[0])
    return f"{int(bad.sum())} element(s), the first at index {index}: {values[index].item()}"


def require_positive_finite(checks: ValueChecks, t: torch.Tensor, name: str) -> None:
    """Record in `checks` that every element of the float tensor `t` (named `name` in the error)
    is finite and > 0, the rule for every stored scale."""

    def bad(t=t):
        return ~(torch.isfinite(t) & (t > 0))

    checks.require(
        bad(), lambda: f"{name} must be positive and finite everywhere; {first_bad(t, bad())}"
    )


def require_at_most(checks: ValueChecks, t: torch.Tensor, name: str, high: int) -> None:
    """Record in `checks` that every element of the unsigned integer tensor `t` is <= high."""
    checks.require(
        t > high,
        lambda: f"{name} must hold codes in [0, {high}]; {first_bad(t, t > high)} is out of range",
    )


def div_exact(t: torch.Tensor, divisor: float) -> torch.Tensor:
    """t / divisor with an IEEE division on every device. On CUDA, torch computes
    `tensor / python_number` as a multiply by the reciprocal, which differs from the division in
    the last bit of a few percent of results; the kernels (and the CPU) divide, so the reference
    must too. A same-device tensor divisor takes torch's true-division path."""
    return t / torch.full_like(t, divisor)


def safe_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale` (fp32, >= 0) rounded to the storage dtype, with no zero left in it.

    An all-zero group has scale 0; it gets 1 (any value works: its codes are all the zero point,
    so it dequantises to exact zeros). A tiny but non-zero scale that underflows in the storage
    dtype gets that dtype's smallest normal value, so dividing by it never makes Inf or NaN. The
    quantiser must divide by *this* returned scale, the one that is stored, so that dequantising
    reproduces exactly what was quantised.
    """
    stored = scale.to(dtype)
    stored = torch.where(scale == 0, torch.ones_like(stored), stored)
    return stored.clamp_min(torch.finfo(dtype).tiny)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB, torchao's 20*log10(|x| / |x - y|), in fp64."""
    x = reference.detach().double()
    err = (x - approx.detach().double()).norm().item()
    sig = x.norm().item()
    if err == 0:
        return math.inf
    return 20 * math.log10(sig / err) if sig > 0 else -math.inf
