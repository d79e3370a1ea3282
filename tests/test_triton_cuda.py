"""The Triton kernels compiled for the GPU, against the reference (tests/test_triton_interpreter.py
runs the same kernels in the CPU interpreter; this file adds what only a GPU shows: bf16, real
tile configs and pipelines, the autotuner, Llama-7B shapes, int64 offsets, multi-GPU launches).

Tolerances as in the interpreter tests: quantize bit-exact; int8_mm within 1 ulp of out_dtype
(fp contraction is off, so it is normally bit-exact); weight-only matmuls within 2x the error of
PyTorch's same-dtype matmul against an fp64 evaluation, plus one ulp at the largest output.

The broad sweeps run with LEANOPS_TRITON_AUTOTUNE=0 (one default config per shape: compiling the
whole search space for every shape and dtype would take most of an hour); the configs themselves
are covered by test_every_config_is_correct (each kept config, run explicitly) and the autotuner
by test_autotuned_path.
"""


import pytest
import torch
import torch.nn.functional as F
from gemm_checks import DEV, assert_int4_output, reference, run_on
from gemm_checks import int4_case as _int4_case
from gemm_checks import int8_mm_case as _int8_mm_case
from helpers import assert_2x_rule, assert_within_ulp, assert_written, poisoned_memory
from leanops import ops
from leanops.quant import quantize_int8_per_channel
from leanops.quant.int8 import quantize_per_token_int8 as quantize_reference

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("compiled_triton")]

triton = pytest.importorskip("triton")
from leanops.triton import _common as C  # noqa: E402
from leanops.triton import int4_weight_mm as T4  # noqa: E402
from leanops.triton import int8_mm as T8  # noqa: E402
from leanops.triton import int8_weight_mm as T8W  # noqa: E402
from leanops.triton import quantize as TQ  # noqa: E402

MS = (1, 3, 17, 100, 1024)
LLAMA_7B = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)]  # (K, N)
LLAMA_IDS = [f"K{k}xN{n}" for k, n in LLAMA_7B]
GROUPS = (32, 64, 128, 256)


def _triton(fn, *args):
    return run_on("triton", fn, *args)


_reference = reference


