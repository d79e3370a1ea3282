"""int4 group-wise weight format: the one packed layout every int4 kernel in leanops reads.

For a weight W [N, K] (out_features N, in_features K) and a group size g (a multiple of 32 that
divides K; g == K is per-channel), with G = K // g groups per row:

  w_packed  uint8 [N, K // 2], row-major, contiguous. Byte (n, j) holds the codes of columns
            k = 2j (low nibble, bits 0-3) and k = 2j + 1 (high nibble, bits 4-7). Codes are
            unsigned, q in [0, 15].
  scales    [N, G] float16 / bfloat16 / float32, contiguous (normally the model's dtype).
  zeros     uint8 [N, G] codes in [0, 15], contiguous; or None for the symmetric format, whose
            zero point is the constant 8 (codes 0..15 mean -8..7).

  W[n, k] = (q[n, k] - z[n, k // g]) * s[n, k // g]

The product is computed in the scales' dtype: (q - z) is a small integer and exact there, so it
is a single rounding, identical in every kernel. Packing along K keeps a row's bytes contiguous
for the dot-product loop; every kernel, Triton and CUDA alike, reads this stored layout as it
is (the CUDA tensor-core kernel dequantises in registers, with no repacked copy).
"""

from __future__ import annotations

import torch

from leanops.quant.common import (
    FLOAT_DTYPES,
    ValueChecks,
    check_float_matrix,
    div_exact,
    require_at_most,
    require_positive_finite,
    safe_scale,
    value_checks,
)

SYMMETRIC_ZERO = 8
QMAX = 15


def check_group_size(group_size: int, in_features: int, name: str = "group_size") -> None:
    """ValueError unless group_size is a positive multiple of 32 that divides in_features."""
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 32 != 0:
        raise ValueError(
            f"{name} must be a positive multiple of 32 (32, 64, 128, 256, ... or in_features "
            f"for per-channel), got {group_size!r}"
        )
    if in_features % group_size != 0:
        raise ValueError(
            f"in_features (K={in_features}) must be divisible by {name}={group_size}"
        )


