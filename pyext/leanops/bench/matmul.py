"""The matmul suite: every leanops matmul backend against the dense baselines a user would
otherwise call, on LLM linear-layer shapes, in one run so ratios compare like with like.

Providers (`--providers`):
  dense                  F.linear in 16 bits (cuBLAS): the baseline every row is compared with
  int4_weight_mm         leanops W4A16, per backend
  int8_weight_mm         leanops W8A16, per backend
  int8_mm                leanops W8A8 with the dequantisation fused, per backend
  int8_dynamic_linear    leanops per-token quantisation + int8_mm, per backend
  torch_int_mm           torch._int_mm + a separate dequantisation (CUDA, M > 16)
  torch_semi_structured  torch.sparse.to_sparse_semi_structured of a 2:4-pruned weight + F.linear
                         (CUDA sm_80+, fp16/bf16)
  sparse24_mm            leanops 2:4 sparse (16-bit kept values), per backend, where it exists
  sparse24_int4_mm       leanops 2:4 sparse with int4 kept values, per backend, where it exists
  PyTorch's native CPU quantised kernels (the contenders on a CPU; skipped elsewhere):
  torch_weight_int8pack  torch._weight_int8pack_mm (W8A16)
  torch_weight_int4pack  torch._weight_int4pack_mm_for_cpu on its own packing of the int4 weight
                         (derived once, outside the timing)
  torch_w8a8             W8A8 from torch ops: per-token quantisation + torch._int_mm + scales
  torch_dynamic_qlinear  torch.ao.nn.quantized.dynamic.Linear (fbgemm/oneDNN prepacked weight,
                         per-tensor dynamic activations; fp32 in and out)
  torchao                torchao's int8 weight-only and int8 dynamic quantize_ (if installed)

FLOPs are 2MNK for every provider (dense-equivalent for the 2:4 ones: the work the user gets
done); minimum bytes are each input read once and the output written once, in its own format.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

import leanops
from leanops.bench.runner import Case
from leanops.quant import quantize_int4, quantize_int8_per_channel, quantize_per_token_int8

# (K, N) = (in_features, out_features) of the distinct linear layers of each model.
SHAPES = {
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)],
    "llama-13b": [(5120, 5120), (5120, 13824), (13824, 5120), (5120, 15360)],
    "llama-7b-quick": [(4096, 4096), (4096, 11008)],  # `leanops bench` on a GPU
    "tiny": [(256, 384), (384, 256)],  # seconds on a CPU: smoke tests of the suite itself
    "quick": [(384, 256)],  # --quick
}
PROVIDERS = (
    "dense",
    "int4_weight_mm",
    "int8_weight_mm",
    "int8_mm",
    "int8_dynamic_linear",
    "torch_int_mm",
    "torch_semi_structured",
    "sparse24_mm",
    "sparse24_int4_mm",
    "torch_weight_int8pack",
    "torch_weight_int4pack",
    "torch_w8a8",
    "torch_dynamic_qlinear",
    "torchao",
)


def default_backends(device: torch.device) -> list[str]:
    """Every leanops backend that can run on `device`, measured separately (on a CPU: the C++
    CPU kernels, or the reference where the extension is missing)."""
    if device.type == "cpu":
        return ["cpu"] if leanops.backends()["cpu"]["available"] else ["reference"]
    if device.type != "cuda":
        return ["reference"]
    report = leanops.backends()
    return [b for b in ("cuda", "triton") if report[b]["available"]] or ["reference"]


def _min_bytes(op: str, m: int, k: int, n: int, act_bytes: int, group_size: int) -> float:
    """Each input read once, the output written once (the fused ideal; baselines that make more
    passes are measured against the same floor)."""
    out = act_bytes * m * n
    return {
        "dense": act_bytes * (m * k + n * k) + out,
        "int4_weight_mm": act_bytes * m * k + n * k / 2 + act_bytes * n * (k // group_size) + out,
        "int8_weight_mm": act_bytes * m * k + n * k + 4 * n + out,
        "int8_mm": m * k + n * k + 4 * (m + n) + out,
        "int8_dynamic_linear": act_bytes * m * k + n * k + 4 * n + out,
        # 2:4: half the values plus 2-bit indices of the kept ones (NK/8 bytes)
        "sparse24_mm": act_bytes * m * k + act_bytes * n * k / 2 + n * k / 8 + out,
        # 2:4 + int4: half the values at 4 bits, indices, one scale per group_size inputs
        "sparse24_int4_mm": act_bytes * m * k + n * k / 4 + n * k / 8 + act_bytes * n * (k // group_size) + out,
    }[op]


def prune_2_4(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude weights of every 4 consecutive inputs (per output row)."""
    n, k = w.shape
    groups = w.reshape(n, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(n, k)


def _semi_structured_skip(device: torch.device, dtype: torch.dtype, k: int) -> str | None:
    if device.type != "cuda":
        return "torch semi-structured sparsity needs a CUDA GPU (sm_80+)"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 0):
        return f"torch semi-structured sparsity needs sm_80+, this GPU is sm_{cap[0]}{cap[1]}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"torch semi-structured sparsity runs fp16/bf16 here, not {dtype}"
    if k % 4:
        return f"K={k} is not a multiple of 4 (2:4 groups)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this torch has no torch.sparse.to_sparse_semi_structured"
    return None


