"""The `leanops` command.

  leanops info                        what can run here (backends, GPU, extension, energy meter)
  leanops demo                        quantise the built-in TinyLlama; size, error, speed, energy
  leanops bench [--quick]             every op family vs its dense baseline (matmul, attention,
                                      model); on a CPU, or with --quick, at tiny sizes
  leanops bench matmul [options]      quantised / 2:4 matmuls vs F.linear, torch._int_mm, torch 2:4
  leanops bench attention [options]   SDPA backends (and leanops attention) vs SDPA's own choice
  leanops bench model [options]       built-in models dense vs int8 / int4 / 2:4 / fused attention

Every bench command takes --out r.json --csv r.csv --plot r.png --save (bench/results/<device>/),
--energy/--no-energy, --device, --dtype, --graph; see `leanops bench matmul --help`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# Sizes. "full": the default on a GPU; "quick": --quick anywhere, and the default on a CPU (the
# reference path would take hours on the GPU sizes). Explicit shape arguments always win.
QUICK = {
    "matmul": {"shapes": "quick", "batch": [1, 17]},
    "attention": {"seqlen": [64, 128], "batch": 1, "heads": 2, "head_dim": 32},
    "model": {"preset": "test", "tokens": 32, "batch": 1},
}
FULL = {
    "matmul": {"shapes": "llama-7b", "batch": [1, 16, 128, 2048]},
    "attention": {"seqlen": [1024, 4096, 16384], "batch": 1, "heads": 32, "head_dim": 128},
    "model": {"preset": None, "tokens": 256, "batch": 1},
}
# A suite named on a CPU without --quick: the matmul suite at the Llama-7B shapes and decode /
# small-batch / prefill-chunk sizes the C++ CPU kernels are for (when leanops._C has them; the
# quick sizes otherwise), attention at the quick sizes, the model suite with the full-size
# models at a short prompt (what `leanops demo` shows on a CPU).
CPU = {**QUICK, "model": {"preset": None, "tokens": 64, "batch": 1}}
CPU_KERNELS = {**CPU, "matmul": {"shapes": "llama-7b", "batch": [1, 16, 128]}}
# ... where every format is compared with dense fp32 and dense bf16, at 1 thread and all threads,
# the contenders of each shape interleaved over this many rounds (a shared machine's load hits
# them alike; medians and spreads over all rounds).
CPU_MATMUL_DTYPES = ("fp32", "bf16")
CPU_THREADS = "1,all"
CPU_ROUNDS = 5
# `leanops bench` with no suite on a GPU: a few shapes of every family.
HEADLINE = {
    "matmul": {"shapes": "llama-7b-quick", "batch": [1, 16, 2048]},
    "attention": {"seqlen": [1024, 4096], "batch": 1, "heads": 32, "head_dim": 128, "causal": True},
    "model": {"preset": None, "tokens": 256, "batch": 1},
}
MODEL_NAMES = ("tiny-llama", "mini-encoder")


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _dtypes(text: str) -> list[str]:
    names = _names(text)
    bad = [d for d in names if d not in DTYPES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected one or more of {', '.join(sorted(DTYPES))} "
                                         f"(comma-separated), got {text!r}")
    return names


def _threads(text: str) -> list[int]:
    """'1,all' -> [1, every core torch may use]; duplicates dropped."""
    out = []
    for v in _names(text):
        if v == "all":
            out.append(os.cpu_count() or torch.get_num_threads())
            continue
        try:
            out.append(int(v))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected thread counts or 'all' (comma-separated), got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected positive thread counts or 'all', got {text!r}")
    return list(dict.fromkeys(out))


def cmd_info(args) -> int:
    import leanops
    from leanops.bench.energy import meter_for

    report = dict(leanops.backends())
    device = _device("auto")
    meter, reason = meter_for(device)
    report["energy"] = {"device": str(device), "source": meter.source if meter else None,
                        "kind": meter.kind if meter else None, "reason": reason}
    if meter is not None:
        meter.close()
    print(json.dumps(report, indent=2))
    return 0


def cmd_demo(args) -> int:
    import leanops
    from leanops.bench.model import run_model_comparison
    from leanops.bench.report import format_table

    device = _device(args.device)
    dtype = DTYPES[args.dtype[0]] if args.dtype else None
    report = leanops.backends()
    print(f"leanops {leanops.__version__} demo: TinyLlama '{args.preset}' (random weights) on {device}")
    if device.type == "cuda":
        print(f"  GPU: {report['device']['gpu']} ({report['device']['capability']}); kernels: "
              + ", ".join(f"{b}={'yes' if report[b]['available'] else 'no'}" for b in ("cuda", "triton")))
    else:
        from leanops.bench.env import environment

        cpu = report["cpu"]
        kernels = (f"leanops CPU kernels ({cpu['isa']['active']})" if cpu["available"]
                   else f"the PyTorch reference (no CPU kernels: {cpu['reason']})")
        print(f"  CPU: {environment(device).get('cpu')}, {torch.get_num_threads()} threads; "
              f"{kernels}; contenders interleaved over {CPU_ROUNDS} rounds")
    rows = run_model_comparison(args.preset, device, dtype, energy=not args.no_energy,
                                rounds=CPU_ROUNDS if device.type == "cpu" else 1)
    columns = [
        ("variant", "variant", ""),
        ("MB", "state_mb", ".1f"),
        ("size x", "size_x", ".2f"),
        ("logit SQNR dB", "logits_sqnr_db", ".1f"),
        ("cosine", "logits_cosine", ".4f"),
        ("prefill ms", "prefill_ms", ".2f"),
        ("prefill x", "prefill_x", ".2f"),
        ("decode ms", "decode_ms", ".3f"),
        ("decode tok/s", "decode_tok_s", ".1f"),
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
    print("  decode: one token per sequence at the prompt's context length, with a KV cache.")
    slower = [r["variant"] for r in rows[1:] if r.get("decode_x") is not None and r["decode_x"] < 1.0]
    if len(rows) > 1:
        print("  decode vs dense: " + ("every quantised variant is at least as fast (>= 1.00x)" if not slower
                                       else "SLOWER than dense: " + ", ".join(slower)))
    if not args.no_energy:
        reason = rows[0].get("energy_reason")
        print(f"  energy: {rows[0].get('energy_source') or 'not measured: ' + str(reason)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "backends": report, "rows": rows}, f, indent=1)
    return 0


# ----------------------------------------------------------------------------------- bench


def _pick(args, suite: str, key: str, sizes: dict):
    """An explicit argument, else the size table's value."""
    value = getattr(args, key, None)
    return value if value is not None else sizes[suite][key]


