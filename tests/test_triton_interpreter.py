"""The Triton kernels (leanops.triton) run in Triton's CPU interpreter against the reference.

Every kernel goes through its public op under use_backend("triton") and is compared with the same
op under use_backend("reference"): odd M/N/K against the small interpreter tiles (ragged edges,
several tiles, the GROUP_M swizzle), both the decode path (M <= 16: split-K with SPLIT_K = 3 and
the reduce kernel, including a K slice with no tile for K of two tiles) and the tiled path,
strided activations, with and without bias, fp16/fp32 activations and scales. bf16 stays out:
the interpreter stores bf16 as raw uint16 (its tl.dot and bf16 arithmetic return garbage, its
fp32 -> bf16 cast truncates); tests/test_triton_cuda.py covers bf16 on a GPU.

What "right" means per kernel (DESIGN.md, "Tolerances that mean something"):
  quantize_per_token_int8   bit-exact codes and scales (NaN where the reference has NaN)
  int8_mm                   integer accumulation is exact; the fp32 epilogue is the reference's,
                            in its order: within 1 ulp of out_dtype (exact except bf16 here)
  int8/int4_weight_mm       error vs an fp64 evaluation of the op's definition at most 2x the
                            error of the same computation in PyTorch in x's dtype, plus 1 ulp

Outputs are poisoned: with deterministic algorithms on, torch.empty fills floats with NaN and
ints with their max, so an output element (or a split-K workspace slice) that a kernel never
writes shows up as NaN / garbage instead of passing by luck.
"""

import math

import leanops
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_2x_rule, assert_within_ulp, assert_written
from leanops import ops
from leanops.quant import dequantize_int4, quantize_int4, quantize_int8_per_channel

# The interpreter fixture skips everything that launches a kernel where the interpreter is off
# (GPU machines run this file in a separate GPU-less process, bench/gpu_check.sh). Config-rule
# tests below do not launch anything and run everywhere Triton imports.
triton = pytest.importorskip("triton")
from leanops.triton import _common as common  # noqa: E402
from leanops.triton import _matmul as matmul  # noqa: E402
from leanops.triton import int4_weight_mm as T4  # noqa: E402
from leanops.triton import int8_mm as T8  # noqa: E402
from leanops.triton import int8_weight_mm as T8W  # noqa: E402
from leanops.triton import quantize as TQ  # noqa: E402

MS = (1, 3, 17, 64)  # decode path (1, 3) and tiled path (17: one ragged M tile, 64: two tiles)


def _both(fn, *args):
    with leanops.use_backend("triton"):
        got = fn(*args)
    with leanops.use_backend("reference"):
        want = fn(*args)
    return got, want


def _activation(m, k, dtype, layout, scale=1.0):
    """x [m, k] with the given memory layout: contiguous, a column slice of a wider tensor
    (row stride > k), or the transpose of a [k, m] tensor (column-major, stride (1, m))."""
    # Convert before taking the view: .to() of a strided view would return a contiguous copy.
    if layout == "contiguous":
        x = (torch.randn(m, k) * scale).to(dtype)
    elif layout == "slice":
        x = (torch.randn(m, k + 13) * scale).to(dtype)[:, 5 : 5 + k]
    elif layout == "transposed":
        x = (torch.randn(k, m) * scale).to(dtype).t()
    else:
        raise ValueError(layout)
    assert (layout == "contiguous") == x.is_contiguous() or m == 1
    return x


def _int8_activation(m, k, layout):
    full = {"contiguous": (m, k), "slice": (m, k + 13), "transposed": (k, m)}[layout]
    a = torch.randint(-127, 128, full, dtype=torch.int8)
    return {"contiguous": a, "slice": a[:, 5 : 5 + k], "transposed": a.t()}[layout]


# ---------------------------------------------------------------------------------------------
# quantize_per_token_int8


