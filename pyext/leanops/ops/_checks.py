"""Argument checks shared by the ops. Each raises ValueError naming the argument and what is
allowed. They run in the fake (meta) kernels too, so torch.compile reports bad calls at trace
time; they only look at metadata (shape, dtype, device, strides), never at values."""

from __future__ import annotations

import torch

from leanops.quant.common import FLOAT_DTYPES

UINT8 = (torch.uint8,)
# The largest M the CUDA C++ GEMMs launch (their cuda_supports rules route larger M elsewhere):
# gridDim.y, one block row per 128-row tile of their large-M configs, is at most 65535.
CUDA_GEMM_MAX_M = 65535 * 128


def cuda_gemm_m_unsupported(m: int) -> str | None:
    """Why the CUDA C++ GEMMs cannot take M = m rows (a cuda_supports reason), or None."""
    if m > CUDA_GEMM_MAX_M:
        return f"the CUDA kernel takes M up to {CUDA_GEMM_MAX_M}, got M = {m}"
    return None


def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    op: str,
    name: str,
    t,
    *,
    dtypes=None,
    dim: int | None = None,
    shape: tuple | None = None,
    contiguous: bool = False,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{op}: {name} must have dtype {_names(dtypes)}; got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{op}: {name} must be contiguous (weights and their scales are stored packed); "
            f"got strides {t.stride()} for shape {tuple(t.shape)}. Call .contiguous() once when "
            "you build it, not per call."
        )


def check_same_device(op: str, **tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(
                f"{op}: all tensors must be on one device; {first_name} is on {first} but {name} is on {dev}"
            )


def check_out_dtype(op: str, out_dtype) -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {_names(FLOAT_DTYPES)}; got {out_dtype}")


def check_group_quant_args(op: str, scales, zeros, bias, n: int, groups: int) -> None:
    """The per-group quantisation arguments of the int4 ops: scales [N, groups] float, zeros
    uint8 [N, groups] or None (symmetric), bias [N] or None; all contiguous."""
    check_tensor(op, "scales", scales, dtypes=FLOAT_DTYPES, shape=(n, groups), contiguous=True)
    if zeros is not None:
        check_tensor(op, "zeros", zeros, dtypes=UINT8, shape=(n, groups), contiguous=True)
    if bias is not None:
        check_tensor(op, "bias", bias, dtypes=FLOAT_DTYPES, shape=(n,), contiguous=True)
