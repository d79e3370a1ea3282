"""Measured ceilings of this device: copy bandwidth and dense matmul rates. A kernel's roofline
time is max(bytes / bandwidth, flops / rate), with the *measured* ceilings, not datasheet ones.
Results are cached per device (and torch version) in ~/.cache/leanops/ceilings.json
(LEANOPS_CACHE_DIR moves it). GPUs only: on a CPU rows carry no roofline.

Which rate bounds a row is the row's `rate`: "bf16" or "fp16" (16-bit tensor cores; 2:4 sparse
rows are held to the dense rate, so they can exceed 100%), "int8" (int8 tensor cores). Other
dtypes (fp32) have no measured ceiling here and get none."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import torch

from leanops.bench.timing import time_fn

CACHE = os.path.join(
    os.environ.get("LEANOPS_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "leanops")),
    "ceilings.json",
)
_CACHE_VERSION = 2  # bump when the measured set changes (v2: fp16 added)


@dataclass(frozen=True)
class Ceilings:
    device: str
    copy_gbps: float  # device-to-device copy, bytes read + written per second / 1e9
    bf16_tflops: float  # 8192^3 bf16 matmul (cuBLAS through torch)
    int8_tops: float  # 8192^3 torch._int_mm (int8 x int8 -> int32)
    fp16_tflops: float | None = None  # 8192^3 fp16 matmul
    method: str = "measured: 1 GiB copy_, 8192^3 torch.mm (bf16, fp16) and torch._int_mm (int8), random data"

    def peak_tflops(self, rate: str) -> float | None:
        return {"bf16": self.bf16_tflops, "fp16": self.fp16_tflops or self.bf16_tflops,
                "int8": self.int8_tops}.get(rate)

    def roofline_ms(self, flops: float, min_bytes: float, rate: str) -> float | None:
        """Lower bound on the time of a kernel doing `flops` and moving `min_bytes`; `rate` names
        the tensor-core rate that bounds the arithmetic (None for a rate not measured)."""
        peak = self.peak_tflops(rate)
        if peak is None:
            return None
        return max(min_bytes / (self.copy_gbps * 1e9), flops / (peak * 1e12)) * 1e3

    def as_dict(self) -> dict:
        return asdict(self)


def _key(device: torch.device) -> str:
    return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|v{_CACHE_VERSION}"


def measure_ceilings(device: torch.device) -> Ceilings:
    n_bytes = 1 << 30
    src = torch.randint(-128, 127, (n_bytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    copy_ms = time_fn(lambda: dst.copy_(src), device).median_ms
    src = dst = None  # free the 2 GiB before the matmuls
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = time_fn(lambda: torch.mm(a, b), device).median_ms
    a16, b16 = a.half(), b.half()
    mm16_ms = time_fn(lambda: torch.mm(a16, b16), device).median_ms
    a = b = a16 = b16 = None
    ai = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    bi = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
    int_ms = time_fn(lambda: torch._int_mm(ai, bi), device).median_ms
    flops = 2 * n**3
    return Ceilings(
        device=torch.cuda.get_device_name(device),
        copy_gbps=2 * n_bytes / (copy_ms * 1e-3) / 1e9,
        bf16_tflops=flops / (mm_ms * 1e-3) / 1e12,
        int8_tops=flops / (int_ms * 1e-3) / 1e12,
        fp16_tflops=flops / (mm16_ms * 1e-3) / 1e12,
    )


def ceilings(device: torch.device, refresh: bool = False) -> Ceilings | None:
    """This GPU's ceilings (cached), or None on a CPU."""
    if device.type != "cuda":
        return None
    key = _key(device)
    cache = {}
    if os.path.exists(CACHE):
        try:
            with open(CACHE) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    if key in cache and not refresh:
        return Ceilings(**cache[key])
    result = measure_ceilings(device)
    cache[key] = result.as_dict()
    try:
        os.makedirs(os.path.dirname(CACHE), exist_ok=True)
        with open(CACHE, "w") as f:
            json.dump(cache, f, indent=1)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
    return result
