"""The skeleton the five Triton matmul families share (int8_mm, int8_weight_mm, int4_weight_mm,
sparse24_mm, sparse24_int4_mm), the one home for it:

- the config spaces: decode (M <= SMALL_M, split-K) and prefill tiles, the keep() predicate, the
  default config without autotuning, the interpreter configs
- jit helpers: the kernel prologue (tile ids with the GROUP_M swizzle, the K slice of a split-K
  program, offsets, the activation pointers), the epilogue (scales, bias, the masked store or
  the split-K partial store), the deterministic split-K reduce kernel, and the in-register
  int4 unpacking and dequantisation of the two int4 families
- `matmul_family`, which builds a family's configs, keep() and autotuned kernel, and
  `run_matmul`, the launcher body (path choice, workspace, reduce)

Environment and autotuning helpers shared with the other kernels are leanops.triton._common's.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from leanops.triton._common import (
    LAUNCH_OPTIONS,
    autotune,
    closest_config,
    config,
    config_kwargs,
    device_guard,
    device_limits,
    launch_config,
    m_bucket,
    next_power_of_2,
)

# ---------------------------------------------------------------------------------------------
# The matmul config spaces
#
# Two paths, picked by M:
#
# * decode (M <= SMALL_M): weight streaming. The work is reading N*K weight bytes once; the MMA
#   is nearly free. BLOCK_M is the smallest tile tl.dot takes (16) and the K loop is split into
#   SPLIT_K slices so that N/BLOCK_N * SPLIT_K programs keep every SM busy: with M = 1 and
#   N = 4096, 64-wide N tiles alone make 64 programs, under half of an H100's 132 SMs, and a
#   memory-bound kernel needs several resident programs per SM to have enough loads in flight.
#   SPLIT_K is not searched: it is derived from (BLOCK_N, BLOCK_K) and the SM count by
#   `split_k_for` (the smallest power of two giving >= 2 waves while every slice keeps >= 2 K
#   tiles for the pipeline), and keep() admits exactly that value. BLOCK_N, BLOCK_K and the
#   pipeline depth are tuned: they trade bytes in flight per program against program count.
# * prefill / training (M > SMALL_M): a classic tiled GEMM (Triton tutorial 03): 64-256 wide
#   tiles, GROUP_M = 8 swizzle so consecutive programs share B tiles in L2, warps scaled with
#   the tile area. keep() drops tiles much taller than M, wider than N, or whose pipeline does
#   not fit in shared memory.

SMALL_M = 16
SPLIT_K_VALUES = (1, 2, 4, 8, 16)
MIN_K_TILES_PER_SLICE = 2
WAVES = 2


def split_k_for(tiles_mn: int, k_tiles: int, sms: int) -> int:
    """SPLIT_K for the decode path: double it while the grid is under WAVES waves of `sms` SMs
    and each slice would still hold >= MIN_K_TILES_PER_SLICE tiles of K."""
    split = 1
    while (
        split < SPLIT_K_VALUES[-1]
        and tiles_mn * split < WAVES * sms
        and k_tiles // (2 * split) >= MIN_K_TILES_PER_SLICE
    ):
        split *= 2
    return split


def small_m_configs(block_ks, block_ns=(32, 64, 128), stages=(3, 5)) -> list[triton.Config]:
    # 4 warps: a 16-row tile gives each warp a 16 x BLOCK_N/4 MMA slab; more warps would only
    # split BLOCK_N further. 3 vs 5 stages: how many weight tiles are in flight per program.
    return [
        config(num_warps=4, num_stages=s, BLOCK_M=SMALL_M, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=1,
               SPLIT_K=sk)
        for bn in block_ns
        for bk in block_ks
        for s in stages
        for sk in SPLIT_K_VALUES
    ]


def large_m_configs(
    block_ks, block_ms=(32, 64, 128), block_ns=(64, 128, 256)
) -> list[triton.Config]:
    out = []
    for bm in block_ms:
        for bn in block_ns:
            for bk in block_ks:
                # 8 warps from 128 x 128 (or 64 x 256) up: the fp32 accumulator alone is 128
                # registers per thread at 4 warps, and the dequantised int4/int8 tile on top
                # reaches the 255 limit (measured with ptxas for sm_90). Pipeline depth is a
                # rule, not searched (it would double the tuning time for a few percent):
                # 4 stages while (BLOCK_M + BLOCK_N) * BLOCK_K <= 256 * 64 elements, 3 above,
                # which keeps 16-bit pipelines under A100's 164 KiB (keep() checks the limit).
                warps = 8 if bm * bn >= 128 * 128 else 4
                stages = 4 if (bm + bn) * bk <= 256 * 64 else 3
                out.append(config(num_warps=warps, num_stages=stages, BLOCK_M=bm, BLOCK_N=bn,
                                  BLOCK_K=bk, GROUP_M=8, SPLIT_K=1))
    return out


def smem_bytes(cfg: triton.Config, x_bytes: float, w_bytes: float) -> float:
    """Estimated shared memory of the software pipeline: num_stages copies of one X and one W
    tile (Triton buffers num_stages - 1 of them but adds layout-conversion scratch). A config
    that still does not fit fails to compile with OutOfResources, which the autotuner skips."""
    kw = cfg.kwargs
    return cfg.num_stages * kw["BLOCK_K"] * (kw["BLOCK_M"] * x_bytes + kw["BLOCK_N"] * w_bytes)


def keep_matmul(cfg: triton.Config, args: dict, *, x_bytes: float, w_bytes: float,
                valid: Callable[[triton.Config, dict], bool] | None = None) -> bool:
    """The keep() predicate of the matmul families (see the comment above).

    `valid` holds the family's hard constraints (int4: BLOCK_K divides the group size). args
    carries M, N, K, M_BUCKET and out_ptr (for the device); "_hard_only" asks for validity only.
    """
    kw = cfg.kwargs
    if valid is not None and not valid(cfg, args):
        return False
    small = args["M_BUCKET"] <= SMALL_M
    if small != (kw["BLOCK_M"] == SMALL_M and kw["GROUP_M"] == 1):
        return False
    if args.get("_hard_only"):
        return True
    n, k = args["N"], args["K"]
    sms, smem = device_limits(args["out_ptr"].device)
    if smem_bytes(cfg, x_bytes, w_bytes) > smem:
        return False
    # Tiles wider than the problem only add masked work (the smallest tiles always stay in).
    if kw["BLOCK_K"] > max(64, next_power_of_2(k)):
        return False
    if kw["BLOCK_N"] > max(32 if small else 64, next_power_of_2(n)):
        return False
    if small:
        tiles = triton.cdiv(n, kw["BLOCK_N"])
        return kw["SPLIT_K"] == split_k_for(tiles, triton.cdiv(k, kw["BLOCK_K"]), sms)
    return kw["BLOCK_M"] <= max(32, args["M_BUCKET"])


def default_config(kept: list, args: dict) -> triton.Config:
    """The config used without autotuning (leanops.triton._common.closest_config's rule) among
    the configs keep() admits for the call: decode 16 x 64 x 128, prefill min(128, M) x 128 x 64,
    both with 3 stages."""
    if args["M_BUCKET"] <= SMALL_M:
        target = {"BLOCK_M": SMALL_M, "BLOCK_N": 64, "BLOCK_K": 128}
    else:
        target = {"BLOCK_M": min(128, max(32, args["M_BUCKET"])), "BLOCK_N": 128, "BLOCK_K": 64}
    return closest_config(kept, target, stages=3)


# Interpreter configs: small tiles so odd shapes cover several tiles and masked edges, SPLIT_K=3
# so the decode path runs the reduce (and, for K of 2 tiles, a slice with no K tile at all), and
# GROUP_M=2 so the swizzle is exercised with more than one M tile.
INTERPRETER_SMALL = config(num_warps=4, num_stages=1, BLOCK_M=SMALL_M, BLOCK_N=32, BLOCK_K=32,
                           GROUP_M=1, SPLIT_K=3)
INTERPRETER_LARGE = config(num_warps=4, num_stages=1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32,
                           GROUP_M=2, SPLIT_K=1)


# ---------------------------------------------------------------------------------------------
# Matmul skeleton (jit helpers)


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program `pid` in tutorial 03's grouped order: consecutive programs walk
    down a GROUP_M-tall column of output tiles before moving to the next column, so programs
    running at the same time share their B tile and GROUP_M A row-blocks through L2 instead of
    each streaming different ones. GROUP_M = 1 is plain row-major order over N."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def k_slice(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[first, end) K-tile indices of split `pid_k`: contiguous runs of ceil(tiles / SPLIT_K)
    tiles, so every slice starts on a BLOCK_K boundary (for int4, BLOCK_K divides the group size,
    so no tile straddles two groups wherever a slice starts). Trailing slices may be empty; they
    still store their zero partial, so the reduce never reads unwritten workspace."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * per_split
    end = tl.minimum(first + per_split, k_tiles)
    return first, end


@triton.jit
def matmul_prologue(x_ptr, M, N, K, stride_xm, stride_xk, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    SPLIT_K: tl.constexpr):
    """What every matmul kernel does first: find this program's output tile (program_id(0), in
    GROUP_M order) and K slice (program_id(1)), and point at its first [BLOCK_M, BLOCK_K]
    activation tile. Returns (offs_m, offs_n, rm, rn, offs_k, k0, k_first, k_end, x_ptrs,
    x_step): the tile's int64 row / column indices, the same with rows / columns past the edge
    replaced by 0, tl.arange(0, BLOCK_K), the slice's first K index and [first, end) K-tile
    range, the activation pointers and their step per K tile."""
    pid_m, pid_n = tile_ids(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_first, k_end = k_slice(tl.program_id(1), K, BLOCK_K, SPLIT_K)
    # int64 before any stride product: offsets pass 2**31 on large activations.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Edge tiles read row 0 instead of masking: loads stay unmasked along M/N (vectorised, no
    # predicate per element) and the extra rows are dropped by the masked store.
    rm = tl.where(offs_m < M, offs_m, 0)
    rn = tl.where(offs_n < N, offs_n, 0)
    k0 = k_first.to(tl.int64) * BLOCK_K
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk
    x_step = tl.cast(stride_xk, tl.int64) * BLOCK_K
    return offs_m, offs_n, rm, rn, offs_k, k0, k_first, k_end, x_ptrs, x_step


@triton.jit
def unpack_nibbles(packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """uint8 [ROWS/2, COLS] -> its 4-bit values [ROWS, COLS] in K order, byte j holding row 2j in
    its low nibble and 2j+1 in its high nibble (leanops.quant.int4's packing, and the 2:4
    metadata's two groups per byte). join puts (low, high) of byte j side by side in a new last
    axis, the permute moves that axis next to j, and the reshape flattens (j, 2) into
    2j + {0, 1} (the unpacking of Triton's own int4 mixed-matmul test)."""
    lo = packed & 0xF
    hi = packed >> 4
    return tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 1)), (ROWS, COLS))