def _assert_quantize_equal(got, want):
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} codes differ"
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [50, 129, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("smooth_dtype", [None, torch.float16, torch.float32])
def test_quantize_per_token_exact(interpreter, poisoned, m, k, dtype, smooth_dtype):
    layout = ("contiguous", "slice", "transposed")[(m + k) % 3]
    x = _activation(m, k, dtype, layout, scale=3.0)
    smooth = None if smooth_dtype is None else (torch.rand(k) + 0.5).to(smooth_dtype)
    _assert_quantize_equal(*_both(ops.quantize_per_token_int8, x, smooth))


def _special_rows(k, dtype):
    """Rows that probe the exact rules: ties (x / scale = n + 1/2 must round to even), a zero row
    (scale clamped to FLT_MIN), tiny values (fp32 subnormal scale region), NaN, +-Inf, and an
    overflow to Inf that only happens after multiplying by `smooth`."""
    rows = torch.randn(8, k, dtype=torch.float32)
    rows[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])  # amax 127 -> scale 1: ties
    rows[0, 6:] = 0.25
    rows[1] = 0.0
    rows[2] = torch.randn(k) * 1e-40 if dtype == torch.float32 else torch.randn(k) * 1e-7
    rows[3, k // 2] = float("nan")
    rows[4, 0] = float("inf")
    rows[5, -1] = float("-inf")
    rows[6] = torch.randn(k) * 1e4 if dtype == torch.float16 else torch.randn(k) * 3e38
    rows[7, :] = -3.0  # all equal: every code is -127
    return rows.to(dtype)


# The overflow to Inf is the point of row 6; numpy, under the interpreter, warns about it.
OVERFLOW_OK = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


@OVERFLOW_OK
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("k", [7, 129])
def test_quantize_per_token_special_rows(interpreter, poisoned, dtype, k):
    x = _special_rows(k, dtype)
    smooth = torch.full((k,), 4.0, dtype=torch.float32)  # row 6 overflows to inf only with smooth
    (q, s), (q_ref, s_ref) = _both(ops.quantize_per_token_int8, x, smooth)
    _assert_quantize_equal((q, s), (q_ref, s_ref))
    _assert_quantize_equal(*_both(ops.quantize_per_token_int8, x, None))
    assert s[3].isnan() and s[4].isnan() and s[5].isnan() and (q[3:6] == 0).all()
    if dtype == torch.float32:
        assert s[6].isnan()  # 3e38 * 4 overflows fp32
    assert s[1].item() == torch.finfo(torch.float32).tiny and (q[1] == 0).all()
    assert q[0, :6].tolist() == [127, 0, 2, 2, 0, -2]


@OVERFLOW_OK
@pytest.mark.parametrize("k", [50, 129, 300])
@pytest.mark.parametrize("smooth", [False, True])
def test_quantize_two_pass_matches_single_pass(interpreter, poisoned, k, smooth):
    """The row-too-long-for-registers variant (two passes over K in blocks of 32) is exactly the
    single-pass result, special rows included."""
    x = torch.cat([_special_rows(k, torch.float32), torch.randn(5, k) * 2])
    s = torch.rand(k) + 0.5 if smooth else None
    one = TQ._launch(x, s)
    two = TQ._launch(x, s, block_k=32, single_pass=False)
    _assert_quantize_equal(two, one)
    with leanops.use_backend("reference"):
        _assert_quantize_equal(two, ops.quantize_per_token_int8(x, s))


# ---------------------------------------------------------------------------------------------
# int8_mm


def _assert_int8_mm_output(got, want, dtype, exact):
    """Bit-exact where the interpreter's arithmetic allows it, else within 1 ulp of dtype."""
    assert got.dtype == want.dtype == dtype
    assert_within_ulp(got, want)
    if exact:
        diff = (got.double() - want.double()).abs()
        assert torch.equal(got, want), f"max diff {diff.max().item():.3g}"


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", [(40, 50), (33, 129), (70, 64)])
@pytest.mark.parametrize("out_dtype", [None, torch.float16, torch.float32])
def test_int8_mm(interpreter, poisoned, m, n, k, out_dtype):
    # Cycle the remaining axes over the grid instead of multiplying it out.
    i = MS.index(m) + n
    layout = ("contiguous", "slice", "transposed")[i % 3]
    scale_dtype = (torch.float16, torch.float32)[i % 2]
    bias_dtype = (None, torch.float32, torch.float16)[(i // 2) % 3]
    a = _int8_activation(m, k, layout)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    a_scale = (torch.rand(m) * 0.02 + 1e-3).to(scale_dtype)
    b_scale = (torch.rand(n) * 0.02 + 1e-3).to(scale_dtype)
    bias = None if bias_dtype is None else torch.randn(n, dtype=bias_dtype)
    got, want = _both(ops.int8_mm, a, b, a_scale, b_scale, bias, out_dtype)
    dtype = out_dtype or torch.bfloat16
    # The interpreter's fp32 -> bf16 cast truncates (the GPU rounds to nearest even): 1 ulp.
    _assert_int8_mm_output(got, want, dtype, exact=dtype != torch.bfloat16)


def test_int8_mm_extreme_accumulator(interpreter, poisoned):
    """Sums past fp32's 2**24 integer range: the int32 accumulator must hold them exactly and the
    epilogue round once (a float accumulator would drift by many units)."""
    k = 1100
    a = torch.full((3, k), -127, dtype=torch.int8)
    b = torch.full((5, k), -127, dtype=torch.int8)
    b[1, 0] = 126  # row 1 sums to 17 709 769: odd and > 2**24, so fp32 must round it
    ones = torch.ones(3), torch.ones(5)
    got, want = _both(ops.int8_mm, a, b, *ones, None, torch.float32)
    assert torch.equal(got, want)
    assert got[0, 0].item() == 127 * 127 * k
    assert got[0, 1].item() == torch.tensor(127 * 127 * (k - 1) - 127 * 126).float().item()


# ---------------------------------------------------------------------------------------------
# int8_weight_mm


def _int8_weight_case(m, n, k, dtype, scale_dtype, bias, layout):
    w, s = quantize_int8_per_channel(torch.randn(n, k))
    s = s.to(scale_dtype)
    x = _activation(m, k, dtype, layout)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, w, s, b


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", [(40, 50), (33, 129), (70, 64)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int8_weight_mm(interpreter, poisoned, m, n, k, dtype):
    i = MS.index(m) + n + k
    layout = ("contiguous", "slice", "transposed")[i % 3]
    scale_dtype = (torch.float16, torch.float32, torch.bfloat16)[i % 3]  # bf16 scales: fp32 math
    x, w, s, b = _int8_weight_case(m, n, k, dtype, scale_dtype, bias=i % 2 == 0, layout=layout)
    got, want = _both(ops.int8_weight_mm, x, w, s, b)
    assert_written(got, want)
    assert got.dtype == dtype
    ref64 = (x.double() @ w.double().t()) * s.double()
    if b is not None:
        ref64 = ref64 + b.double()
    dense = (w.float() * s.float()[:, None]).to(dtype)
    assert_2x_rule(got, ref64, F.linear(x, dense, b), dtype)


# ---------------------------------------------------------------------------------------------
# int4_weight_mm


def _int4_case(m, n, k, g, symmetric, dtype, scale_dtype, bias, layout):
    packed, scales, zeros = quantize_int4(torch.randn(n, k), g, symmetric, scale_dtype=scale_dtype)
    x = _activation(m, k, dtype, layout)
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, packed, scales, zeros, g, b


def _check_int4(x, packed, scales, zeros, g, b):
    got, want = _both(ops.int4_weight_mm, x, packed, scales, zeros, g, b)
    assert_written(got, want)
    assert got.dtype == x.dtype
    dense = dequantize_int4(packed, scales, zeros, g).to(x.dtype)  # the op's W, in x's dtype
    ref64 = x.double() @ dense.double().t()
    if b is not None:
        ref64 = ref64 + b.double()
    assert_2x_rule(got, ref64, F.linear(x, dense, b), x.dtype)
    return got


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [64, 96, 160])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_int4_weight_mm_g32(interpreter, poisoned, m, k, symmetric, dtype):
    n = 40 if k != 96 else 33
    i = MS.index(m) + k // 32 + symmetric
    layout = ("contiguous", "slice", "transposed")[i % 3]
    scale_dtype = (torch.float16, torch.float32)[i % 2]  # also scales in another dtype than x
    _check_int4(*_int4_case(m, n, k, 32, symmetric, dtype, scale_dtype, i % 2 == 1, layout))


@pytest.mark.parametrize("g,k", [(64, 128), (128, 256), (96, 192)])
@pytest.mark.parametrize("m", [3, 17])
def test_int4_weight_mm_larger_groups(interpreter, poisoned, g, k, m):
    # g = 96: a group size that is a multiple of 32 but not a power of two (3 tiles per group).
    _check_int4(*_int4_case(m, 24, k, g, g != 64, torch.float16, torch.float16, True, "slice"))


def test_int4_weight_mm_nibble_order(interpreter, poisoned):
    """A weight whose every code is its own column index mod 16: a swapped nibble order or a
    misplaced interleave changes the result, whatever the tolerance."""
    n, k, g = 8, 64, 32
    codes = (torch.arange(k) % 16).to(torch.uint8).expand(n, k).contiguous()
    from leanops.quant.int4 import pack_int4

    packed = pack_int4(codes)
    scales = torch.ones(n, k // g, dtype=torch.float32)
    x = torch.zeros(2, k, dtype=torch.float32)
    x[0, 1] = 1.0  # picks column 1 (high nibble of byte 0): code 1 - 8 = -7
    x[1, 62] = 1.0  # picks column 62 (low nibble of byte 31): code 14 - 8 = 6
    with leanops.use_backend("triton"):
        out = ops.int4_weight_mm(x, packed, scales, None, g)
    assert out[0].tolist() == [-7.0] * n and out[1].tolist() == [6.0] * n


# ---------------------------------------------------------------------------------------------
# Split-K (decode) vs unsplit, forced configs


def _cfg(base, **kw):
    return triton.Config(
        {**base.kwargs, **kw}, num_warps=base.num_warps, num_stages=base.num_stages
    )


SPLIT = matmul.INTERPRETER_SMALL  # BLOCK_M 16, SPLIT_K 3
UNSPLIT = _cfg(matmul.INTERPRETER_SMALL, SPLIT_K=1)
TILED = matmul.INTERPRETER_LARGE  # BLOCK_M 32, GROUP_M 2


@pytest.mark.parametrize("k", [64, 160, 320])
def test_split_k_matches_unsplit(interpreter, poisoned, k):
    """The split-K partials + reduce give the unsplit kernel's result: bit-exact for int8_mm
    (int32 partials), within fp32 reassociation for the weight-only kernels. K = 64 is two
    K tiles over three slices: the last slice is empty and must still write its zero partial."""
    m, n = 5, 40
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    sa, sb, bias = torch.rand(m) + 0.1, torch.rand(n) + 0.1, torch.randn(n)
    outs = [T8._launch(a, b, sa, sb, bias, torch.float32, cfg=c) for c in (SPLIT, UNSPLIT, TILED)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])

    x = torch.randn(m, k)
    w, s = quantize_int8_per_channel(torch.randn(n, k))
    outs = [T8W._launch(x, w, s, bias, cfg=c) for c in (SPLIT, UNSPLIT, TILED)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-6, atol=1e-5)

    packed, scales, zeros = quantize_int4(torch.randn(n, k), 32, False, torch.float32)
    outs = [T4._launch(x, packed, scales, zeros, 32, bias, cfg=c) for c in (SPLIT, UNSPLIT, TILED)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("m", [3, 40])
def test_real_gpu_configs_in_the_interpreter(interpreter, poisoned, m):
    """The tile arithmetic of every config keep() admits on an H100 for a small shape (GPU tile
    sizes, derived SPLIT_K, GROUP_M = 8), run through the interpreter: pipelining and layouts
    are the GPU's business, indexing and masking are checked here."""
    n, k = 100, 256
    x = torch.randn(m, k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w, s = quantize_int8_per_channel(torch.randn(n, k))
    packed, scales, zeros = quantize_int4(torch.randn(n, k), 128, False, torch.float32)
    sa, bias = torch.rand(m) + 0.1, torch.randn(n)
    cases = [
        (T8, (a, w, sa, s, bias, torch.float32), None),
        (T8W, (x, w, s, bias), None),
        (T4, (x, packed, scales, zeros, 128, bias), 128),
    ]
    for module, args, group in cases:
        named = _args(module, m, n, k, dtype=torch.float32, group=group)
        seen = set()
        for cfg in (c for c in module.FAMILY.configs if module.FAMILY.keep(c, named)):
            tiles = tuple(sorted(cfg.kwargs.items()))
            if tiles in seen:  # num_stages / num_warps mean nothing to the interpreter
                continue
            seen.add(tiles)
            got = module._launch(*args, cfg=cfg)
            with leanops.use_backend("reference"):
                want = getattr(ops, module.__name__.rsplit(".", 1)[1])(*args)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=lambda e: f"{cfg}: {e}")
        assert len(seen) >= 4


def test_split_k_is_deterministic(interpreter, poisoned):
    x = torch.randn(2, 160)
    w, s = quantize_int8_per_channel(torch.randn(50, 160))
    first = T8W._launch(x, w, s, None, cfg=SPLIT)
    assert all(torch.equal(first, T8W._launch(x, w, s, None, cfg=SPLIT)) for _ in range(2))


def test_triton_ops_pass_opcheck(interpreter):
    """Schema (no input mutation), fake-tensor and dispatch checks with the Triton kernels."""
    a = torch.randint(-127, 128, (3, 40), dtype=torch.int8)
    w, s = quantize_int8_per_channel(torch.randn(9, 40))
    packed, scales, zeros = quantize_int4(torch.randn(9, 64), 32, False, torch.float32)
    x = torch.randn(3, 40)
    cases = [
        (torch.ops.leanops.int8_mm.default,
         (a, w, torch.rand(3), s, torch.randn(9), torch.float16)),
        (torch.ops.leanops.int8_weight_mm.default, (x, w, s, None)),
        (torch.ops.leanops.int4_weight_mm.default,
         (torch.randn(3, 64), packed, scales, zeros, 32, None)),
        (torch.ops.leanops.quantize_per_token_int8.default, (x, torch.rand(40) + 0.5)),
    ]
    with leanops.use_backend("triton"):
        for op, args in cases:
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# Config rules (no kernel launches: these run with or without the interpreter)

LLAMA_7B = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)]  # (K, N)
CPU = torch.empty(0)


def _args(module, m, n, k, dtype=torch.float16, group=None):
    args = {"M": m, "N": n, "K": k, "M_BUCKET": common.m_bucket(m), "out_ptr": CPU,
            "x_ptr": torch.empty(0, dtype=dtype)}
    if group is not None:
        args["GROUP_SIZE"] = group
    return args


FAMILIES = {
    "int8_mm": (T8, None),
    "int8_weight_mm": (T8W, None),
    "int4_weight_mm_g32": (T4, 32),
    "int4_weight_mm_g128": (T4, 128),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("m", [1, 16, 17, 100, 2048])
@pytest.mark.parametrize("k,n", LLAMA_7B)
def test_keep_leaves_a_sane_config_space(family, m, k, n):
    module, group = FAMILIES[family]
    args = _args(module, m, n, k, group=group)
    kept = [c for c in module.FAMILY.configs if module.FAMILY.keep(c, args)]
    assert kept, "keep() rejected every config"
    assert len(kept) <= 24, "too many configs to tune on a cold start"
    for c in kept:
        kw = c.kwargs
        assert (kw["BLOCK_M"] == matmul.SMALL_M) == (m <= matmul.SMALL_M)
        if group is not None:
            assert group % kw["BLOCK_K"] == 0
        if m <= matmul.SMALL_M:
            # decode: >= 2 waves of an H100's SMs unless K is too short to split further
            programs = triton.cdiv(n, kw["BLOCK_N"]) * kw["SPLIT_K"]
            k_tiles = triton.cdiv(k, kw["BLOCK_K"])
            assert (
                programs >= 2 * common.NOMINAL_SMS
                or kw["SPLIT_K"] == matmul.SPLIT_K_VALUES[-1]
                or k_tiles // (2 * kw["SPLIT_K"]) < 2
            )
        else:
            assert kw["SPLIT_K"] == 1 and kw["BLOCK_M"] <= max(32, common.m_bucket(m))
    assert matmul.default_config(kept, args) in kept


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("m", [1, 17, 300])
def test_keep_tiny_shapes(family, m):
    module, group = FAMILIES[family]
    k = group or 50
    kept = [c for c in module.FAMILY.configs if module.FAMILY.keep(c, _args(module, m, 33, k, group=group))]
    assert kept and all(c.kwargs["BLOCK_N"] <= 64 for c in kept)


def test_split_k_for_llama_decode():
    # 64-wide N tiles on 4096 outputs: 64 programs alone; split 8 -> 512 programs (3.9 waves)
    assert matmul.split_k_for(64, 4096 // 128, 132) == 8
    # 11008 outputs already give 172 tiles: split 2 -> 344 programs
    assert matmul.split_k_for(172, 4096 // 128, 132) == 2
    # short K stops the split: 4 tiles of K keep >= 2 per slice only up to split 2
    assert matmul.split_k_for(8, 4, 132) == 2
    assert matmul.split_k_for(1000, 100, 132) == 1


def test_m_bucket():
    assert [common.m_bucket(m) for m in (1, 2, 3, 16, 17, 100, 4096, 100000)] == [
        1, 2, 4, 16, 32, 128, 4096, 4096,
    ]


def test_dot_precision_follows_torch():
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert common.dot_precision(torch.float32) == "ieee"
        assert common.dot_precision(torch.float16) == "tf32"  # ignored for 16-bit operands
        torch.set_float32_matmul_precision("high")
        assert common.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(prev)


def test_launcher_signatures():
    """The op layer calls these positionally and omits trailing defaults."""
    import inspect

    expected = {
        T8.int8_mm: "(a, b, a_scale, b_scale, bias=None, out_dtype=None)",
        T8W.int8_weight_mm: "(x, w, w_scale, bias=None)",
        T4.int4_weight_mm: "(x, w_packed, scales, zeros, group_size, bias=None)",
        TQ.quantize_per_token_int8: "(x, smooth=None)",
    }
    for fn, sig in expected.items():
        assert str(inspect.signature(fn)) == sig
    assert math.isclose(TQ.FLT_MIN.value, torch.finfo(torch.float32).tiny, rel_tol=0)
