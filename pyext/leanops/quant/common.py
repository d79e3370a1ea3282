"""Pieces shared by every quantisation format: input checks, safe scales, the error measure."""

from __future__ import annotations

import math

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
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{name} contains {bad} NaN or Inf value(s); quantisation needs finite values"
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
