"""Per-call overhead of leanops' op layer on a CPU at M = 1 (issue 12's goal: under 20 us).

The same call three ways on a layer so small (K = N = 64) that the kernel itself takes a few
microseconds: the C++ kernel alone (torch.ops.leanops_C.<op>, what the "cpu" backend ends in),
the public op (torch.ops.leanops.<op>: Python argument checks, backend choice), and the
nn.Module forward (reshapes, the module call); dense nn.Linear for scale. Op-layer overhead =
public op - kernel. One thread; medians of interleaved rounds of 2000 calls each; wall clock
and the calling thread's CPU time (which a loaded machine does not inflate).

    python bench/cpu_overhead.py
"""

from __future__ import annotations

import statistics
import time

import leanops
import torch
from leanops.quant import quantize_int4, quantize_int8_per_channel


def main(rounds: int = 7, calls: int = 2000) -> None:
    torch.set_num_threads(1)
    k = n = 64
    x = torch.randn(1, k)
    packed, scales, _ = quantize_int4(torch.randn(n, k), 32)
    w8, s8 = quantize_int8_per_channel(torch.randn(n, k))
    int4_layer = leanops.Int4WeightOnlyLinear.from_linear(torch.nn.Linear(k, n), group_size=32)
    int8_layer = leanops.Int8Linear.from_linear(torch.nn.Linear(k, n))
    dense = torch.nn.Linear(k, n)
    kernels = torch.ops.leanops_C
    cases = {
        "int4_weight_mm kernel (torch.ops.leanops_C)": lambda: kernels.int4_weight_mm(x, packed, scales, None, 32, None),
        "int4_weight_mm public op": lambda: leanops.ops.int4_weight_mm(x, packed, scales, None, 32, None),
        "Int4WeightOnlyLinear forward": lambda: int4_layer(x),
        "int8_dynamic_linear kernel": lambda: kernels.int8_dynamic_linear(x, w8, s8, None, None),
        "int8_dynamic_linear public op": lambda: leanops.ops.int8_dynamic_linear(x, w8, s8, None, None),
        "Int8Linear forward": lambda: int8_layer(x),
        "nn.Linear forward (dense fp32)": lambda: dense(x),
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    with torch.no_grad():
        for _ in range(rounds):
            for name, fn in cases.items():
                for _ in range(100):
                    fn()
                t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                for _ in range(calls):
                    fn()
                results[name].append(((time.perf_counter_ns() - t0) / calls / 1e3,
                                      (time.thread_time_ns() - c0) / calls / 1e3))
    med = {name: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for name, v in results.items()}
    for name, (wall, cpu) in med.items():
        print(f"{name:45s} wall {wall:6.2f} us   cpu {cpu:6.2f} us")
    for op in ("int4_weight_mm", "int8_dynamic_linear"):
        wall = med[f"{op} public op"][0] - med[next(n for n in med if n.startswith(f"{op} kernel"))][0]
        cpu = med[f"{op} public op"][1] - med[next(n for n in med if n.startswith(f"{op} kernel"))][1]
        print(f"op-layer overhead of {op}: {wall:.1f} us wall, {cpu:.1f} us cpu")


if __name__ == "__main__":
    main()
