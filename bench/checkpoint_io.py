"""What checking a checkpoint costs: load_quantized with and without checksum verification, and
the CRC-32 pass alone, on a synthetic int8 weight-only model of a chosen size (CPU only).

    python bench/checkpoint_io.py                 # 1 GiB of int8 weights, 5 repetitions
    python bench/checkpoint_io.py --gib 4 --reps 7 --dir /tmp

The file is read from the page cache (it was just written), so the figures are the CPU cost of
reading, checking and copying, not the disk's speed. Each figure is the median over the
repetitions with the min-max spread; GB/s counts the file's tensor bytes (1 GB = 1e9 bytes).
The README's "Saving and loading" section quotes these.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import leanops
import torch
from leanops import api
from leanops.nn import Int8WeightOnlyLinear
from torch import nn


def timed(fn, reps: int) -> tuple[float, float, float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), max(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gib", type=float, default=1.0, help="int8 weight bytes, in GiB")
    parser.add_argument("--width", type=int, default=4096, help="layers are width x width")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write the file (default: a temp dir)")
    args = parser.parse_args()

    layers = max(1, round(args.gib * 2**30 / args.width**2))
    model = nn.Sequential(*(Int8WeightOnlyLinear(args.width, args.width) for _ in range(layers)))
    with torch.no_grad():
        for layer in model:
            layer.weight.copy_(torch.randint(-127, 128, layer.weight.shape, dtype=torch.int8))
            layer.weight_scale.uniform_(1e-3, 1e-2)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "bench.safetensors")
        save = timed(lambda: leanops.save_quantized(model, path), args.reps)
        _, tensors = api._read_checkpoint(path)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        crc = timed(lambda: api._checksums(tensors), args.reps)
        read = timed(lambda: api._read_checkpoint(path), args.reps)
        verified = timed(lambda: leanops.load_quantized(model, path), args.reps)
        trusted = timed(lambda: leanops.load_quantized(model, path, verify_checksums=False), args.reps)

    def row(label, t):
        med, lo, hi = t
        print(f"{label:<44} {med:8.3f} s  [{lo:.3f}, {hi:.3f}]  {nbytes / med / 1e9:6.2f} GB/s")

    print(f"{layers} Int8WeightOnlyLinear({args.width}, {args.width}) layers, {nbytes / 1e9:.2f} GB of "
          f"tensors, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.reps} repetitions")
    row("save_quantized (CRC-32 included)", save)
    row("CRC-32 of every tensor", crc)
    row("read the file (safetensors, to CPU)", read)
    row("load_quantized (verify_checksums=True)", verified)
    row("load_quantized (verify_checksums=False)", trusted)
    print(f"verification adds {verified[0] - trusted[0]:.3f} s "
          f"({(verified[0] / trusted[0] - 1) * 100:.0f}% of the load without it)")


if __name__ == "__main__":
    main()
