"""The quantised-matmul benchmark: every leanops matmul backend against the dense baselines a
user would otherwise call (F.linear in 16 bits through cuBLAS, torch._int_mm + a separate
dequantisation), on LLM linear-layer shapes, in one run so ratios compare like with like."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import leanops
from leanops.bench.energy import EnergyResult, measure_energy, measure_idle_power, meter_for
from leanops.bench.roofline import Ceilings
from leanops.bench.timing import time_fn
from leanops.quant import quantize_int4, quantize_int8_per_channel, quantize_per_token_int8

# (K, N) = (in_features, out_features) of the distinct linear layers of each model.
SHAPES = {
    "llama-7b": [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 12288)],
    "llama-13b": [(5120, 5120), (5120, 13824), (13824, 5120), (5120, 15360)],
    "tiny": [(256, 384), (384, 256)],  # seconds on a CPU: smoke tests of the suite itself
}
PROVIDERS = (
    "dense",
    "int4_weight_mm",
    "int8_weight_mm",
    "int8_mm",
    "int8_dynamic_linear",
    "torch_int_mm",
)


@dataclass
class Case:
    op: str
    provider: str  # who computes: "leanops:<backend>" or the baseline's name
    backend: str | None
    m: int
    k: int
    n: int
    flops: float
    min_bytes: float
    rate: str  # the tensor-core rate that bounds the arithmetic: "bf16" or "int8"
    make_inputs: Callable[[], tuple]
    fn: Callable


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
    }[op]


def _cases(k: int, n: int, m: int, dtype: torch.dtype, device: torch.device, group_size: int,
           providers, backends) -> list[Case]:
    """One Case per (provider, backend) for this shape; inputs are built lazily (and rotated)."""
    act_bytes = torch.finfo(dtype).bits // 8
    flops = 2.0 * m * n * k
    cases = []

    def weights_dense():
        return (torch.randn(n, k, device=device) * 0.02).to(dtype)

    def add(op, provider, backend, rate, make_inputs, fn):
        cases.append(Case(op, provider, backend, m, k, n, flops,
                          _min_bytes(op, m, k, n, act_bytes, group_size), rate, make_inputs, fn))

    def x():
        return torch.randn(m, k, device=device, dtype=dtype)

    if "dense" in providers:
        add("dense", "torch:F.linear", None, "bf16", lambda: (x(), weights_dense()), F.linear)
    for backend in backends:
        tag = f"leanops:{backend}"
        if "int4_weight_mm" in providers:
            def make_int4():
                packed, scales, _ = quantize_int4(weights_dense(), group_size, symmetric=True)
                return (x(), packed, scales, None, group_size)
            add("int4_weight_mm", tag, backend, "bf16", make_int4, leanops.ops.int4_weight_mm)
        if "int8_weight_mm" in providers:
            add("int8_weight_mm", tag, backend, "bf16",
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
    # torch._int_mm needs M > 16 and K, N multiples of 8 on CUDA.
    if "torch_int_mm" in providers and device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0:
        def make_int_mm():
            xq, xs = quantize_per_token_int8(x())
            w, ws = quantize_int8_per_channel(weights_dense())
            return (xq, w.t(), xs, ws)

        def int_mm_then_dequant(xq, wt, xs, ws):
            return (torch._int_mm(xq, wt).float() * xs[:, None] * ws[None, :]).to(dtype)
        add("int8_mm", "torch:_int_mm+dequant", None, "int8", make_int_mm, int_mm_then_dequant)
    return cases


def _rotating(case: Case, device: torch.device):
    """A zero-argument callable cycling through enough input copies that, without L2 flushing
    (the energy loops), the weights are re-read from memory rather than served from L2."""
    first = case.make_inputs()
    nbytes = sum(t.numel() * t.element_size() for t in first if isinstance(t, torch.Tensor))
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    copies = [first] + [case.make_inputs() for _ in range(max(0, math.ceil(3 * l2 / max(nbytes, 1)) - 1))]
    cycle = itertools.cycle(copies)
    return lambda: case.fn(*next(cycle)), first


def run_matmul_suite(
    shapes: str = "llama-7b",
    batches=(1, 16, 128, 2048),
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | None = None,
    providers=PROVIDERS,
    backends=None,
    group_size: int = 128,
    energy: bool = False,
    energy_trials: int = 3,
    ceilings: Ceilings | None = None,
    progress: Callable[[str], None] = print,
) -> list[dict]:
    """Benchmark rows (dicts) for every shape x batch x provider. Backends default to every
    leanops backend that can run on `device`; a backend that cannot run a case is reported in
    `progress` and skipped, never silently replaced."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if shapes not in SHAPES:
        raise ValueError(f"shapes must be one of {sorted(SHAPES)}, got {shapes!r}")
    unknown = set(providers) - set(PROVIDERS)
    if unknown:
        raise ValueError(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    if backends is None:
        report = leanops.backends()
        backends = [b for b in ("cuda", "triton") if report[b]["available"]] if device.type == "cuda" else ["reference"]
    meter, idle_w = None, None
    if energy:
        meter, reason = meter_for(device)
        if meter is None:
            progress(f"energy: not measured ({reason})")
        else:
            idle_w = measure_idle_power(device, meter, seconds=2.0)  # once for the whole suite
            progress(f"energy: {meter.source}; idle power {idle_w:.1f} W")
    rows = []
    for (k, n), m in itertools.product(SHAPES[shapes], batches):
        dense_row = None
        for case in _cases(k, n, m, dtype, device, group_size, providers, backends):
            label = f"{case.op:<20} {case.provider:<22} M={m:<5} K={k:<6} N={n:<6}"
            try:
                with leanops.use_backend(case.backend):
                    fn, inputs = _rotating(case, device)
                    case.fn(*inputs)  # compile / autotune outside the timing
                    timing = time_fn(lambda: case.fn(*inputs), device)
                    joules = None
                    if energy:
                        joules = (
                            measure_energy(fn, device, meter, trials=energy_trials, idle_power_w=idle_w)
                            if meter is not None else EnergyResult.unavailable(reason)
                        )
            except RuntimeError as exc:
                if "cannot run this call" not in str(exc):
                    raise
                progress(f"{label} skipped: {exc}")
                continue
            row = {
                "op": case.op,
                "provider": case.provider,
                "backend": case.backend,
                "dtype": str(dtype).replace("torch.", ""),
                "shape": f"M={m},K={k},N={n}",
                "M": m, "K": k, "N": n,
                "group_size": group_size if case.op == "int4_weight_mm" else None,
                "median_ms": timing.median_ms,
                "p20_ms": timing.p20_ms,
                "p80_ms": timing.p80_ms,
                "timing_method": timing.method,
                "tflops": case.flops / (timing.median_ms * 1e-3) / 1e12,
                "gbps": case.min_bytes / (timing.median_ms * 1e-3) / 1e9,
                "min_bytes": case.min_bytes,
                "flops": case.flops,
            }
            if ceilings is not None:
                row["roofline_ms"] = ceilings.roofline_ms(case.flops, case.min_bytes, case.rate)
                row["pct_of_roofline"] = 100.0 * row["roofline_ms"] / timing.median_ms
            if joules is not None:
                row.update({f"energy_{key}": v for key, v in joules.as_dict().items()})
            if case.op == "dense":
                dense_row = row
            if dense_row is not None:
                row["speedup_vs_dense"] = dense_row["median_ms"] / timing.median_ms
                dj, pj = dense_row.get("energy_joules_per_call"), row.get("energy_joules_per_call")
                row["energy_gain_vs_dense"] = dj / pj if dj and pj else None
            rows.append(row)
            speed = f"x{row.get('speedup_vs_dense', 1):.2f} vs dense"
            roof = f", {row['pct_of_roofline']:.0f}% of roofline" if "pct_of_roofline" in row else ""
            progress(f"{label} {timing.median_ms * 1e3:9.1f} us  {speed}{roof}")
    return rows
