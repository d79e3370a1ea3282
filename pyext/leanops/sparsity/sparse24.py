"""The 2:4 compressed weight format: the one layout every 2:4 kernel in leanops reads.

A weight W [N, K] (out_features N, in_features K) is 2:4 sparse when every group of 4
consecutive inputs of a row, W[n, 4g : 4g + 4], holds at most 2 nonzeros. K must be a multiple
of 8 (one metadata byte covers two groups). The format stores exactly 2 entries per group:

  values  [N, K // 2] in the weight's dtype (float16 / bfloat16 / float32), row-major,
          contiguous. values[n, 2g] and values[n, 2g + 1] are the kept entries of group g, in K
          order: W[n, 4g + i0] and W[n, 4g + i1] with i0 < i1.
  meta    uint8 [N, K // 8], row-major, contiguous. Byte (n, j) holds groups 2j (bits 0-3) and
          2j + 1 (bits 4-7). Each 4-bit group code is i0 | (i1 << 2): bits 0-1 the in-group
          index of the first kept entry, bits 2-3 that of the second. Valid codes have i0 < i1,
          so there are six: 0x4 (0,1), 0x8 (0,2), 0xC (0,3), 0x9 (1,2), 0xD (1,3), 0xE (2,3).

  W[n, 4g + p] = values[n, 2g]      if p == i0
               = values[n, 2g + 1]  if p == i1 (and p != i0)
               = 0                  otherwise

A group with fewer than 2 nonzeros still stores 2 entries: its nonzeros first, then the lowest
free positions, with zero values (distinct indices, so the code stays valid for mma.sp). The
decompression rule above is total (an invalid code with i0 == i1 decodes as "values[2g] at i0",
the same in every kernel), so a corrupt byte can give a wrong weight but never undefined
behaviour; `check_meta` rejects such bytes where a tensor enters the library (from_linear, load,
conversions).

Bytes per weight: 2 bytes x K/2 + K/8 = 1.125 bytes per dense 16-bit entry (0.5625 of dense);
for fp32 values, 2.125 (0.53 of dense).

2:4 + int4 (the Sparse-Marlin idea): the kept values [N, K/2] are quantised with
leanops.quant.int4 (group-wise RTN, symmetric or with zero points) using group_size / 2 kept
values per group, so a group still spans `group_size` original input columns:

  values  uint8 [N, K // 4]: int4 codes of the kept values in the int4 layout (low nibble = even
          kept index), scales [N, K // group_size], zeros uint8 [N, K // group_size] or None,
  meta    uint8 [N, K // 8] as above,
  W = decompress_24(dequantize_int4(values, scales, zeros, group_size // 2), meta)

group_size must be a multiple of 64 (each group then holds a multiple of 32 kept values, the
int4 format's rule) dividing K. Bytes per dense entry: 0.25 (codes) + 0.125 (meta) + 2/g (16-bit
scales; + 1/g for zero points): 0.39 at g = 128, ~5.1x smaller than a 16-bit weight.

How the hardware wants it (for the CUDA kernels): the sparse tensor cores' mma.sp (and
mma.sp::ordered_metadata; m16n8k16 / m16n8k32 for f16/bf16 on sm_80+) take the same 4-bit code
per group of 4 16-bit inputs, i0 in the low two bits, with i0 < i1 (the six codes above): the
code itself needs no translation (Hopper's wgmma.mma_async.sp uses per-group indices too; check
its exact register layout in the PTX ISA when that kernel is written). What a
kernel changes is which thread holds which metadata word: per weight row, the K-ordered nibble
stream read as little-endian 16-bit words (4 groups = 16 input columns each) is exactly the
pre-reorder metadata of CUTLASS (and so of torch's SparseSemiStructuredTensorCUTLASS); CUTLASS
then permutes those words into its ColumnMajorInterleaved<2> layout with a 2x2 swizzle so that
each thread of an MMA fragment loads its words with one vector load (torch implements the
permutation in torch.sparse._semi_structured_conversions). `to_torch_semi_structured` below
performs that permutation. So a hand-written mma.sp kernel (leanops_C::sparse24_mm, same schema
as the op) can either assemble its metadata registers straight from this layout with 16-bit
loads (each word: one row, 16 consecutive inputs; meta is 1/8 of the value bytes, so uncoalesced
reads of it cost little), or the layer can hand it words permuted once, offline, at from_linear /
load time (plus a Marlin-style interleave of the values for ldmatrix-free loads), as the int4
layout allows for its CUDA kernels. Nothing in the stored format changes either way.

Conversion to and from PyTorch's `torch.sparse.SparseSemiStructuredTensor`:
  CUTLASS backend: values are the same bytes; meta is re-viewed as int16 words and permuted as
  above (pure PyTorch, works on any device; the matmul itself needs CUDA sm_80+). Float16 and
  bfloat16 only (torch's float32 CUTLASS variant is 1:2 sparsity, another format).
  cuSPARSELt backend: its packed tensor is opaque (torch._cslt_compress, CUDA only), so the
  conversion goes through the dense weight, exactly (decompression is exact and the dense
  weight is 2:4).
"""