def _leanops_sparse24(op_name: str, packer_name: str) -> tuple[Callable | None, Callable | None, str | None]:
    """Hook for leanops' own 2:4 kernels (built alongside; never imported unconditionally):
    (op, packer, None), or (None, None, why they are not benchmarked). The packers live in
    leanops.sparsity (compress_24, compress_24_int4); `_sparse24_inputs` maps their outputs to
    the ops' arguments, in one place to adjust if those signatures change."""
    op = getattr(leanops.ops, op_name, None)
    if op is None:
        return None, None, f"leanops.ops.{op_name} does not exist yet"
    try:
        sparsity = importlib.import_module("leanops.sparsity")
    except ImportError as exc:
        return None, None, f"leanops.sparsity cannot be imported ({exc})"
    packer = getattr(sparsity, packer_name, None)
    if packer is None:
        return None, None, f"leanops.sparsity.{packer_name} does not exist"
    return op, packer, None


def _sparse24_inputs(provider: str, packer: Callable, w_pruned: torch.Tensor, group_size: int) -> tuple:
    """Arguments after x: sparse24_mm(x, values, meta); sparse24_int4_mm(x, values, meta,
    scales, zeros, group_size)."""
    if provider == "sparse24_mm":
        return tuple(packer(w_pruned))
    values, scales, zeros, meta = packer(w_pruned, group_size)
    return (values, meta, scales, zeros, group_size)


def _torchao_unavailable() -> str | None:
    try:
        import torchao.quantization  # noqa: F401
    except Exception as exc:
        return f"torchao is not installed or does not import ({type(exc).__name__}: {exc})"
    return None


