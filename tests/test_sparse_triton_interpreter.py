"""The 2:4 Triton kernels (leanops.triton.sparse24_mm) in Triton's CPU interpreter against the
dense masked reference.

As tests/test_triton_interpreter.py: each kernel goes through its op under use_backend("triton")
and is judged against an fp64 evaluation of the op's definition (the decompressed weight in x's
dtype): error at most 2x that of PyTorch's same-dtype F.linear on the same weight, plus one ulp
at the largest output. Odd N, K a multiple of 8 but not of the 32-wide interpreter K tile (a
ragged 8-column tail for sparse24_mm) and not a power of two, decode (M <= 16, split-K = 3 with
the reduce) and tiled (M = 17, 64) paths, strided activations, bias or not, fp16/fp32 (the
interpreter's bf16 dot is broken: bf16 runs in tests/test_sparse_cuda.py on a GPU). Outputs are
poisoned (NaN-filled torch.empty) so an unwritten element shows.
"""

import leanops
import pytest
import torch
from gemm_checks import assert_matches_dense
from leanops import ops
from leanops.sparsity import (
    compress_24,
    compress_24_int4,
    decompress_24,
    decompress_24_int4,
    nm_mask,
)

triton = pytest.importorskip("triton")
from leanops.triton import _common as common  # noqa: E402
from leanops.triton import _matmul as matmul  # noqa: E402
from leanops.triton import sparse24_mm as TS  # noqa: E402

MS = (1, 3, 17, 64)
LAYOUTS = ("contiguous", "slice", "transposed")


def _both(fn, *args):
    with leanops.use_backend("triton"):
        got = fn(*args)
    with leanops.use_backend("reference"):
        want = fn(*args)
    return got, want


def _activation(m, k, dtype, layout):
    if layout == "contiguous":
        return torch.randn(m, k).to(dtype)
    if layout == "slice":
        return torch.randn(m, k + 13).to(dtype)[:, 5 : 5 + k]
    return torch.randn(k, m).to(dtype).t()


def _weight(n, k, dtype):
    w = torch.randn(n, k)
    return w.to(dtype), nm_mask(w.abs())