@triton.jit
def dequantize_int4(q, scales_ptr, zeros_ptr, sz_ptrs, g, HAS_ZEROS: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """The int4 format's (q - z) * s for codes q [*, BLOCK_N] that all lie in group g of their
    weight row (sz_ptrs: the rows' starts in scales / zeros [N, groups]); z = 8 if symmetric.
    (q - z) is an integer in [-15, 15], exact in every float dtype; the product with the scale
    is the format's single rounding, in the scales' dtype as the reference does."""
    s = tl.load(scales_ptr + sz_ptrs + g)
    if HAS_ZEROS:
        z = tl.load(zeros_ptr + sz_ptrs + g).to(tl.int8)
    else:
        z = tl.full((BLOCK_N,), 8, dtype=tl.int8)
    return (q.to(tl.int8) - z[None, :]).to(s.dtype) * s[None, :]


@triton.jit
def store_tile(out_ptr, out, offs_m, offs_n, M, N, stride_om, stride_on):
    """The matmul epilogue's store: tile `out` (fp32) rounded once to out's dtype, edge rows and
    columns masked off."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_partial(ws_ptr, acc, offs_m, offs_n, M, N, stride_ws_s):
    """Split-K: this program's unscaled partial sums into slice program_id(1) of the workspace
    [SPLIT_K, M, N] (contiguous rows of N), for _splitk_reduce_kernel to add in slice order."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ws_ptrs = (ws_ptr + tl.program_id(1).to(tl.int64) * stride_ws_s
               + offs_m[:, None] * N + offs_n[None, :])
    tl.store(ws_ptrs, acc, mask=mask)


