"""Benchmark output: terminal tables, JSON (environment, ceilings, settings, rows, skipped and
failed cases) and a long-format CSV (one metric per line: suite, op, provider, backend, dtype,
shape, metric, unit, value, low/high with what the spread is, method, reason, device, driver,
versions, timestamp). Missing values are empty in the CSV and null in the JSON, always with a
reason column or field saying why."""

from __future__ import annotations

import csv
import json
import math
import os

FORMAT = "leanops-bench/1"

# metric -> (unit, (low key, high key) or None, what the spread is, method key, reason key)
_CSV_METRICS = {
    "median_ms": ("ms", ("p20_ms", "p80_ms"), "p20-p80", "timing_method", None),
    "eager_median_ms": ("ms", None, "", "timing_method", None),
    "cpu_ms": ("ms", None, "", "timing_method", None),
    "cpu_speedup_vs_dense": ("x", None, "", "baseline", None),
    "tflops": ("TFLOP/s", None, "", None, None),
    "gbps": ("GB/s", None, "", None, None),
    "pct_of_roofline": ("%", None, "", "roofline_rate", "roofline_reason"),
    "speedup_vs_dense": ("x", None, "", "baseline", None),
    "tokens_per_s": ("tokens/s", None, "", "timing_method", None),
    "peak_mem_mb": ("MB", None, "", None, "peak_mem_reason"),
    "energy_joules_per_call": ("J", ("energy_joules_per_call_min", "energy_joules_per_call_max"),
                               "min-max over trials", "energy_source", "energy_reason"),
    "energy_dynamic_joules_per_call": ("J", None, "", "energy_source", "energy_reason"),
    "energy_joules_per_token": ("J", None, "", "energy_source", "energy_reason"),
    "energy_avg_power_w": ("W", None, "", "energy_source", "energy_reason"),
    "energy_idle_power_w": ("W", None, "", "energy_source", "energy_reason"),
    "tflop_per_joule": ("TFLOP/J", None, "", "energy_source", "energy_reason"),
    "energy_gain_vs_dense": ("x", None, "", "baseline", "energy_reason"),
    "state_mb": ("MB", None, "", None, None),
    "output_sqnr_db": ("dB", None, "", "output", None),
    "output_cosine": ("", None, "", "output", None),
}
CSV_HEADER = ["suite", "op", "provider", "backend", "dtype", "shape", "metric", "unit", "value", "low",
              "high", "spread", "method", "reason", "device", "driver", "versions", "timestamp"]


