"""The CPU's measured ceilings for the roofline of the CPU kernels (bench/NOTES.md, "CPU"): the
rate at which one thread streams a buffer of each size (the weights of a decode-size matmul are
read once per call, from L2/L3 or from memory depending on their size), and the fp32, bf16 and
int8 matmul rates of PyTorch's own kernels on a compute-bound shape.

    python bench/cpu_ceilings.py [--threads 1] [--rounds 7]

Each figure is the median over interleaved rounds of the calling thread's CPU time (on a shared
machine the wall clock also counts the time other processes held the core) and of the wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _measure(fns: dict, rounds: int, seconds: float = 0.2) -> dict:
    out = {name: ([], []) for name in fns}
    for f in fns.values():
        f()
    for _ in range(rounds):
        for name, f in fns.items():
            n, t0, c0 = 0, time.perf_counter(), time.thread_time()
            while n < 2 or time.perf_counter() - t0 < seconds:
                f()
                n += 1
            out[name][0].append((time.perf_counter() - t0) / n)
            out[name][1].append((time.thread_time() - c0) / n)
    return {name: (statistics.median(w), statistics.median(c)) for name, (w, c) in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; medians of {args.rounds} interleaved rounds; CPU time of the "
          "calling thread (wall clock in brackets)")

    sizes_mb = (4, 8, 16, 32, 64, 256)
    bufs = {mb: torch.randn(mb * (1 << 20) // 4) for mb in sizes_mb}
    reads = _measure({mb: (lambda b=b: b.sum()) for mb, b in bufs.items()}, args.rounds)
    for mb, (wall, cpu) in reads.items():
        print(f"stream read {mb:4d} MB: {mb * 1.048576e-3 / cpu:6.1f} GB/s ({mb * 1.048576e-3 / wall:6.1f})")

    m, k, n = 512, 4096, 1024
    a32, b32 = torch.randn(m, k), torch.randn(k, n)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    rates = _measure({"fp32 torch.mm": lambda: torch.mm(a32, b32), "bf16 torch.mm": lambda: torch.mm(a16, b16),
                      "int8 torch._int_mm": lambda: torch._int_mm(a8, b8)}, args.rounds)
    for name, (wall, cpu) in rates.items():
        print(f"{name:20s} {m}x{k}x{n}: {2 * m * k * n / cpu / 1e9:7.1f} GFLOP/s ({2 * m * k * n / wall / 1e9:7.1f})")


if __name__ == "__main__":
    main()