def check_int4(
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    *,
    names: tuple[str, str, str] = ("w_packed", "scales", "zeros"),
    checks: ValueChecks | None = None,
) -> None:
    """Check that (w_packed, scales, zeros) is a valid int4 weight in the layout above, as stored
    (a file, a state_dict): what the kernels assume and never check per call.

    w_packed: uint8 [N, K // 2]; every byte is two valid codes.
    scales: float16 / bfloat16 / float32 [N, K // group_size], positive and finite.
    zeros: None (symmetric) or uint8 [N, K // group_size] with codes in [0, 15].
    group_size: a positive multiple of 32 dividing K.
    names: how the three tensors are named in errors (e.g. "layers.0.q_proj.weight_scale").
    checks: a leanops.quant.common.ValueChecks to add the value checks to (the caller runs it);
        None: they run here.
    Raises TypeError / ValueError naming the tensor and what is allowed.
    """
    pname, sname, zname = names
    for t, name in ((w_packed, pname), (scales, sname)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise ValueError(
            f"{pname} must be uint8 [N, K/2], got {w_packed.dtype} {tuple(w_packed.shape)}"
        )
    n, k = w_packed.shape[0], w_packed.shape[1] * 2
    check_group_size(group_size, k)
    shape = (n, k // group_size)
    if scales.dtype not in FLOAT_DTYPES or tuple(scales.shape) != shape:
        raise ValueError(
            f"{sname} must be float16, bfloat16 or float32 of shape {shape} (one per group of "
            f"{group_size} inputs of {pname}), got {scales.dtype} {tuple(scales.shape)}"
        )
    if zeros is not None:
        if not isinstance(zeros, torch.Tensor):
            raise TypeError(f"{zname} must be a torch.Tensor or None, got {type(zeros).__name__}")
        if zeros.dtype != torch.uint8 or tuple(zeros.shape) != shape:
            raise ValueError(
                f"{zname} must be uint8 of shape {shape} or None (symmetric), got "
                f"{zeros.dtype} {tuple(zeros.shape)}"
            )
    with value_checks(checks) as checks:
        require_positive_finite(checks, scales, sname)
        if zeros is not None:
            require_at_most(checks, zeros, zname, QMAX)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in [0, 15], K even -> packed uint8 [N, K // 2] (low nibble = even k)."""
    if q.dtype != torch.uint8 or q.dim() != 2 or q.shape[1] % 2 != 0:
        raise ValueError(f"pack_int4: q must be uint8 [N, K] with K even, got {q.dtype} {tuple(q.shape)}")
    if bool((q > QMAX).any()):
        raise ValueError("pack_int4: codes must be in [0, 15]")
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K // 2] -> uint8 codes [N, K]; the exact inverse of pack_int4."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_int4: packed must be uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def int4_group_scales(groups32: torch.Tensor, symmetric: bool, scale_dtype: torch.dtype) -> torch.Tensor:
    """The RTN scales [N, G] (stored dtype) of weight groups32 [N, G, g] (fp32); see quantize_int4.

    Unchecked core shared by quantize_int4 and QAT (leanops.qat): no value checks, so it never
    synchronises with the GPU and traces under torch.compile."""
    if symmetric:
        return safe_scale(div_exact(groups32.abs().amax(dim=-1), 7.5), scale_dtype)
    lo = groups32.amin(dim=-1).clamp(max=0)
    hi = groups32.amax(dim=-1).clamp(min=0)
    return safe_scale(div_exact(hi - lo, QMAX), scale_dtype)


def int4_zero_points(groups32: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """RTN's asymmetric zero points of groups32 [N, G, g] (fp32) for the stored scales [N, G]:
    the code of 0.0, round(-min(w, 0) / s) clamped to [0, 15], as fp32 integers [N, G]."""
    lo = groups32.amin(dim=-1).clamp(max=0)
    return torch.round(-lo / scales.float()).clamp_(0, QMAX)


def int4_codes(
    groups32: torch.Tensor,
    scales: torch.Tensor,
    symmetric: bool,
    zeros: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Codes of groups32 [N, G, g] (fp32) for the stored scales [N, G]: (q [N, G, g], zeros
    [N, G] or None), both fp32 integers in [0, 15]. Asymmetric zero points are `zeros` [N, G]
    (integers in [0, 15], e.g. chosen by GPTQ or HQQ) or, if None, RTN's (int4_zero_points).
    Unchecked core (see int4_group_scales)."""
    s32 = scales.float()
    if symmetric:
        zeros = None
        z = SYMMETRIC_ZERO
    else:
        zeros = int4_zero_points(groups32, scales) if zeros is None else zeros.float()
        z = zeros[..., None]
    q = torch.round(groups32 / s32[..., None]) + z
    return q.clamp_(0, QMAX), zeros


def quantize_int4(
    w: torch.Tensor,
    group_size: int,
    symmetric: bool = True,
    scale_dtype: torch.dtype | None = None,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Group-wise RTN of w [N, K] -> (w_packed, scales, zeros or None) in the layout above.

    Symmetric: s = amax / 7.5 so that -amax lands on code -8 and +amax rounds to 8 and clips to 7,
    an error no larger than rounding's half step; all 16 codes are used.
    Asymmetric: the range [min(w, 0), max(w, 0)] is split into 15 steps and the zero point is the
    integer code of 0.0 (so zero is exact), as GPTQ and AWQ do.
    `scales` [N, K // group_size], if given, are used as they are (scales learnt by QAT; their
    dtype is the stored one, scale_dtype is then ignored) and must be positive and finite.
    `zeros` uint8 [N, K // group_size] in [0, 15], only with `scales` and symmetric=False, are
    the zero points to use (a calibrated grid: leanops.quant.gptq, .awq, .hqq); None computes
    RTN's for the scales. A weight that lies on the grid (scales, zeros) is encoded exactly:
    quantize_int4(dequantize_int4(p, s, z, g), g, False, scales=s, zeros=z)[0] == p.
    """
    check_float_matrix(w, "weight")
    n, k = w.shape
    check_group_size(group_size, k)
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    if scales is None:
        scales = int4_group_scales(groups, symmetric, scale_dtype or w.dtype)
    else:
        shape = (n, k // group_size)
        if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != shape:
            got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
            raise ValueError(f"scales must be a tensor of shape {shape}, got {got}")
        if scales.dtype not in FLOAT_DTYPES:
            raise ValueError(f"scales must be float16, bfloat16 or float32, got {scales.dtype}")
        with value_checks(None) as checks:
            require_positive_finite(checks, scales, "scales")
        scales = scales.detach()
    if zeros is not None:
        shape = (n, k // group_size)
        if scales is None or symmetric:
            raise ValueError("zeros can only be given with scales and symmetric=False")
        if not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8 or tuple(zeros.shape) != shape:
            got = f"{zeros.dtype} {tuple(zeros.shape)}" if isinstance(zeros, torch.Tensor) else type(zeros).__name__
            raise ValueError(f"zeros must be a uint8 tensor of shape {shape}, got {got}")
        if bool((zeros > QMAX).any()):
            raise ValueError("zeros must be codes in [0, 15]")
    q, zeros = int4_codes(groups, scales, symmetric, zeros)
    if zeros is not None:
        zeros = zeros.to(torch.uint8).contiguous()
    q = q.to(torch.uint8).reshape(n, k)
    return pack_int4(q), scales.contiguous(), zeros


def dequantize_int4_codes(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Codes q [N, K] (uint8, or fp32 integers from int4_codes) -> the dense weight [N, K] in
    scales.dtype: W = (q - z) * s, the format's definition."""
    n, k = q.shape
    q = q.reshape(n, k // group_size, group_size)
    if not q.is_floating_point():
        q = q.to(torch.int16)
    z = SYMMETRIC_ZERO if zeros is None else zeros.to(q.dtype)[..., None]
    # (q - z) is an integer in [-15, 15]: exact in every float dtype, so the multiply below is
    # the format's single rounding.
    w = (q - z).to(scales.dtype) * scales[..., None]
    return w.reshape(n, k)


def dequantize_int4(
    w_packed: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
) -> torch.Tensor:
    """The dense weight [N, K] in scales.dtype that the int4 kernels multiply by (see layout)."""
    return dequantize_int4_codes(unpack_int4(w_packed), scales, zeros, group_size)