def _sizes(args, device: torch.device, suite: str) -> dict:
    if args.quick:
        return QUICK
    if device.type != "cuda":
        if suite == "all":
            return QUICK
        import leanops

        return CPU_KERNELS if leanops.backends()["cpu"]["available"] else CPU
    return HEADLINE if suite == "all" else FULL


def _matmul_cases(args, device, dtype, sizes, backends, dtypes=None, threads=None):
    from leanops.bench.matmul import PROVIDERS, suite_cases

    providers = _names(args.providers) if getattr(args, "providers", None) else PROVIDERS
    return suite_cases(_pick(args, "matmul", "shapes", sizes), _pick(args, "matmul", "batch", sizes), dtype,
                       device, providers, backends, getattr(args, "group_size", None) or 128,
                       threads=threads, dtypes=dtypes)


def _attention_cases(args, device, dtype, sizes, backends):
    from leanops.bench.attention import PROVIDERS, attention_cases

    providers = _names(args.providers) if getattr(args, "providers", None) else PROVIDERS
    causal = args.causal if getattr(args, "causal", None) is not None else sizes["attention"].get("causal", False)
    passes = _names(args.passes) if getattr(args, "passes", None) else ("fwd",)
    if not args.backends:
        backends = None  # the suite's own default: on a CPU, the CPU path and the reference
    return attention_cases(_pick(args, "attention", "seqlen", sizes), _pick(args, "attention", "batch", sizes),
                           _pick(args, "attention", "heads", sizes), _pick(args, "attention", "head_dim", sizes),
                           causal, dtype, device, providers, backends, passes)