def _assert_quantize_exact(got, want):
    (q, s), (q_ref, s_ref) = got, want
    q, q_ref = q.cpu(), q_ref.cpu()
    assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} codes differ"
    torch.testing.assert_close(s.cpu(), s_ref.cpu(), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------
# Cases


def _check_int8_mm(args, fn=None):
    got = fn(*args) if fn else _triton(ops.int8_mm, *args)
    assert_within_ulp(got, _reference(ops.int8_mm, *args))
    return got


def _int8_weight_case(m, k, n, dtype, bias=True):
    w, s = quantize_int8_per_channel(torch.randn(n, k, device=DEV))
    x = torch.randn(m, k, device=DEV, dtype=dtype)
    return x, w, s, (torch.randn(n, device=DEV, dtype=dtype) if bias else None)


def _check_int8_weight(args, fn=None):
    x, w, s, b = args
    got = fn(*args) if fn else _triton(ops.int8_weight_mm, *args)
    ref64 = (x.double() @ w.double().t()) * s.double()
    if b is not None:
        ref64 = ref64 + b.double()
    assert_written(got, ref64)
    dense = (w.float() * s.float()[:, None]).to(x.dtype)
    assert_2x_rule(got, ref64, F.linear(x, dense, b), x.dtype)
    return got


def _check_int4(args, fn=None):
    got = fn(*args) if fn else _triton(ops.int4_weight_mm, *args)
    assert_int4_output(got, args)
    return got


# ---------------------------------------------------------------------------------------------
# quantize_per_token_int8


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", [50, 4096, 11008, 20000])  # 20000: past the register limit, 2 passes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_bit_exact(m, k, dtype):
    x = (torch.randn(m, k, device=DEV) * 5).to(dtype)
    smooth = None if (m + k) % 2 else (torch.rand(k, device=DEV) + 0.5).to(dtype)
    got = _triton(ops.quantize_per_token_int8, x, smooth)
    want = quantize_reference(x.cpu(), None if smooth is None else smooth.cpu())
    _assert_quantize_exact(got, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("two_pass", [False, True])
def test_quantize_special_rows(dtype, two_pass):
    """Ties, zero rows, subnormal inputs, NaN, +-Inf and overflow after smoothing on the GPU:
    div_rn, the magic-number rounding, the max reduction's NaN handling, no flush-to-zero."""
    k = 257
    rows = torch.randn(9, k) * 2
    rows[0, :6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5])
    rows[0, 6:] = 0.25
    rows[1] = 0.0
    rows[2] = torch.randn(k) * (1e-40 if dtype == torch.float32 else 1e-7)
    rows[3, 100] = float("nan")
    rows[4, 0] = float("inf")
    rows[5, -1] = float("-inf")
    rows[6] = torch.randn(k) * (3e38 if dtype == torch.float32 else 6e4)
    rows[7] = -3.0
    x = rows.to(dtype).to(DEV)
    smooth = torch.full((k,), 4.0, device=DEV)
    for s in (None, smooth):
        if two_pass:
            with poisoned_memory():
                got = TQ._launch(x, s, block_k=64, single_pass=False)
        else:
            got = _triton(ops.quantize_per_token_int8, x, s)
        _assert_quantize_exact(got, quantize_reference(x.cpu(), None if s is None else s.cpu()))
    assert got[0][0, :6].tolist() == [127, 0, 2, 2, 0, -2]


# ---------------------------------------------------------------------------------------------
# int8_mm


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", LLAMA_7B, ids=LLAMA_IDS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_mm_llama(no_autotune, m, k, n, out_dtype):
    i = MS.index(m) + n
    bias_dtype = (None, torch.bfloat16, torch.float32)[i % 3]
    scale_dtype = (torch.float32, torch.bfloat16, torch.float16)[(i // 3) % 3]
    _check_int8_mm(_int8_mm_case(m, k, n, out_dtype, bias_dtype, scale_dtype))


def test_int8_mm_default_out_dtype_and_strides(no_autotune):
    a, b, sa, sb, bias, _ = _int8_mm_case(64, 4096, 1000, None, torch.bfloat16)
    for view in (a, a.t().contiguous().t(), torch.cat([a, a], 1)[:, 7 : 7 + 4096]):
        got = _check_int8_mm((view, b, sa, sb, bias, None))
        assert got.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# int8_weight_mm


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", LLAMA_7B, ids=LLAMA_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_weight_mm_llama(no_autotune, m, k, n, dtype):
    _check_int8_weight(_int8_weight_case(m, k, n, dtype, bias=(m + n) % 2 == 0))


@pytest.mark.parametrize("m", [3, 100])
def test_int8_weight_mm_fp32_and_strides(no_autotune, m):
    x, w, s, b = _int8_weight_case(m, 4096, 1000, torch.float32)
    for view in (x, x.t().contiguous().t(), torch.cat([x, x], 1)[:, 3 : 3 + 4096]):
        _check_int8_weight((view, w, s, b))


# ---------------------------------------------------------------------------------------------
# int4_weight_mm


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n", LLAMA_7B, ids=LLAMA_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int4_weight_mm_llama(no_autotune, m, k, n, dtype):
    i = MS.index(m) + LLAMA_7B.index((k, n))
    _check_int4(_int4_case(m, k, n, GROUPS[i % 4], i % 2 == 0, dtype, bias=i % 3 != 0))


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 100])
def test_int4_weight_mm_every_group(no_autotune, g, symmetric, dtype, m):
    _check_int4(_int4_case(m, 4096, 4096, g, symmetric, dtype))


@pytest.mark.parametrize("m", [3, 100])
def test_int4_weight_mm_mixed_dtypes_and_strides(no_autotune, m):
    # fp32 scales with bf16 activations: W is rounded once in fp32, then converted to bf16.
    x, packed, scales, zeros, g, b = _int4_case(m, 4096, 1000, 128, False, torch.bfloat16,
                                                scale_dtype=torch.float32)
    for view in (x, x.t().contiguous().t(), torch.cat([x, x], 1)[:, 5 : 5 + 4096]):
        _check_int4((view, packed, scales, zeros, g, b))
    x32 = x.float()
    _check_int4((x32, packed, scales.half(), zeros, g, b.float()))


# ---------------------------------------------------------------------------------------------
# Split-K, configs, autotuner


def _cfg(base, **kw):
    return triton.Config(
        {**base.kwargs, **kw}, num_warps=base.num_warps, num_stages=base.num_stages
    )


def test_split_k_matches_unsplit():
    base = next(
        c for c in T8.FAMILY.small_configs if c.kwargs["BLOCK_N"] == 64 and c.kwargs["BLOCK_K"] == 128
    )
    m, k, n = 5, 4096, 1000
    a, b, sa, sb, bias, _ = _int8_mm_case(m, k, n, torch.float32, torch.float32)
    outs = [
        T8._launch(a, b, sa, sb, bias, torch.float32, cfg=_cfg(base, SPLIT_K=s)) for s in (1, 4, 16)
    ]
    assert all(torch.equal(outs[0], o) for o in outs[1:]), "int32 partials must reduce exactly"

    x, w, s, bias = _int8_weight_case(m, k, n, torch.float16)
    outs = [T8W._launch(x, w, s, bias, cfg=_cfg(base, SPLIT_K=sk)) for sk in (1, 4, 16)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=2e-3, atol=2e-3)
    again = T8W._launch(x, w, s, bias, cfg=_cfg(base, SPLIT_K=16))
    assert torch.equal(again, outs[2]), "split-K must be deterministic"

    args = _int4_case(m, k, n, 128, False, torch.float16)
    outs = [T4._launch(*args, cfg=_cfg(base, SPLIT_K=sk)) for sk in (1, 4, 16)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=2e-3, atol=2e-3)


def _kept(module, m, n, k, args):
    named = {"M": m, "N": n, "K": k, "M_BUCKET": C.m_bucket(m), "out_ptr": args[0],
             "x_ptr": args[0]}
    if module is T4:
        named["GROUP_SIZE"] = args[4]
    return [c for c in module.FAMILY.configs if module.FAMILY.keep(c, named)]


@pytest.mark.slow
@pytest.mark.parametrize("m", [3, 100])
def test_every_config_is_correct(m):
    """Every config keep() admits for a Llama shape, launched explicitly: the autotuner may pick
    any of them on some GPU, so each must be right (fp16 activations; bf16 goes through the
    default-config sweeps above)."""
    k, n = 4096, 4096
    cases = [
        (T8, _int8_mm_case(m, k, n, torch.bfloat16, torch.float32), _check_int8_mm),
        (T8W, _int8_weight_case(m, k, n, torch.float16), _check_int8_weight),
        (T4, _int4_case(m, k, n, 128, False, torch.float16), _check_int4),
        (T4, _int4_case(m, k, n, 32, True, torch.float16), _check_int4),
    ]
    for module, args, check in cases:
        kept = _kept(module, m, n, k, args)
        assert kept
        for cfg in kept:
            def run(*a, cfg=cfg, module=module):
                with poisoned_memory():
                    return module._launch(*a, cfg=cfg)

            try:
                check(args, fn=run)
            except Exception as exc:
                raise AssertionError(f"{module.__name__} config {cfg}: {exc}") from exc


@pytest.mark.parametrize("m", [1, 100])
def test_autotuned_path(m):
    """The autotuned launch (benchmarks kept configs, caches the winner per M bucket)."""
    k, n = 4096, 4096
    _check_int8_mm(_int8_mm_case(m, k, n, torch.bfloat16, torch.float32))
    _check_int8_weight(_int8_weight_case(m, k, n, torch.float16))
    _check_int4(_int4_case(m, k, n, 128, False, torch.float16))
    # Another M in the same bucket reuses the tuned config: no new autotuner cache entry.
    tuned = T8W.FAMILY.tuned
    entries = len(tuned.cache)
    m2 = m if m == 1 else m + 5  # 100 and 105 share the 128 bucket
    _check_int8_weight(_int8_weight_case(m2, k, n, torch.float16))
    assert len(tuned.cache) == entries


# ---------------------------------------------------------------------------------------------
# Devices and addressing


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launch_follows_the_tensor_device(no_autotune):
    """With cuda:0 current, tensors on cuda:1 must be read by a kernel running on cuda:1."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    x = torch.randn(3, 256, device=dev, dtype=torch.float16)
    w, s = quantize_int8_per_channel(torch.randn(64, 256, device=dev))
    got = _triton(ops.int8_weight_mm, x, w, s, None)
    assert got.device == dev
    _check_int8_weight((x, w, s, None))
    q, scale = _triton(ops.quantize_per_token_int8, x, None)
    _assert_quantize_exact((q, scale), quantize_reference(x.cpu()))


@pytest.mark.slow
def test_offsets_past_2_31_elements(no_autotune):
    """Activations with more than 2**31 elements: an int32 offset anywhere would wrap. Checked on
    the last rows, where the wrap would land."""
    m, k, n = 2**19 + 3, 4096, 16
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.randn(m, k, device=DEV, dtype=torch.float16)
    tail = slice(m - 5, m)
    q, scale = _triton(ops.quantize_per_token_int8, x, None)
    _assert_quantize_exact((q[tail], scale[tail]), quantize_reference(x[tail].cpu()))
    w, s = quantize_int8_per_channel(torch.randn(n, k, device=DEV))
    got = _triton(ops.int8_mm, q, w, scale, s, None, torch.float32)
    want = _reference(ops.int8_mm, q[tail], w, scale[tail], s, None, torch.float32)
    assert_within_ulp(got[tail], want)
    del q, scale
    args = _int4_case(1, k, n, 128, False, torch.float16)
    got = _triton(ops.int4_weight_mm, x, *args[1:])
    _check_int4((x[tail], *args[1:]), fn=lambda *a: got[tail])