def _native_int4_pack(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple:
    """leanops' symmetric int4 weight in the layout of torch._weight_int4pack_mm_for_cpu: codes
    packed by torch._convert_weight_to_int4pack_for_cpu, and [K/g, N, 2] (scale, zero) with
    torch's w = (q - 8) * scale + zero (zero 0 for the symmetric format). Derived once."""
    packed, scales, _ = quantize_int4(w, group_size, symmetric=True)
    codes = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(w.shape).to(torch.int32)
    scale_zero = torch.stack((scales.t(), torch.zeros_like(scales.t())), dim=-1).to(dtype).contiguous()
    return torch._convert_weight_to_int4pack_for_cpu(codes, 8), scale_zero


def _torchao_linear(w: torch.Tensor, dynamic: bool) -> torch.nn.Module:
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    quantize_(lin, Int8DynamicActivationInt8WeightConfig() if dynamic else Int8WeightOnlyConfig())
    return lin


def matmul_cases(k: int, n: int, m: int, dtype: torch.dtype, device: torch.device, group_size: int = 128,
                 providers=PROVIDERS, backends=None, threads: int | None = None) -> list[Case]:
    """The cases of one (M, K, N), dense baseline first; inputs are built lazily (and rotated).
    `threads` (CPU): torch's thread count while they run, recorded in the shape as T."""
    backends = default_backends(device) if backends is None else backends
    act_bytes = torch.finfo(dtype).bits // 8
    dims = {"M": m, "K": k, "N": n, **({"T": threads} if threads is not None else {})}
    flops = 2.0 * m * n * k
    # Decode sizes are launch-bound: time them by CUDA-graph replay.
    small = m <= 16
    cases: list[Case] = []

    def weights_dense():
        return (torch.randn(n, k, device=device) * 0.02).to(dtype)

    def x():
        return torch.randn(m, k, device=device, dtype=dtype)

    def add(op, provider, backend, rate, make_inputs, fn, **kw):
        grouped = op in ("int4_weight_mm", "sparse24_int4_mm")
        cases.append(Case("matmul", op, provider, backend, dtype, dict(dims), flops,
                          _min_bytes(op, m, k, n, act_bytes, group_size), rate,
                          make_inputs, fn, small=small, extra={"group_size": group_size if grouped else None},
                          threads=threads, **kw))

    rate16 = "fp16" if dtype == torch.float16 else "bf16" if dtype == torch.bfloat16 else None
    if "dense" in providers:
        add("dense", "torch:F.linear", None, rate16, lambda: (x(), weights_dense()), F.linear, baseline=True)
    for backend in backends:
        tag = f"leanops:{backend}"
        if "int4_weight_mm" in providers:
            def make_int4():
                packed, scales, _ = quantize_int4(weights_dense(), group_size, symmetric=True)
                return (x(), packed, scales, None, group_size)
            add("int4_weight_mm", tag, backend, rate16, make_int4, leanops.ops.int4_weight_mm)
        if "int8_weight_mm" in providers:
            add("int8_weight_mm", tag, backend, rate16,
                lambda: (x(), *quantize_int8_per_channel(weights_dense())), leanops.ops.int8_weight_mm)
        if "int8_mm" in providers:
            def make_int8_mm():
                xq, xs = quantize_per_token_int8(x())
                w, ws = quantize_int8_per_channel(weights_dense())
                return (xq, w, xs, ws, None, dtype)
            add("int8_mm", tag, backend, "int8", make_int8_mm, leanops.ops.int8_mm)
        if "int8_dynamic_linear" in providers:
            add("int8_dynamic_linear", tag, backend, "int8",
                lambda: (x(), *quantize_int8_per_channel(weights_dense())), leanops.ops.int8_dynamic_linear)
    # torch._int_mm needs M > 16 and K, N multiples of 8 on CUDA; on a CPU (oneDNN) any shape.
    int_mm_skip = (None if device.type == "cpu" or (device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0)
                   else "torch._int_mm needs a CPU, or a CUDA GPU with M > 16 and K, N multiples of 8")
    if "torch_int_mm" in providers:
        skip = int_mm_skip

        def make_int_mm():
            xq, xs = quantize_per_token_int8(x())
            w, ws = quantize_int8_per_channel(weights_dense())
            return (xq, w.t(), xs, ws)

        def int_mm_then_dequant(xq, wt, xs, ws):
            return (torch._int_mm(xq, wt).float() * xs[:, None] * ws[None, :]).to(dtype)
        add("int8_mm", "torch:_int_mm+dequant", None, "int8", make_int_mm, int_mm_then_dequant, skip=skip)
    if "torch_semi_structured" in providers:
        def make_semi():
            w = torch.sparse.to_sparse_semi_structured(prune_2_4(weights_dense()))
            return (x(), w)
        # Shape limits of cuSPARSELt/CUTLASS are torch's to check: its errors mean "skip".
        add("sparse24_mm", "torch:semi-structured", None, rate16, make_semi, F.linear,
            skip=_semi_structured_skip(device, dtype, k), skip_on=(RuntimeError, ValueError, NotImplementedError))
    cpu_only = None if device.type == "cpu" else "a CPU kernel of PyTorch (this run is not on a CPU)"
    if "torch_weight_int8pack" in providers:
        def make_int8pack():
            w, s = quantize_int8_per_channel(weights_dense())
            return (x(), w, s.to(dtype))
        add("int8_weight_mm", "torch:_weight_int8pack_mm", None, rate16, make_int8pack,
            torch._weight_int8pack_mm, skip=cpu_only)
    if "torch_weight_int4pack" in providers:
        def make_int4pack():
            packed, scale_zero = _native_int4_pack(weights_dense(), group_size, dtype)
            return (x(), packed, group_size, scale_zero)
        add("int4_weight_mm", "torch:_weight_int4pack_mm_for_cpu", None, rate16, make_int4pack,
            torch._weight_int4pack_mm_for_cpu, skip=cpu_only)
    if "torch_w8a8" in providers:
        def make_w8a8():
            w, s = quantize_int8_per_channel(weights_dense())
            return (x(), w.t(), s)

        def w8a8(xin, wt, ws):  # what a user composes from torch ops: quantise, _int_mm, scales
            xq, xs = quantize_per_token_int8(xin)
            return (torch._int_mm(xq, wt).float() * xs[:, None] * ws[None, :]).to(xin.dtype)
        add("int8_dynamic_linear", "torch:quantise+_int_mm+scales", None, "int8", make_w8a8, w8a8,
            skip=int_mm_skip)
    if "torch_dynamic_qlinear" in providers:
        def make_qlinear():
            w, s = quantize_int8_per_channel(weights_dense())
            mod = torch.ao.nn.quantized.dynamic.Linear(k, n, bias_=False, dtype=torch.qint8)
            qw = torch.quantize_per_channel(
                w.float() * s[:, None], s.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
            mod.set_weight_bias(qw, None)
            return (mod, x())

        def qlinear(mod, xin):  # fp32 in and out: convert like a user would
            return mod(xin.float()).to(xin.dtype)
        add("int8_dynamic_linear", "torch:ao dynamic qlinear", None, "int8", make_qlinear, qlinear,
            skip=cpu_only)
    if "torchao" in providers:
        why = cpu_only or _torchao_unavailable()
        for op, label, dynamic in (("int8_weight_mm", "torchao:int8 weight-only", False),
                                   ("int8_dynamic_linear", "torchao:int8 dynamic", True)):
            add(op, label, None, "int8" if dynamic else rate16,
                lambda dynamic=dynamic: (_torchao_linear(weights_dense(), dynamic), x()),
                lambda mod, xin: mod(xin), skip=why)
    for provider, packer_name in (("sparse24_mm", "compress_24"), ("sparse24_int4_mm", "compress_24_int4")):
        if provider not in providers:
            continue
        op, packer, why = _leanops_sparse24(provider, packer_name)
        for backend in backends:
            def make_sparse24(provider=provider, packer=packer):
                return (x(), *_sparse24_inputs(provider, packer, prune_2_4(weights_dense()), group_size))
            add(provider, f"leanops:{backend}", backend, rate16, make_sparse24, op, skip=why)
            if why:
                break  # one skip line, not one per backend
    return cases


def suite_cases(shapes: str = "llama-7b", batches=(1, 16, 128, 2048), dtype: torch.dtype = torch.bfloat16,
                device: torch.device | None = None, providers=PROVIDERS, backends=None,
                group_size: int = 128, threads=None, dtypes=None) -> list[Case]:
    """Every shape x batch (x dtype x thread count) of the suite. `dtypes` (several activation
    dtypes in one run, each with its own dense baseline) overrides `dtype`; `threads` (CPU) is a
    list of thread counts, each a separate comparison."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {sorted(SHAPES)}, got {shapes!r}")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    if "dense" not in providers:
        providers = ("dense", *providers)  # ratios need the baseline of each shape
    return [c for (k, n) in SHAPES[shapes] for m in batches for dt in (dtypes or [dtype])
            for t in (threads or [None])
            for c in matmul_cases(k, n, m, dt, device, group_size, providers, backends, t)]