from __future__ import annotations

import torch

from leanops.quant import int4 as int4_format
from leanops.quant.common import FLOAT_DTYPES, ValueChecks, first_bad, value_checks

GROUP = 4  # inputs per group
KEPT = 2  # entries stored per group
K_MULTIPLE = 8  # one meta byte = two groups of 4 inputs
VALID_CODES = (0x4, 0x8, 0xC, 0x9, 0xD, 0xE)


# ---------------------------------------------------------------------------------------------
# Checks


def check_in_features(k: int, name: str = "in_features") -> None:
    """ValueError unless k is a positive multiple of 8 (what the format can take)."""
    if not isinstance(k, int) or k <= 0 or k % K_MULTIPLE != 0:
        raise ValueError(
            f"{name} (K={k}) must be a positive multiple of 8 for the 2:4 format (groups of 4 "
            "inputs, two groups per metadata byte)"
        )


def check_int4_group_size(group_size: int, in_features: int, name: str = "group_size") -> None:
    """ValueError unless group_size suits the 2:4 + int4 format for K = in_features: a positive
    multiple of 64 dividing K (each group then holds group_size / 2 >= 32 kept values)."""
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 64 != 0:
        raise ValueError(
            f"{name} must be a positive multiple of 64 for 2:4 + int4 (each group of "
            f"{name} input columns holds {name}/2 kept values, a multiple of 32), got "
            f"{group_size!r}"
        )
    if in_features % group_size != 0:
        raise ValueError(f"in_features (K={in_features}) must be divisible by {name}={group_size}")