# ---------------------------------------------------------------------------------------------
# sparse24_mm


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k", [(40, 72), (33, 200), (70, 136)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_sparse24_mm(interpreter, poisoned, m, n, k, dtype):
    i = MS.index(m) + n + k // 8
    layout = LAYOUTS[i % 3]
    values_dtype = (dtype, torch.float32, torch.float16)[(i // 3) % 3]  # W converted to x's dtype
    w, mask = _weight(n, k, values_dtype)
    values, meta = compress_24(w, mask)
    x = _activation(m, k, dtype, layout)
    bias = torch.randn(n, dtype=dtype) if i % 2 == 0 else None
    got, want = _both(ops.sparse24_mm, x, values, meta, bias)
    assert_matches_dense(got, x, decompress_24(values, meta).to(dtype), bias)


def test_sparse24_mm_sparser_groups_and_special_layouts(interpreter, poisoned):
    """Groups with one or no nonzero (zero values, padded codes), every valid code."""
    n, k = 24, 200
    w, mask = _weight(n, k, torch.float32)
    mask[:, :16] = False
    mask[::3, 40:60] &= torch.rand(8, 20) < 0.5
    values, meta = compress_24(w, mask)
    x = torch.randn(5, k)
    got, _ = _both(ops.sparse24_mm, x, values, meta, None)
    assert_matches_dense(got, x, torch.where(mask, w, 0), None)


# ---------------------------------------------------------------------------------------------
# sparse24_int4_mm


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n,k,g", [(33, 192, 64), (70, 384, 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_sparse24_int4_mm(interpreter, poisoned, m, n, k, g, symmetric):
    i = MS.index(m) + n + symmetric
    dtype = (torch.float16, torch.float32)[i % 2]
    scale_dtype = (torch.float16, torch.float32, dtype)[i % 3]
    layout = LAYOUTS[(i // 2) % 3]
    w, mask = _weight(n, k, torch.float32)
    values, scales, zeros, meta = compress_24_int4(w, g, symmetric, mask, scale_dtype=scale_dtype)
    x = _activation(m, k, dtype, layout)
    bias = torch.randn(n, dtype=dtype) if i % 3 else None
    got, want = _both(ops.sparse24_int4_mm, x, values, meta, scales, zeros, g, bias)
    assert_matches_dense(got, x, decompress_24_int4(values, scales, zeros, meta, g).to(dtype), bias)


# ---------------------------------------------------------------------------------------------
# split-K, tiles, real GPU configs

SPLIT = common.config(num_stages=1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=3)
UNSPLIT = common.config(num_stages=1, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=1, SPLIT_K=1)
TILED = common.config(num_stages=1, BLOCK_M=32, BLOCK_N=32, BLOCK_K=64, GROUP_M=2, SPLIT_K=1)


@pytest.mark.parametrize("k", [64, 200])
def test_split_k_matches_unsplit(interpreter, poisoned, k):
    """Split-K partials + reduce == unsplit == tiled, within fp32 reassociation. K = 64 is two
    K tiles over three slices (an empty slice writes its zero partial); K = 200 has a ragged
    8-column tail (and BLOCK_K = 64 in the tiled config: a 8-column tail too)."""
    m, n = 5, 40
    w, mask = _weight(n, k, torch.float32)
    values, meta = compress_24(w, mask)
    x, bias = torch.randn(m, k), torch.randn(n)
    outs = [TS._launch(x, values, meta, bias, cfg=c) for c in (SPLIT, UNSPLIT, TILED)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-6, atol=1e-5)
    if k % 64 == 0:
        packed, scales, zeros, meta4 = compress_24_int4(w, 64, False, mask, torch.float32)
        outs = [TS._launch_int4(x, packed, meta4, scales, zeros, 64, bias, cfg=c)
                for c in (SPLIT, UNSPLIT, TILED)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(outs[0], outs[2], rtol=1e-6, atol=1e-5)


def test_split_k_is_deterministic(interpreter, poisoned):
    w, mask = _weight(50, 160, torch.float32)
    values, meta = compress_24(w, mask)
    x = torch.randn(2, 160)
    first = TS._launch(x, values, meta, None, cfg=SPLIT)
    assert all(torch.equal(first, TS._launch(x, values, meta, None, cfg=SPLIT)) for _ in range(2))


def _args(m, n, k, dtype=torch.float16, group=None, values_dtype=None):
    args = {"M": m, "N": n, "K": k, "M_BUCKET": common.m_bucket(m), "out_ptr": torch.empty(0),
            "x_ptr": torch.empty(0, dtype=dtype),
            "values_ptr": torch.empty(0, dtype=values_dtype or dtype)}
    if group is not None:
        args["GROUP_SIZE"] = group
    return args


@pytest.mark.parametrize("m", [3, 40])
def test_real_gpu_configs_in_the_interpreter(interpreter, poisoned, m):
    """Every distinct tile config keep() admits on an H100 for a small shape, through the
    interpreter: indexing, masking and the expansion at GPU tile sizes (N = 60 keeps BLOCK_N <=
    64, the interpreter's time goes with the tile area)."""
    n, k = 60, 256
    w, mask = _weight(n, k, torch.float32)
    values, meta = compress_24(w, mask)
    packed, scales, zeros, meta4 = compress_24_int4(w, 128, False, mask, torch.float32)
    x, bias = torch.randn(m, k), torch.randn(n)
    cases = [
        (TS.FAMILY.configs, TS.FAMILY.keep, _args(m, n, k, torch.float32), TS._launch, (x, values, meta, bias),
         ops.sparse24_mm),
        (TS.INT4_FAMILY.configs, TS.INT4_FAMILY.keep, _args(m, n, k, torch.float32, group=128),
         TS._launch_int4, (x, packed, meta4, scales, zeros, 128, bias), ops.sparse24_int4_mm),
    ]
    for configs, keep, named, launch, args, op in cases:
        seen = set()
        for cfg in (c for c in configs if keep(c, named)):
            tiles = tuple(sorted(cfg.kwargs.items()))
            if tiles in seen:
                continue
            seen.add(tiles)
            got = launch(*args, cfg=cfg)
            with leanops.use_backend("reference"):
                want = op(*args)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4, msg=lambda e: f"{cfg}: {e}")
        assert len(seen) >= 4


@pytest.mark.parametrize("m", [1, 16, 17, 2048])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 11008), (11008, 4096)])
@pytest.mark.parametrize("group", [None, 128])
def test_keep_leaves_a_sane_config_space(m, k, n, group):
    if group is None:
        configs, keep, args = TS.FAMILY.configs, TS.FAMILY.keep, _args(m, n, k)
    else:
        configs, keep, args = TS.INT4_FAMILY.configs, TS.INT4_FAMILY.keep, _args(m, n, k, group=group)
    kept = [c for c in configs if keep(c, args)]
    assert kept and len(kept) <= 24
    for c in kept:
        assert (c.kwargs["BLOCK_M"] == matmul.SMALL_M) == (m <= matmul.SMALL_M)
        if group is not None:
            assert group % c.kwargs["BLOCK_K"] == 0
    assert matmul.default_config(kept, args) in kept


def test_launcher_signatures():
    import inspect

    assert str(inspect.signature(TS.sparse24_mm)) == "(x, values, meta, bias=None)"
    assert str(inspect.signature(TS.sparse24_int4_mm)) == (
        "(x, values, meta, scales, zeros, group_size, bias=None)"
    )