def _finite(obj):
    """JSON has no inf/nan: such floats become null (an infinite SQNR means identical output)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str, rows: list[dict], env: dict, ceilings: dict | None, extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {"format": FORMAT, "environment": env, "ceilings": ceilings, **(extra or {}), "rows": rows}
    with open(path, "w") as f:
        json.dump(_finite(doc), f, indent=1, allow_nan=False)


def write_csv(path: str, rows: list[dict], env: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    versions = f"leanops {env.get('leanops')}; torch {env.get('torch')}; triton {env.get('triton')}; cuda {env.get('cuda')}"
    device = env.get("gpu") or env.get("cpu") or env.get("device")

    def cell(v):
        return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

    def why_empty(metric, value, reason):
        if isinstance(value, float) and not math.isfinite(value):  # CSV, like JSON, has no inf
            if metric.endswith("sqnr_db") and value > 0:
                return "infinite: the output equals the reference exactly"
            return f"not finite ({value})"
        return cell(reason) if value is None else ""

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for row in rows:
            for metric, (unit, quantiles, spread, method, reason) in _CSV_METRICS.items():
                if metric not in row:
                    continue
                value = row[metric]
                if value is None and not (reason and row.get(reason)):
                    continue  # nothing measured and nothing to say (e.g. no graph, so no eager twin)
                low, high = (row.get(quantiles[0]), row.get(quantiles[1])) if quantiles else (None, None)
                w.writerow([row.get("suite", ""), row["op"], row["provider"], cell(row.get("backend")),
                            row["dtype"], row["shape"], metric, unit, cell(value), cell(low), cell(high),
                            spread if quantiles and low is not None else "",
                            cell(row.get(method)) if method else "",
                            why_empty(metric, value, row.get(reason) if reason else None),
                            device, env.get("driver") or "", versions, env.get("timestamp")])


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (header, key, format spec); missing/None values print as '-'."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, spec in columns:
            v = row.get(key)
            line.append("-" if v is None else format(v, spec))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    text = [spec == "" for _, _, spec in columns]  # text columns align left, numbers right
    out = []
    for i, r in enumerate(cells):
        out.append("  ".join(c.ljust(wd) if (i == 0 or left) else c.rjust(wd)
                             for c, wd, left in zip(r, widths, text, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * wd for wd in widths))
    return "\n".join(out)


KERNEL_COLUMNS = [
    ("op", "op", ""),
    ("provider", "provider", ""),
    ("shape", "shape", ""),
    ("dtype", "dtype", ""),
    ("median us", "median_us", ".1f"),
    ("p20-p80 us", "spread_us", ""),
    ("t", "timing", ""),
    ("cpu us", "cpu_us", ".1f"),
    ("x (cpu)", "cpu_speedup_vs_dense", ".2f"),
    ("TFLOP/s", "tflops", ".2f"),
    ("GB/s", "gbps", ".0f"),
    ("% roof", "pct_of_roofline", ".0f"),
    ("x dense", "speedup_vs_dense", ".2f"),
    ("J/call", "energy_joules_per_call", ".2e"),
    ("W", "energy_avg_power_w", ".0f"),
    ("TFLOP/J", "tflop_per_joule", ".3f"),
    ("energy x", "energy_gain_vs_dense", ".2f"),
]
MODEL_COLUMNS = [
    ("op", "op", ""),
    ("variant", "provider", ""),
    ("shape", "shape", ""),
    ("ms", "median_ms", ".3f"),
    ("t", "timing", ""),
    ("tokens/s", "tokens_per_s", ".0f"),
    ("x dense", "speedup_vs_dense", ".2f"),
    ("mJ/token", "mj_per_token", ".3f"),
    ("energy x", "energy_gain_vs_dense", ".2f"),
    ("peak MB", "peak_mem_mb", ".1f"),
    ("state MB", "state_mb", ".1f"),
    ("SQNR dB", "output_sqnr_db", ".1f"),
    ("cosine", "output_cosine", ".4f"),
]


def _display(row: dict) -> dict:
    timing = row.get("timing_method", "")
    return {
        **row,
        "median_us": row["median_ms"] * 1e3,
        "spread_us": f"{row['p20_ms'] * 1e3:.1f}-{row['p80_ms'] * 1e3:.1f}",
        # G: CUDA-graph replay, E: eager with L2 flushed, E!: graph tried and failed, C: CPU clock
        "timing": ("G" if timing.startswith("cuda graph") else "E!" if "failed" in timing
                   else "E" if timing.startswith("cuda events") else "C"),
        "mj_per_token": None if row.get("energy_joules_per_token") is None else row["energy_joules_per_token"] * 1e3,
        "cpu_us": None if row.get("cpu_ms") is None else row["cpu_ms"] * 1e3,
    }


def table(rows: list[dict]) -> str:
    """One table per suite, with the columns that suite's rows carry."""
    parts = []
    for suite in dict.fromkeys(r.get("suite", "matmul") for r in rows):
        group = [_display(r) for r in rows if r.get("suite", "matmul") == suite]
        parts.append(format_table(group, MODEL_COLUMNS if suite == "model" else KERNEL_COLUMNS))
    return "\n\n".join(parts)


def footnotes(rows: list[dict], skipped: list[dict], failed: list[dict], energy: dict | None = None) -> str:
    """What the table's columns rest on: timing methods, energy source or why none, skips."""
    lines = ["x columns: dense baseline / this row, measured in the same run (higher is better). "
             "t: G = CUDA-graph replay, E = device events with L2 flushed, E! = graph capture failed "
             "(eager figure kept), C = CPU wall clock. cpu us: CPU time of the calling thread per call "
             "(CPU runs; with one thread, the time the kernel ran whatever else loaded the machine), "
             "x (cpu): the same ratio on it."]
    if energy is not None:
        if energy.get("source"):
            lines.append(f"energy: {energy['source']} [{energy['kind']}], idle {energy['idle_power_w']:.1f} W "
                         "subtracted for the dynamic figures in the JSON/CSV")
        else:
            lines.append(f"energy: not measured: {energy.get('reason')}")
    failures_in_graph = {r["timing_method"] for r in rows if "failed" in r.get("timing_method", "")}
    lines += [f"timing: {m}" for m in sorted(failures_in_graph)]
    if skipped:
        lines.append(f"skipped ({len(skipped)}):")
        reasons: dict[str, list[str]] = {}
        for s in skipped:
            reasons.setdefault(s["reason"], []).append(f"{s['op']} {s['provider']} {s['shape']}")
        for reason, what in reasons.items():
            more = f" and {len(what) - 2} more" if len(what) > 2 else ""
            lines.append(f"  {reason}: {'; '.join(what[:2])}{more}")
    if failed:
        lines.append(f"FAILED ({len(failed)}):")
        lines += [f"  {f['op']} {f['provider']} {f['shape']}: {f['error']}" for f in failed]
    return "\n".join(lines)
