"""Benchmark output: a terminal table, JSON (rows + environment + ceilings) and a long-format CSV
(one metric per line: op, provider, dtype, shape, metric, value, quantiles, device, versions)."""

from __future__ import annotations

import csv
import json
import os

# Metrics written to the long CSV, with the quantile columns that belong to each.
_CSV_METRICS = {
    "median_ms": ("p20_ms", "p80_ms"),
    "tflops": None,
    "gbps": None,
    "pct_of_roofline": None,
    "speedup_vs_dense": None,
    "energy_joules_per_call": None,
    "energy_dynamic_joules_per_call": None,
    "energy_avg_power_w": None,
    "energy_idle_power_w": None,
    "energy_gain_vs_dense": None,
}


def write_json(path: str, rows: list[dict], env: dict, ceilings: dict | None, extra: dict | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "ceilings": ceilings, **(extra or {}), "rows": rows}, f, indent=1)


def write_csv(path: str, rows: list[dict], env: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    versions = f"leanops {env.get('leanops')}; torch {env.get('torch')}; triton {env.get('triton')}; cuda {env.get('cuda')}"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["op", "provider", "dtype", "shape", "metric", "value", "p20", "p80",
                    "energy_source", "energy_reason", "device", "driver", "versions", "timestamp"])
        for row in rows:
            for metric, quantiles in _CSV_METRICS.items():
                if metric not in row:
                    continue
                p20, p80 = (row[quantiles[0]], row[quantiles[1]]) if quantiles else ("", "")
                value = row[metric]
                w.writerow([row["op"], row["provider"], row["dtype"], row["shape"], metric,
                            "" if value is None else value, p20, p80,
                            row.get("energy_source") or "", row.get("energy_reason") or "",
                            env.get("gpu") or env.get("cpu") or env.get("device"),
                            env.get("driver") or "", versions, env.get("timestamp")])


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
    out = []
    for i, r in enumerate(cells):
        out.append("  ".join(c.rjust(wd) if i else c.ljust(wd) for c, wd in zip(r, widths, strict=True)))
        if i == 0:
            out.append("  ".join("-" * wd for wd in widths))
    return "\n".join(out)


MATMUL_COLUMNS = [
    ("op", "op", ""),
    ("provider", "provider", ""),
    ("shape", "shape", ""),
    ("median us", "median_us", ".1f"),
    ("TFLOP/s", "tflops", ".1f"),
    ("GB/s", "gbps", ".0f"),
    ("% roof", "pct_of_roofline", ".0f"),
    ("x dense", "speedup_vs_dense", ".2f"),
    ("J/call", "energy_joules_per_call", ".2e"),
    ("W", "energy_avg_power_w", ".0f"),
    ("energy x", "energy_gain_vs_dense", ".2f"),
]


def matmul_table(rows: list[dict]) -> str:
    return format_table([{**r, "median_us": r["median_ms"] * 1e3} for r in rows], MATMUL_COLUMNS)
