"""Plots of benchmark rows (matplotlib, an optional dependency: pip install 'leanops[bench]'):
for each op family, the speedup and the energy gain against the dense baseline of each shape,
one bar per provider. Rows without an energy figure leave that panel empty, saying why."""

from __future__ import annotations

import textwrap


class PlotUnavailable(RuntimeError):
    pass


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install matplotlib (or 'leanops[bench]')") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(row: dict) -> str:
    return f"{row['op']} {row['provider']}" if row.get("suite") == "matmul" else row["provider"]


def plot_rows(rows: list[dict], path: str, title: str | None = None) -> str:
    """Write a PNG to `path`; returns the path."""
    plt = require_matplotlib()
    families = list(dict.fromkeys(r.get("family", r.get("suite", "")) for r in rows))
    if not families:
        raise ValueError("no rows to plot")
    fig, axes = plt.subplots(len(families), 2, figsize=(15, 4.2 * len(families)), squeeze=False)
    for axrow, family in zip(axes, families, strict=True):
        group = [r for r in rows if r.get("family", r.get("suite", "")) == family]
        shapes = list(dict.fromkeys(r["shape"] for r in group))
        series = list(dict.fromkeys(_series(r) for r in group if r.get("baseline") != r["provider"]))
        for ax, key, what in ((axrow[0], "speedup_vs_dense", "speedup"),
                              (axrow[1], "energy_gain_vs_dense", "energy gain")):
            width = 0.8 / max(1, len(series))
            drawn = 0
            for i, name in enumerate(series):
                xs, ys = [], []
                for j, shape in enumerate(shapes):
                    v = next((r.get(key) for r in group if r["shape"] == shape and _series(r) == name), None)
                    if v is not None:
                        xs.append(j - 0.4 + width * (i + 0.5))
                        ys.append(v)
                if ys:
                    ax.bar(xs, ys, width, label=name)
                    drawn += 1
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
            ax.set_ylabel(f"{what} vs dense (x)")
            ax.set_title(f"{family}: {what} vs dense (higher is better)", fontsize=9)
            if drawn:
                ax.legend(fontsize=6, ncol=2)
            else:
                reason = next((r.get("energy_reason") for r in group if r.get("energy_reason")), None)
                text = f"no {what} figures" + (f": {reason}" if reason else "")
                ax.text(0.5, 0.5, textwrap.fill(text, 60), ha="center", va="center",
                        transform=ax.transAxes, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98 if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
