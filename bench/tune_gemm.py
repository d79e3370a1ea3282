"""Sweep the CUDA GEMMs' tile configuration and split-K count per shape (GPU only).

The bindings read LEANOPS_CUDA_GEMM_CONFIG (0 small-M, 1 medium, 2 large-M tile) and
LEANOPS_CUDA_GEMM_SPLITS on every call, so one process can time every plan and compare it with
what the heuristic picks ("auto") and with dense bf16 F.linear measured in the same run. Each row
reports the median time (CUDA-graph replay, inputs fixed), the ratio to dense, achieved GB/s of
the op's minimum bytes and that as a share of the measured copy bandwidth.

    python bench/tune_gemm.py --out "$OUT/tune_gemm.json"            # Llama-7B, M = 1..2048
    python bench/tune_gemm.py --ops int4_weight_mm --m 1,16 --kn 4096x4096

bench/gpu_check.sh runs it in its "tune" phase; bench/NOTES.md records what it showed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F


@contextlib.contextmanager
def plan(config: int | None, splits: int | None):
    saved = {k: os.environ.get(k) for k in ("LEANOPS_CUDA_GEMM_CONFIG", "LEANOPS_CUDA_GEMM_SPLITS")}
    try:
        for key, value in (("LEANOPS_CUDA_GEMM_CONFIG", config), ("LEANOPS_CUDA_GEMM_SPLITS", splits)):
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = str(value)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", default="int4_weight_mm,int8_mm")
    ap.add_argument("--m", default="1,16,64,128,2048")
    ap.add_argument("--kn", default="4096x4096,4096x11008,11008x4096", help="KxN list")
    ap.add_argument("--splits", default="1,2,4,8,16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_gemm needs a CUDA GPU")

    import leanops
    from leanops.bench.roofline import ceilings
    from leanops.bench.timing import time_fn_cudagraph
    from leanops.quant import quantize_int4, quantize_int8_per_channel
    from leanops.quant.int8 import quantize_per_token_int8

    dev = torch.device("cuda")
    ceil = ceilings(dev)
    copy_gbps = ceil.copy_gbps if ceil is not None else None
    rows = []
    for kn in args.kn.split(","):
        k, n = (int(v) for v in kn.split("x"))
        w = torch.randn(n, k, device=dev) * 0.02
        packed, scales, _ = quantize_int4(w, args.group_size, True, scale_dtype=torch.bfloat16)
        w8, s8 = quantize_int8_per_channel(w)
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_per_token_int8(x)
            dense_w = w.to(torch.bfloat16)
            dense_ms = time_fn_cudagraph(lambda: F.linear(x, dense_w), dev).median_ms
            calls = {
                "int4_weight_mm": (
                    lambda: leanops.ops.int4_weight_mm(x, packed, scales, None, args.group_size),
                    2 * m * k + n * k / 2 + 2 * n * (k // args.group_size) + 2 * m * n,
                ),
                "int8_mm": (
                    lambda: leanops.ops.int8_mm(xq, w8, xs, s8, None, torch.bfloat16),
                    m * k + n * k + 4 * (m + n) + 2 * m * n,
                ),
            }
            for op in args.ops.split(","):
                fn, min_bytes = calls[op]
                plans = [("auto", None, None)] + [
                    (f"c{c}/s{s}", c, s) for c in (0, 1, 2) for s in (int(v) for v in args.splits.split(","))
                ]
                for name, c, s in plans:
                    with plan(c, s), leanops.use_backend("cuda"):
                        try:
                            ms = time_fn_cudagraph(fn, dev).median_ms
                        except Exception as exc:  # a plan the shape cannot take is a row, not a stop
                            rows.append({"op": op, "m": m, "k": k, "n": n, "plan": name, "error": repr(exc)[:200]})
                            continue
                    gbps = min_bytes / (ms * 1e-3) / 1e9
                    rows.append({
                        "op": op, "m": m, "k": k, "n": n, "plan": name, "ms": ms, "dense_ms": dense_ms,
                        "x_dense": dense_ms / ms, "gbps": gbps,
                        "copy_share": gbps / copy_gbps if copy_gbps else None,
                    })
                best = min((r for r in rows if r.get("op") == op and r["m"] == m and r["k"] == k
                            and r["n"] == n and "ms" in r), key=lambda r: r["ms"])
                auto = next(r for r in rows if r.get("op") == op and r["m"] == m and r["k"] == k
                            and r["n"] == n and r["plan"] == "auto" and "ms" in r)
                print(f"{op:15s} M={m:5d} K={k:5d} N={n:5d}  dense {dense_ms * 1e3:8.1f} us  "
                      f"auto {auto['ms'] * 1e3:8.1f} us ({auto['x_dense']:.2f}x)  best {best['plan']:8s} "
                      f"{best['ms'] * 1e3:8.1f} us ({best['x_dense']:.2f}x, {best['gbps']:.0f} GB/s)", flush=True)
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"), "copy_gbps": copy_gbps, "group_size": args.group_size}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
