"""Time to quantise one linear layer by each weight algorithm (leanops.ptq.quantize_layer: what
quantize_ does per layer), and the extra peak memory it needs.

Layers of a 7B-class model: 4096 x 4096 (q/k/v/o), 14336 x 4096 (gate/up: N = 14336 outputs)
and 4096 x 14336 (down: K = 14336 inputs, the largest Hessian). The calibration statistics
(X^T X over `--tokens` tokens of synthetic activations with a few outlier channels) are built
once per shape and not timed: quantize_ gathers them during the calibration run. Methods are
interleaved and repeated in one process; each row reports the median and the min / max of the
repeats. Peak memory is measured per (shape, method) in a fresh process: on the CPU (Linux) the
high-water mark of the resident set during the call (VmHWM, reset before it) beyond the weight
and the Hessian it is given; on a GPU torch.cuda.max_memory_allocated beyond them.

    python bench/quantize_speed.py                       # CPU, all shapes and methods
    python bench/quantize_speed.py --device cuda --json bench/results/quantize_speed_h100.json
    python bench/quantize_speed.py --shapes 4096x4096 --methods rtn,gptq --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("rtn", "hqq", "awq", "gptq", "awq+gptq")
SHAPES = ("4096x4096", "14336x4096", "4096x14336")  # N x K (out x in)


def config_for(method: str, group_size: int, symmetric: bool):
    import leanops

    return leanops.Int4WeightOnlyConfig(group_size, symmetric=symmetric, algorithm=method)


def inputs(n: int, k: int, tokens: int, device: str, seed: int = 0):
    """A weight [n, k] (N(0, 0.02), fp32) and X^T X [k, k] of `tokens` synthetic activations,
    accumulated in chunks so that building them never peaks above the two tensors."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * 0.02).to(device)
    h = torch.zeros(k, k, device=device)
    outliers = torch.ones(k, device=device)
    outliers[:: max(1, k // 16)] = 20.0
    for start in range(0, tokens, 256):
        x = torch.randn(min(256, tokens - start), k, generator=g).to(device) * outliers
        h.addmm_(x.t(), x)
    return w, h


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_methods(shape: str, methods, repeats: int, group_size: int, symmetric: bool,
                 tokens: int, device: str, progress=print) -> list[dict]:
    from leanops.ptq import quantize_layer

    n, k = (int(v) for v in shape.split("x"))
    w, h = inputs(n, k, tokens, device)
    times = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods:
            config = config_for(method, group_size, symmetric)
            _sync(device)
            start = time.perf_counter()
            quantize_layer(w, h, tokens, config)
            _sync(device)
            times[method].append(time.perf_counter() - start)
            progress(f"  {shape} {method} repeat {r + 1}/{repeats}: {times[method][-1]:.2f} s")
    return [
        {"shape": shape, "n": n, "k": k, "method": m, "group_size": group_size,
         "symmetric": symmetric, "median_s": statistics.median(t), "min_s": min(t),
         "max_s": max(t), "repeats": len(t)}
        for m, t in times.items()
    ]


def peak_memory(shape: str, method: str, group_size: int, symmetric: bool, tokens: int,
                device: str) -> int:
    """Extra peak bytes of one quantize_layer call (run in this process: call it in a fresh
    one, as main does, so the high-water mark starts at the inputs)."""
    from leanops.ptq import quantize_layer

    n, k = (int(v) for v in shape.split("x"))
    w, h = inputs(n, k, tokens, device)
    config = config_for(method, group_size, symmetric)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        quantize_layer(w, h, tokens, config)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # The high-water mark of this process's memory (VmHWM), reset to the current resident set
    # first: ru_maxrss would not do, Linux carries the parent's peak into an exec'd child.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    quantize_layer(w, h, tokens, config)
    return (_status_kib("VmHWM") - base) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help="N x K (out x in) layers")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--symmetric", action="store_true", help="default: asymmetric (zero points)")
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind X^T X")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method memory runs")
    p.add_argument("--json", default=None)
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # shape:method (child)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        shape, method = args.memory_of.split(":")
        print(peak_memory(shape, method, args.group_size, not not args.symmetric, args.tokens, args.device))
        return []
    from leanops.bench.env import environment

    methods = args.methods.split(",")
    rows = []
    for shape in args.shapes.split(","):
        rows += time_methods(shape, methods, args.repeats, args.group_size, args.symmetric,
                             args.tokens, args.device)
    if not args.no_memory:
        for row in rows:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-of", f"{row['shape']}:{row['method']}",
                   "--group-size", str(args.group_size), "--tokens", str(args.tokens), "--device", args.device]
            if args.symmetric:
                cmd.append("--symmetric")
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            row["extra_peak_mb"] = int(out.strip().splitlines()[-1]) / 1e6
    env = {**environment(torch.device(args.device)), "threads": torch.get_num_threads(),
           "tokens": args.tokens}
    print(f"\nquantisation time per layer, int4 g{args.group_size} "
          f"{'sym' if args.symmetric else 'asym'}, {args.device} ({env.get('cpu', '')}, "
          f"{env['threads']} threads), median of {args.repeats} [min, max]:")
    print("| layer N x K | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for shape in args.shapes.split(","):
        cells = []
        for m in methods:
            r = next(r for r in rows if r["shape"] == shape and r["method"] == m)
            mem = f", +{r['extra_peak_mb']:.0f} MB" if "extra_peak_mb" in r else ""
            cells.append(f"{r['median_s']:.2f} s [{r['min_s']:.2f}, {r['max_s']:.2f}]{mem}")
        print(f"| {shape} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