def _check_2d(t, name, dtypes=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype {names}; got {t.dtype}")


def check_meta(meta: torch.Tensor, name: str = "meta", *, checks: ValueChecks | None = None) -> None:
    """ValueError unless every 4-bit code of `meta` (uint8, 2-D) is one of the six valid ones
    (i0 < i1). checks: a leanops.quant.common.ValueChecks to add the value check to (the caller
    runs it); None: it runs here."""
    _check_2d(meta, name, (torch.uint8,))

    def bad():
        codes = meta_codes(meta)
        return ~((codes & 3) < (codes >> 2))

    def message():
        codes, invalid = meta_codes(meta), bad()
        n, g = (int(i) for i in invalid.nonzero()[0])
        return (
            f"{name} holds {int(invalid.sum())} invalid group code(s) (first: row {n}, group {g}, "
            f"code {int(codes[n, g]):#x}); valid codes have i0 < i1: "
            f"{', '.join(hex(c) for c in VALID_CODES)}"
        )

    with value_checks(checks) as checks:
        checks.require(bad(), message)


def _check_meta_shape(meta, name, n: int, k: int, of: str) -> None:
    _check_2d(meta, name, (torch.uint8,))
    if tuple(meta.shape) != (n, k // K_MULTIPLE):
        raise ValueError(
            f"{name} must be uint8 [N, K/8] = ({n}, {k // K_MULTIPLE}) for {of}, got "
            f"{tuple(meta.shape)}"
        )


def check_24(
    values: torch.Tensor,
    meta: torch.Tensor,
    *,
    names: tuple[str, str] = ("values", "meta"),
    checks: ValueChecks | None = None,
) -> None:
    """Check that (values, meta) is a valid 2:4 compressed weight, as stored (a file, a
    state_dict): what the kernels assume and never check per call.

    values: float16 / bfloat16 / float32 [N, K // 2], finite (compress_24 only takes finite
        weights), K a positive multiple of 8.
    meta: uint8 [N, K // 8], every group code valid (check_meta).
    names: how the two tensors are named in errors (e.g. "layers.0.q_proj.weight_values").
    checks: a leanops.quant.common.ValueChecks to add the value checks to (the caller runs it);
        None: they run here.
    Raises TypeError / ValueError naming the tensor and what is allowed.
    """
    vname, mname = names
    _check_2d(values, vname, FLOAT_DTYPES)
    n, k = values.shape[0], values.shape[1] * KEPT
    check_in_features(k, f"2 x {vname}.shape[1]")
    _check_meta_shape(meta, mname, n, k, f"{vname} of shape {tuple(values.shape)} (= [N, K/2])")

    def nonfinite():
        return ~torch.isfinite(values)

    with value_checks(checks) as checks:
        checks.require(nonfinite(), lambda: f"{vname} must be finite; {first_bad(values, nonfinite())}")
        check_meta(meta, mname, checks=checks)


def check_24_int4(
    values: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    meta: torch.Tensor,
    group_size: int,
    *,
    names: tuple[str, str, str, str] = ("values", "scales", "zeros", "meta"),
    checks: ValueChecks | None = None,
) -> None:
    """Check that (values, scales, zeros, meta) is a valid 2:4 + int4 weight, as stored.

    values: uint8 [N, K // 4], int4 codes of the kept values (every byte is valid).
    scales: float16 / bfloat16 / float32 [N, K // group_size], positive and finite.
    zeros: None (symmetric) or uint8 [N, K // group_size] with codes in [0, 15].
    meta: uint8 [N, K // 8], every group code valid (check_meta).
    group_size: a positive multiple of 64 dividing K (check_int4_group_size).
    names: how the four tensors are named in errors; checks: as for check_24.
    Raises TypeError / ValueError naming the tensor and what is allowed.
    """
    vname, sname, zname, mname = names
    _check_2d(values, vname, (torch.uint8,))
    n, k = values.shape[0], values.shape[1] * 4
    check_in_features(k, f"4 x {vname}.shape[1]")
    check_int4_group_size(group_size, k)
    _check_meta_shape(meta, mname, n, k, f"{vname} of shape {tuple(values.shape)} (= [N, K/4])")
    with value_checks(checks) as checks:
        int4_format.check_int4(
            values, scales, zeros, group_size // 2, names=(vname, sname, zname), checks=checks
        )
        check_meta(meta, mname, checks=checks)


# ---------------------------------------------------------------------------------------------
# Metadata packing


def meta_codes(meta: torch.Tensor) -> torch.Tensor:
    """uint8 meta [N, K/8] -> uint8 group codes [N, K/4] (i0 | i1 << 2), in K order."""
    return torch.stack((meta & 0xF, meta >> 4), dim=-1).reshape(meta.shape[0], meta.shape[1] * 2)


def pack_meta_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 group codes [N, K/4] (K/4 even) -> uint8 meta [N, K/8]; inverse of meta_codes."""
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def kept_indices(meta: torch.Tensor) -> torch.Tensor:
    """uint8 meta [N, K/8] -> int64 [N, K/2]: the input column of each stored value."""
    codes = meta_codes(meta).long()
    n, groups = codes.shape
    base = torch.arange(groups, device=meta.device) * GROUP
    idx = torch.stack((base + (codes & 3), base + (codes >> 2)), dim=-1)
    return idx.reshape(n, groups * KEPT)


# ---------------------------------------------------------------------------------------------
# Compression


def _keep_mask(w: torch.Tensor, mask: torch.Tensor | None, name: str) -> torch.Tensor:
    """The bool keep-mask [N, K] for w, checked to keep at most 2 of every 4 inputs."""
    if mask is None:
        keep, what = w != 0, f"{name} is not 2:4 sparse"
        hint = (
            "; prune it first (leanops.sparsity.nm_mask / prune_) or pass mask= with the entries "
            "to keep"
        )
    else:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool Tensor of shape {tuple(w.shape)}, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if tuple(mask.shape) != tuple(w.shape):
            raise ValueError(f"mask must have the shape of {name} {tuple(w.shape)}, got {tuple(mask.shape)}")
        keep, what, hint = mask.to(w.device), "mask is not 2:4", ""
    counts = keep.reshape(w.shape[0], -1, GROUP).sum(-1)
    if bool((counts > KEPT).any()):
        n, g = (int(i) for i in (counts > KEPT).nonzero()[0])
        raise ValueError(
            f"{what}: it must keep at most 2 of every 4 consecutive inputs (2:4 along "
            f"in_features), but row {n}, inputs {4 * g}..{4 * g + 3} keep {int(counts[n, g])} "
            f"({int((counts > KEPT).sum())} such group(s)){hint}"
        )
    return keep


def compress_24(
    w: torch.Tensor, mask: torch.Tensor | None = None, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2:4 weight [N, K] -> (values [N, K/2] in w's dtype, meta uint8 [N, K/8]).

    With `mask` (bool [N, K], at most 2 True per group of 4), the entries it keeps are stored and
    the others dropped (this prunes). Without, w itself must have at most 2 nonzeros per group.
    Exact: decompress_24(*compress_24(w, mask)) == where(mask, w, 0) bit for bit.
    """
    _check_2d(w, name, FLOAT_DTYPES)
    n, k = w.shape
    check_in_features(k)
    keep = _keep_mask(w, mask, name)
    keep4 = keep.reshape(n, k // GROUP, GROUP)
    # Kept positions first, then free ones, each in increasing position (a stable sort on
    # "not kept"): the first two are the group's stored slots, sorted so that i0 < i1.
    order = torch.argsort((~keep4).to(torch.uint8), dim=-1, stable=True)[..., :KEPT]
    slots = order.sort(dim=-1).values
    pruned = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))
    values = pruned.reshape(n, k // GROUP, GROUP).gather(-1, slots).reshape(n, k // 2)
    codes = slots[..., 0] | (slots[..., 1] << 2)
    return values.contiguous(), pack_meta_codes(codes)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """(values [N, K/2], meta uint8 [N, K/8]) -> the dense weight [N, K] in values' dtype, by the
    rule in the module docstring (the reference every kernel follows)."""
    _check_2d(values, "values", FLOAT_DTYPES)
    _check_2d(meta, "meta", (torch.uint8,))
    n, half = values.shape
    if tuple(meta.shape) != (n, half // 4) or half % 4 != 0:
        raise ValueError(
            f"meta must be uint8 [N, K/8] = ({n}, {half // 4}) for values of shape "
            f"{tuple(values.shape)} (= [N, K/2]); got {tuple(meta.shape)}"
        )
    codes = meta_codes(meta).long()[..., None]  # [N, G, 1]
    i0, i1 = codes & 3, codes >> 2
    v = values.reshape(n, half // 2, KEPT)
    v0, v1 = v[..., :1], v[..., 1:]
    p = torch.arange(GROUP, device=values.device)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    dense = torch.where(p == i0, v0, torch.where(p == i1, v1, zero))
    return dense.reshape(n, half * 2)


def compress_24_int4(
    w: torch.Tensor,
    group_size: int,
    symmetric: bool = True,
    mask: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    scales: torch.Tensor | None = None,
    zeros: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """A 2:4 weight [N, K] (or w with a 2:4 `mask`) -> (values uint8 [N, K/4], scales
    [N, K/group_size], zeros or None, meta uint8 [N, K/8]): the kept values RTN-quantised by
    leanops.quant.int4 with group_size / 2 kept values per group, or encoded on the given grid
    (scales, and zeros if asymmetric, [N, K/group_size]: e.g. SparseGPT's joint pass, whose
    kept values lie on it, so the codes are exactly its)."""
    _check_2d(w, "weight", FLOAT_DTYPES)
    check_in_features(w.shape[1])
    check_int4_group_size(group_size, w.shape[1])
    values, meta = compress_24(w, mask)
    packed, scales, zeros = int4_format.quantize_int4(
        values, group_size // 2, symmetric, scale_dtype=scale_dtype, scales=scales, zeros=zeros
    )
    return packed, scales, zeros, meta


def decompress_24_int4(
    values: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    meta: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """The dense weight [N, K] in scales' dtype that the 2:4 + int4 kernels multiply by."""
    kept = int4_format.dequantize_int4(values, scales, zeros, group_size // 2)
    return decompress_24(kept, meta)


# ---------------------------------------------------------------------------------------------
# PyTorch's SparseSemiStructuredTensor

# torch's per-backend shape rules for the sparse operand: (rows, cols) multiples.
_TORCH_MIN_SHAPE = {
    "cutlass": {torch.float16: (32, 64), torch.bfloat16: (32, 64)},
    "cusparselt": {torch.float16: (16, 16), torch.bfloat16: (16, 16)},
}


def default_torch_backend() -> str:
    """The backend torch.sparse.to_sparse_semi_structured would use here: cuSPARSELt unless
    SparseSemiStructuredTensor._FORCE_CUTLASS is set or torch was built without it."""
    from torch.sparse import SparseSemiStructuredTensor

    if SparseSemiStructuredTensor._FORCE_CUTLASS:
        return "cutlass"
    cusparselt = getattr(torch.backends, "cusparselt", None)
    return "cusparselt" if cusparselt is not None and cusparselt.is_available() else "cutlass"


def torch_semi_structured_unsupported(
    out_features: int, in_features: int, dtype: torch.dtype, backend: str | None = None
) -> str | None:
    """Why torch's SparseSemiStructuredTensor (backend, default: torch's choice) cannot hold a
    weight of this shape and dtype, or None."""
    backend = backend or default_torch_backend()
    if backend not in _TORCH_MIN_SHAPE:
        raise ValueError(f"backend must be 'cutlass' or 'cusparselt', got {backend!r}")
    rules = _TORCH_MIN_SHAPE[backend]
    if dtype not in rules:
        return (
            f"torch's semi-structured {backend} backend takes float16/bfloat16 weights (its "
            f"float32 variant is 1:2 sparsity, not 2:4), got {dtype}"
        )
    rows, cols = rules[dtype]
    if out_features % rows or in_features % cols:
        return (
            f"torch's semi-structured {backend} backend needs out_features a multiple of {rows} "
            f"and in_features a multiple of {cols}, got {out_features}x{in_features}"
        )
    return None


def _cutlass_offsets(rows: int, words: int, device):
    from torch.sparse._semi_structured_conversions import (
        _calculate_meta_reordering_scatter_offsets,
    )

    return _calculate_meta_reordering_scatter_offsets(rows, words, torch.int16, device)


def to_torch_semi_structured(values: torch.Tensor, meta: torch.Tensor, backend: str | None = None):
    """(values, meta) -> torch.sparse.SparseSemiStructuredTensor holding the same 2:4 weight.

    backend "cutlass": the same value bytes and the metadata words permuted into CUTLASS's
    layout (works on any device; torch's matmul with it needs CUDA sm_80+). "cusparselt":
    torch._cslt_compress of the exact dense weight (CUDA only). None: torch's own choice.
    """
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    dense_shape = (values.shape[0], values.shape[1] * 2)
    backend = backend or default_torch_backend()
    reason = torch_semi_structured_unsupported(*dense_shape, values.dtype, backend)
    if reason is not None:
        raise ValueError(f"to_torch_semi_structured: {reason}")
    if backend == "cusparselt":
        if not values.is_cuda:
            raise ValueError(
                "to_torch_semi_structured: the cuSPARSELt backend needs CUDA tensors "
                f"(torch._cslt_compress), got {values.device}; use backend='cutlass'"
            )
        return SparseSemiStructuredTensorCUSPARSELT.from_dense(decompress_24(values, meta))
    check_meta(meta)
    rows, words = meta.shape[0], meta.shape[1] // 2
    # Our bytes, two per int16 word, little-endian: word w of a row holds groups 4w..4w+3 in
    # nibbles 0..3 -- CUTLASS's pre-reorder metadata (torch's meta_n); then its permutation.
    flat = meta.contiguous().view(torch.int16).reshape(-1)
    reordered = torch.empty_like(flat)
    reordered.scatter_(0, _cutlass_offsets(rows, words, meta.device), flat)
    return SparseSemiStructuredTensorCUTLASS(
        torch.Size(dense_shape),
        packed=values.contiguous(),
        meta=reordered.view(rows, words),
        packed_t=None,
        meta_t=None,
        compressed_swizzled_bitmask=None,
        requires_grad=False,
    )


def from_torch_semi_structured(t) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.sparse.SparseSemiStructuredTensor (2-D, float16/bfloat16) -> (values, meta).

    CUTLASS: the exact inverse of to_torch_semi_structured (same bytes, same codes). cuSPARSELt:
    through its dense weight, so values and the dense weight are exact; the codes of groups with
    fewer than 2 nonzeros are this format's canonical ones.
    """
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS

    if not isinstance(t, SparseSemiStructuredTensor):
        raise TypeError(f"t must be a torch.sparse.SparseSemiStructuredTensor, got {type(t).__name__}")
    if isinstance(t, SparseSemiStructuredTensorCUTLASS) and t.packed is not None and t.meta is not None:
        if t.dtype not in (torch.float16, torch.bfloat16) or t.meta.dtype != torch.int16:
            raise ValueError(
                f"from_torch_semi_structured: CUTLASS tensors of dtype {t.dtype} are not 2:4 "
                "(only float16/bfloat16 are)"
            )
        rows, words = t.meta.shape
        flat = t.meta.reshape(-1)
        meta = flat.gather(0, _cutlass_offsets(rows, words, flat.device))
        meta = meta.view(torch.uint8).reshape(rows, words * 2).contiguous()
        check_meta(meta, "the tensor's metadata")
        return t.packed.contiguous(), meta
    return compress_24(t.to_dense().contiguous(), name="the tensor's dense weight")