@triton.jit
def matmul_epilogue(out_ptr, ws_ptr, row_scale_ptr, col_scale_ptr, bias_ptr, acc, offs_m, offs_n,
                    rm, rn, M, N, stride_om, stride_on, stride_ws_s, HAS_ROW_SCALE: tl.constexpr,
                    HAS_COL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """What every matmul kernel does last. Unsplit: out = acc * row scale * col scale + bias in
    fp32, in that order (the references' and _splitk_reduce_kernel's), rounded once into out.
    Split-K: the unscaled partial sums into the workspace, for the reduce to add in slice order
    and then apply this same epilogue once (int32 partials of int8_mm add exactly, so its
    split-K result is bit-identical to the unsplit one)."""
    if SPLIT_K == 1:
        out = acc.to(tl.float32)
        if HAS_ROW_SCALE:
            out = out * tl.load(row_scale_ptr + rm).to(tl.float32)[:, None]
        if HAS_COL_SCALE:
            out = out * tl.load(col_scale_ptr + rn).to(tl.float32)[None, :]
        if HAS_BIAS:
            out = out + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        store_tile(out_ptr, out, offs_m, offs_n, M, N, stride_om, stride_on)
    else:
        store_partial(ws_ptr, acc, offs_m, offs_n, M, N, stride_ws_s)


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, out_ptr, row_scale_ptr, col_scale_ptr, bias_ptr,
    N, TOTAL, stride_ws_s,
    SPLIT_K: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    # ws [SPLIT_K, M, N] and out [M, N] are contiguous, so one flat index addresses both. The
    # slices are summed in a fixed order (0, 1, ...) in the workspace's dtype: int32 partials of
    # int8_mm add exactly, fp32 ones the same way every run (no atomics, deterministic). Then the
    # epilogue of the unsplit kernel, in the reference's order: * row scale * col scale + bias.
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < TOTAL
    acc = tl.load(ws_ptr + offs, mask=mask, other=0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * stride_ws_s + offs, mask=mask, other=0)
    val = acc.to(tl.float32)
    if HAS_ROW_SCALE:
        val = val * tl.load(row_scale_ptr + offs // N, mask=mask, other=0).to(tl.float32)
    if HAS_COL_SCALE:
        val = val * tl.load(col_scale_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    if HAS_BIAS:
        val = val + tl.load(bias_ptr + offs % N, mask=mask, other=0).to(tl.float32)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


REDUCE_BLOCK = 1024


def splitk_reduce(ws, split_k, out, row_scale=None, col_scale=None, bias=None):
    """out = epilogue(sum of the first split_k slices of ws): the second half of the decode path."""
    m, n = out.shape
    total = m * n
    dummy = out
    grid = (triton.cdiv(total, REDUCE_BLOCK),)
    _splitk_reduce_kernel[grid](
        ws, out,
        dummy if row_scale is None else row_scale,
        dummy if col_scale is None else col_scale,
        dummy if bias is None else bias,
        n, total, ws.stride(0),
        SPLIT_K=split_k, HAS_ROW_SCALE=row_scale is not None,
        HAS_COL_SCALE=col_scale is not None, HAS_BIAS=bias is not None,
        BLOCK=REDUCE_BLOCK, num_warps=4, **LAUNCH_OPTIONS,
    )


# ---------------------------------------------------------------------------------------------
# The shared launcher body of the matmul families


@dataclasses.dataclass(frozen=True)
class MatmulFamily:
    """What run_matmul needs to know about one matmul kernel family.

    kernel: the @triton.heuristics-wrapped @triton.jit kernel, launched directly with a config
    (interpreter, tests); tuned: the same kernel under `autotune` over `configs` filtered by
    `keep`; ws_dtype: dtype of split-K partials; valid: hard constraints on a config for a call
    (args as in keep_matmul).
    """

    kernel: object
    tuned: object
    configs: list
    keep: Callable[[triton.Config, dict], bool]
    ws_dtype: torch.dtype
    valid: Callable[[triton.Config, dict], bool] | None = None

    @property
    def small_configs(self) -> list:
        return [
            c for c in self.configs if c.kwargs["BLOCK_M"] == SMALL_M and c.kwargs["GROUP_M"] == 1
        ]


@functools.lru_cache(maxsize=1024)
def _max_split(family_id: int, n: int, k: int, sms: int, extra: tuple) -> int:
    family = _FAMILIES[family_id]
    args = {"M": 1, "N": n, "K": k, "M_BUCKET": 1, **dict(extra)}
    best = 1
    for cfg in family.small_configs:
        if family.valid is not None and not family.valid(cfg, args):
            continue
        tiles = triton.cdiv(n, cfg.kwargs["BLOCK_N"])
        best = max(best, split_k_for(tiles, triton.cdiv(k, cfg.kwargs["BLOCK_K"]), sms))
    return best


_FAMILIES: dict[int, MatmulFamily] = {}
_DEFAULTS: dict[tuple, triton.Config] = {}


def _default_for(family: MatmulFamily, call_args: tuple, meta: dict) -> triton.Config:
    args = {**dict(zip(family.kernel.arg_names, call_args, strict=False)), **meta}
    key = (id(family), args["M_BUCKET"], args["N"], args["K"], args["out_ptr"].device,
           tuple(str(a.dtype) for a in call_args if isinstance(a, torch.Tensor)),
           tuple(sorted((k, v) for k, v in meta.items())))
    cfg = _DEFAULTS.get(key)
    if cfg is None:
        kept = [c for c in family.configs if family.keep(c, args)]
        if not kept:
            kept = [c for c in family.configs if family.keep(c, {**args, "_hard_only": True})]
        cfg = _DEFAULTS[key] = default_config(kept, args)
    return cfg


def register_family(family: MatmulFamily) -> MatmulFamily:
    _FAMILIES[id(family)] = family
    return family


def group_size_divides_block_k(cfg: triton.Config, args: dict) -> bool:
    """The hard constraint of the group-quantised families: a K tile lies in one group."""
    return args["GROUP_SIZE"] % cfg.kwargs["BLOCK_K"] == 0


def matmul_family(
    kernel,
    *,
    small_block_ks: tuple,
    large_block_ks: tuple,
    x_bytes: float | Callable[[dict], float],
    w_bytes: float | Callable[[dict], float],
    ws_dtype: torch.dtype,
    key: tuple = ("M_BUCKET", "N", "K"),
    valid: Callable[[triton.Config, dict], bool] | None = None,
) -> MatmulFamily:
    """One matmul kernel family: its configs (decode + prefill), keep() predicate, autotuned
    kernel and registration, built the same way for every family. x_bytes / w_bytes (bytes per
    activation / per dense weight entry, for the shared-memory estimate) are numbers or
    functions of the launch arguments (when they depend on the call's dtypes)."""
    configs = small_m_configs(block_ks=small_block_ks) + large_m_configs(block_ks=large_block_ks)

    def keep(cfg, args):
        xb = x_bytes(args) if callable(x_bytes) else x_bytes
        wb = w_bytes(args) if callable(w_bytes) else w_bytes
        return keep_matmul(cfg, args, x_bytes=xb, w_bytes=wb, valid=valid)

    tuned = autotune(configs, key=list(key), keep=keep)(kernel)
    return register_family(
        MatmulFamily(kernel=kernel, tuned=tuned, configs=configs, keep=keep, ws_dtype=ws_dtype,
                     valid=valid)
    )


def x_element_bytes(args: dict) -> int:
    """x_bytes of the families whose activations come in any float dtype."""
    return args["x_ptr"].element_size()


def run_matmul(
    family: MatmulFamily,
    args: tuple,
    out: torch.Tensor,
    M: int,
    N: int,
    K: int,
    strides: tuple,
    meta: dict,
    epilogue: dict,
    cfg: triton.Config | None = None,
) -> torch.Tensor:
    """Launch one of the matmul kernels, whose arguments are laid out as

        kernel(*args, out_ptr, ws_ptr, M, N, K, M_BUCKET, *strides, stride_ws_s, **meta, <config>)

    and, when the chosen config split K, reduce the workspace into `out` with `epilogue`
    (row_scale / col_scale / bias for splitk_reduce). `cfg` forces a config (tests); otherwise
    leanops.triton._common.launch_config's rule.
    """
    small = M <= SMALL_M
    tail = (M, N, K, m_bucket(M), *strides, M * N)  # everything after (out_ptr, ws_ptr)
    cfg = launch_config(cfg, INTERPRETER_SMALL if small else INTERPRETER_LARGE,
                        lambda: _default_for(family, (*args, out, None, *tail), meta))
    if cfg is not None:
        max_split = cfg.kwargs["SPLIT_K"]
    elif small:
        sms, _ = device_limits(out.device)
        extra = tuple(sorted((k, v) for k, v in meta.items() if isinstance(v, int)))
        max_split = _max_split(id(family), N, K, sms, extra)
    else:
        max_split = 1
    # Partials of every slice, [SPLIT_K, M, N] contiguous; only the decode path ever has one.
    ws = out
    if max_split > 1:
        ws = torch.empty((max_split, M, N), device=out.device, dtype=family.ws_dtype)

    # The split the kernel actually ran with: the autotuner picks the config inside the launch,
    # and the grid function is the one hook that sees it (it is called with every argument,
    # config included, before each launch: the last call is the final one after benchmarking).
    used = {}

    def grid(meta_args):
        split = meta_args["SPLIT_K"]
        if split > max_split:  # never launch past the end of the workspace
            raise RuntimeError(f"leanops.triton: SPLIT_K={split} > workspace slices {max_split}")
        used["SPLIT_K"] = split
        return (
            triton.cdiv(M, meta_args["BLOCK_M"]) * triton.cdiv(N, meta_args["BLOCK_N"]),
            meta_args["SPLIT_K"],
        )

    call_args = (*args, out, ws, *tail)
    with device_guard(out):
        if cfg is not None:
            family.kernel[grid](*call_args, **meta, **config_kwargs(cfg), **LAUNCH_OPTIONS)
        else:
            family.tuned[grid](*call_args, **meta, **LAUNCH_OPTIONS)
        if used["SPLIT_K"] > 1:
            splitk_reduce(ws, used["SPLIT_K"], out, **epilogue)
    return out
