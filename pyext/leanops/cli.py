"""The `leanops` command.

  leanops info                       what can run here (backends, GPU, extension) and why not
  leanops demo                       quantise the built-in TinyLlama; size, error, speed, energy
  leanops bench matmul [options]     quantised matmuls vs dense baselines (speed, energy)
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("leanops: --device cuda requested but no CUDA GPU is visible")
    return device


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def cmd_info(args) -> int:
    import leanops

    print(json.dumps(leanops.backends(), indent=2))
    return 0


def cmd_demo(args) -> int:
    import leanops
    from leanops.bench.model import run_model_comparison
    from leanops.bench.report import format_table

    device = _device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    report = leanops.backends()
    print(f"leanops {leanops.__version__} demo: TinyLlama '{args.preset}' (random weights) on {device}")
    if device.type == "cuda":
        print(f"  GPU: {report['device']['gpu']} ({report['device']['capability']}); kernels: "
              + ", ".join(f"{b}={'yes' if report[b]['available'] else 'no'}" for b in ("cuda", "triton")))
    else:
        print("  CPU: leanops runs its PyTorch reference kernels here; speed and energy numbers that "
              "matter come from a GPU")
    rows = run_model_comparison(args.preset, device, dtype, energy=not args.no_energy)
    columns = [
        ("variant", "variant", ""),
        ("MB", "state_mb", ".1f"),
        ("size x", "size_x", ".2f"),
        ("logit SQNR dB", "logits_sqnr_db", ".1f"),
        ("cosine", "logits_cosine", ".4f"),
        ("prefill ms", "prefill_ms", ".2f"),
        ("prefill x", "prefill_x", ".2f"),
        ("decode ms", "decode_ms", ".3f"),
        ("decode x", "decode_x", ".2f"),
        ("prefill mJ/tok", "prefill_mj_per_tok", ".3f"),
        ("decode mJ/tok", "decode_mj_per_tok", ".2f"),
        ("energy x (decode)", "decode_energy_x", ".2f"),
    ]
    for r in rows:
        for key in ("prefill", "decode"):
            v = r.get(f"{key}_j_per_tok")
            r[f"{key}_mj_per_tok"] = None if v is None else v * 1e3
    print(format_table(rows, columns))
    print("  x columns: dense / variant (higher is better). Logit error is vs the dense model; random")
    print("  weights with outlier channels amplify quantisation error more than trained models do.")
    if not args.no_energy:
        reason = rows[0].get("energy_reason")
        print(f"  energy: {rows[0].get('energy_source') or 'not measured: ' + str(reason)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "backends": report, "rows": rows}, f, indent=1)
    return 0


def cmd_bench_matmul(args) -> int:
    from leanops.bench.env import environment
    from leanops.bench.matmul import PROVIDERS, run_matmul_suite
    from leanops.bench.report import matmul_table, write_csv, write_json
    from leanops.bench.roofline import ceilings

    device = _device(args.device)
    ceil = ceilings(device) if device.type == "cuda" else None
    if ceil is not None:
        print(f"ceilings ({ceil.device}): copy {ceil.copy_gbps:.0f} GB/s, bf16 {ceil.bf16_tflops:.0f} "
              f"TFLOP/s, int8 {ceil.int8_tops:.0f} TOP/s")
    providers = args.providers.split(",") if args.providers else PROVIDERS
    backends = args.backends.split(",") if args.backends else None
    rows = run_matmul_suite(
        args.shapes, args.batch, DTYPES[args.dtype], device, providers, backends,
        args.group_size, args.energy, args.energy_trials, ceil,
    )
    print(matmul_table(rows))
    env = environment(device)
    if args.out:
        write_json(args.out, rows, env, ceil.as_dict() if ceil else None, {"suite": "matmul"})
        print(f"wrote {args.out}")
    if args.csv:
        write_csv(args.csv, rows, env)
        print(f"wrote {args.csv}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanops", description="leanops: cheaper AI kernels, measured")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what can run here and why not")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="quantise the built-in TinyLlama and compare with dense")
    p.add_argument("--preset", default="demo", choices=["demo", "test"])
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--no-energy", action="store_true", help="skip the energy loops (faster)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmark suites").add_subparsers(dest="suite", required=True)
    p = bench.add_parser("matmul", help="quantised matmuls vs dense baselines")
    p.add_argument("--shapes", default="llama-7b", help="llama-7b (default), llama-13b or tiny")
    p.add_argument("--batch", type=_ints, default=[1, 16, 128, 2048], help="comma-separated M values")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--providers", help="comma-separated subset of the providers (default: all)")
    p.add_argument("--backends", help="comma-separated leanops backends (default: all available)")
    p.add_argument("--energy", action="store_true", help="also measure energy per call (slower)")
    p.add_argument("--energy-trials", type=int, default=3, help="loops of >= 1 s per energy figure")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON output path")
    p.add_argument("--csv", help="long-format CSV output path")
    p.set_defaults(func=cmd_bench_matmul)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