def _model_cases(args, device, dtype, sizes, progress):
    from leanops.bench.model import MODELS, model_cases

    names = MODEL_NAMES if getattr(args, "model", "all") in (None, "all") else (args.model,)
    variants = _names(args.variants) if getattr(args, "variants", None) else None
    preset = _pick(args, "model", "preset", sizes)
    cases = []
    for name in names:
        p = preset
        if p == "test" or p is None:
            p = MODELS[name].test_preset if p == "test" else MODELS[name].default_preset
        cases += model_cases(name, p, _pick(args, "model", "batch", sizes), _pick(args, "model", "tokens", sizes),
                             dtype, device, variants, progress=progress.log)
    return cases


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cmd_bench(args) -> int:
    import leanops
    from leanops.bench.env import environment
    from leanops.bench.matmul import default_backends
    from leanops.bench.progress import make_progress
    from leanops.bench.report import footnotes, table, write_csv, write_json
    from leanops.bench.roofline import ceilings
    from leanops.bench.runner import Results, Runner, Settings

    suite = args.suite or "all"
    device = _device(args.device)
    if args.plot:  # fail before a long sweep, not after it
        from leanops.bench.plot import PlotUnavailable, require_matplotlib
        try:
            require_matplotlib()
        except PlotUnavailable as exc:
            raise SystemExit(f"leanops: {exc}") from None
    if args.save and not os.path.isdir(args.results_dir):
        raise SystemExit(f"leanops: --save writes under {args.results_dir}/, which does not exist here "
                         "(run from the repository root or pass --results-dir)")
    sizes = _sizes(args, device, suite)
    cpu_kernels = sizes is CPU_KERNELS
    if device.type != "cuda" and not args.quick and not cpu_kernels:
        print("leanops bench: no GPU: the reference kernels run at small sizes (shape arguments override)")
    dtype_names = args.dtype or (list(CPU_MATMUL_DTYPES) if cpu_kernels and suite == "matmul" else None)
    dtype = DTYPES[dtype_names[0]] if dtype_names else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if getattr(args, "threads", None) is not None and device.type != "cpu":
        raise SystemExit("leanops bench: --threads sets torch's CPU thread count; this run is on "
                         f"{device.type}")
    threads = args.threads if getattr(args, "threads", None) is not None else (
        _threads(CPU_THREADS) if cpu_kernels and suite == "matmul" else None)
    backends = _names(args.backends) if args.backends else default_backends(device)
    energy = args.energy if args.energy is not None else (suite in ("all", "model") or args.quick)
    rounds = args.rounds if getattr(args, "rounds", None) is not None else (
        CPU_ROUNDS if device.type == "cpu" and not args.quick else 1)
    settings = Settings(energy=energy, energy_trials=args.energy_trials, graph=args.graph, rounds=rounds)
    if args.quick:  # a smoke test: short loops (the meter still enforces its own minimum)
        settings.energy_seconds, settings.idle_seconds = 0.1, 0.25
        settings.energy_trials = min(settings.energy_trials, 2)
        settings.warmup_ms, settings.rep_ms, settings.min_calls = 5, 20, 3
    if args.energy_seconds is not None:
        settings.energy_seconds = args.energy_seconds

    env = environment(device)
    print(f"leanops {leanops.__version__} bench {suite} on {env.get('gpu') or env.get('cpu') or device} "
          f"({str(dtype).replace('torch.', '')}; leanops backends: {', '.join(backends)})")
    ceil = ceilings(device) if device.type == "cuda" else None
    if ceil is not None:
        print(f"ceilings ({ceil.device}, measured, cached): copy {ceil.copy_gbps:.0f} GB/s, bf16 "
              f"{ceil.bf16_tflops:.0f} TFLOP/s, int8 {ceil.int8_tops:.0f} TOP/s")

    suites = ["matmul", "attention", "model"] if suite == "all" else [suite]
    results = Results()
    with make_progress(args.progress) as progress:
        runner = Runner(device, settings, ceil, progress)
        try:
            for name in suites:
                try:
                    if name == "matmul":
                        cases = _matmul_cases(args, device, dtype, sizes, backends,
                                              [DTYPES[d] for d in dtype_names] if dtype_names else None,
                                              threads)
                    elif name == "attention":
                        cases = _attention_cases(args, device, dtype, sizes, backends)
                    else:
                        cases = _model_cases(args, device, dtype, sizes, progress)
                except ValueError as exc:  # bad shapes, providers, presets: say so, no traceback
                    raise SystemExit(f"leanops bench {name}: {exc}") from None
                results.extend(runner.run(cases, name))
        finally:
            runner.close()
    print()
    if results.rows:
        print(table(results.rows))
    print(footnotes(results.rows, results.skipped, results.failed, runner.energy_info()))

    extra = {
        "suites": suites,
        "argv": sys.argv[1:],
        "settings": {**vars(settings), "dtype": str(dtype).replace("torch.", ""), "backends": backends,
                     "dtypes": dtype_names, "threads": threads,
                     "quick": bool(args.quick or (device.type != "cuda" and not cpu_kernels))},
        "energy": runner.energy_info(),
        "skipped": results.skipped,
        "failed": results.failed,
    }
    outputs = {"json": args.out, "csv": args.csv, "png": args.plot}
    if args.save:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        folder = os.path.join(args.results_dir, _slug(env.get("gpu") or f"cpu-{env.get('cpu') or 'unknown'}"))
        os.makedirs(folder, exist_ok=True)
        base = os.path.join(folder, f"{stamp}-{suite}")
        for kind in ("json", "csv", "png"):
            if kind != "png" or args.plot or _has_matplotlib():
                outputs[kind] = outputs[kind] or f"{base}.{kind}"
    ceil_dict = ceil.as_dict() if ceil else None
    if outputs["json"]:
        write_json(outputs["json"], results.rows, env, ceil_dict, extra)
        print(f"wrote {outputs['json']}")
    if outputs["csv"]:
        write_csv(outputs["csv"], results.rows, env)
        print(f"wrote {outputs['csv']}")
    if outputs["png"]:
        from leanops.bench.plot import plot_rows

        if results.rows:
            plot_rows(results.rows, outputs["png"],
                      f"leanops bench {suite}: {env.get('gpu') or env.get('cpu') or device}, {env['timestamp']}")
            print(f"wrote {outputs['png']}")
    if results.failed:
        print(f"leanops bench: {len(results.failed)} case(s) failed (see above; tracebacks in the JSON)",
              file=sys.stderr)
        return 1
    return 0


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _add_common(p: argparse.ArgumentParser, suppress: bool) -> None:
    """Options every bench command takes. On the suite subcommands their defaults are SUPPRESS,
    so `leanops bench --out r.json matmul` and `leanops bench matmul --out r.json` both work."""
    def d(value):
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--quick", action="store_true", default=d(False),
                   help="tiny sizes, short loops: a smoke test that runs in seconds (what CI runs)")
    p.add_argument("--device", default=d("auto"), help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", type=_dtypes, default=d(None),
                   help="bf16, fp16 or fp32; default bf16 on GPU, fp32 on CPU. The matmul suite takes "
                        "several (e.g. fp32,bf16: each against its own dense baseline; the CPU default)")
    p.add_argument("--threads", type=_threads, default=d(None),
                   help="CPU: torch thread counts to run each case at, e.g. 1,all (the CPU matmul default)")
    p.add_argument("--rounds", type=_positive, default=d(None),
                   help="CPU: interleave the cases of each shape over this many rounds (default 5 on a "
                        "CPU, 1 with --quick)")
    p.add_argument("--backends", default=d(None),
                   help="comma-separated leanops backends, each measured separately (default: all available)")
    p.add_argument("--energy", action=argparse.BooleanOptionalAction, default=d(None),
                   help="measure energy per call (default: on for `bench`, `bench model` and --quick; "
                        "off for the matmul and attention sweeps: each case adds >= 3 s)")
    p.add_argument("--energy-trials", type=int, default=d(3), help="loops of >= 1 s per energy figure")
    p.add_argument("--energy-seconds", type=float, default=d(None),
                   help="seconds per energy loop (default 1; the meter's own minimum applies)")
    p.add_argument("--graph", choices=["auto", "always", "never"], default=d("auto"),
                   help="CUDA-graph replay timing: auto = for small launches (default)")
    p.add_argument("--out", default=d(None), help="JSON output path")
    p.add_argument("--csv", default=d(None), help="long-format CSV output path")
    p.add_argument("--plot", default=d(None), help="PNG of speedup and energy gain vs dense (needs matplotlib)")
    p.add_argument("--save", action="store_true", default=d(False),
                   help="also write JSON/CSV/PNG under RESULTS_DIR/<device>/<timestamp>-<suite>.*")
    p.add_argument("--results-dir", default=d(os.path.join("bench", "results")))
    p.add_argument("--progress", choices=["auto", "rich", "plain"], default=d("auto"),
                   help="progress display: rich bar on a terminal when installed (auto), or plain lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="leanops", description="leanops: cheaper AI kernels, measured")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what can run here and why not")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="quantise the built-in TinyLlama and compare with dense")
    p.add_argument("--preset", default="demo", choices=["demo", "test"])
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", type=_dtypes, help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--no-energy", action="store_true", help="skip the energy loops (faster)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks: every op vs its dense baseline (speed, energy, roofline)",
                           description="Without a suite: every op family vs its dense baseline, a few "
                                       "shapes each (tiny sizes on a CPU or with --quick).")
    _add_common(bench, suppress=False)
    bench.set_defaults(func=cmd_bench, suite=None)
    suites = bench.add_subparsers(dest="suite")

    p = suites.add_parser("matmul", help="quantised and 2:4 matmuls vs F.linear, torch._int_mm, torch 2:4")
    _add_common(p, suppress=True)
    p.add_argument("--shapes", help="llama-7b (default on GPU), llama-13b, llama-7b-quick, tiny or quick")
    p.add_argument("--batch", type=_ints, help="comma-separated M values (default 1,16,128,2048)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--providers", help="comma-separated subset of the providers (default: all; dense always runs)")

    p = suites.add_parser("attention", help="SDPA backends (and leanops attention) vs SDPA's choice")
    _add_common(p, suppress=True)
    p.add_argument("--seqlen", type=_ints, help="comma-separated sequence lengths (default 1024,4096,16384)")
    p.add_argument("--batch", type=_positive, help="batch size (default 1)")
    p.add_argument("--heads", type=_positive, help="heads (default 32)")
    p.add_argument("--head-dim", type=_positive, help="head dimension (default 128)")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None, help="causal mask (default: off)")
    p.add_argument("--providers", help="comma-separated subset: sdpa, sdpa-flash, sdpa-efficient, sdpa-cudnn, "
                                       "sdpa-math, leanops, leanops-int8 (default: all)")
    p.add_argument("--passes", help="comma-separated subset of fwd, bwd (the backward alone), train "
                                    "(forward + backward) (default: fwd)")

    p = suites.add_parser("model", help="built-in models: dense vs int8 / int4 / 2:4 / fused attention")
    _add_common(p, suppress=True)
    p.add_argument("--model", choices=[*MODEL_NAMES, "all"], default="all")
    p.add_argument("--preset", help="the model's preset (tiny-llama: demo, test; mini-encoder: minilm, test)")
    p.add_argument("--tokens", type=_positive, help="prompt length S (default 256; decode runs at context S)")
    p.add_argument("--batch", type=_positive, help="sequences per call (default 1)")
    p.add_argument("--variants", help="comma-separated variant names (default: all; dense always runs)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
