"""Pictures of a store's measurements (matplotlib, loaded only here and only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from mrlstore.errors import InvalidInputError


def plot_dims_report(table: pa.Table, dest: Path) -> None:
    """Two panels from ``Store.report()``: recall@k of each prefix alone against its dims (how many dims a
    row needs), and latency against recall for every funnel shape, with exact search and the tuned setting
    marked. Written as a PNG to ``dest``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInputError("--plot needs matplotlib: pip install matplotlib") from None
    rows = table.to_pylist()
    prefixes = [r for r in rows if r["kind"] == "prefix alone" and r["codes"] == "raw"]
    codes = [r for r in rows if r["kind"] == "prefix alone" and r["codes"] == "fitted"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot([r["dims"][0] for r in prefixes], [r["recall"] for r in prefixes], "o-", label="raw prefix")
    if codes:
        left.plot([r["dims"][0] for r in codes], [r["recall"] for r in codes], "s--", label="fitted code (HNSW)")
    left.set(xscale="log", xlabel="dims per row (an exact scan of the prefix)", ylabel="recall@k vs full dims",
             title="How many dims does a row need?", ylim=(0, 1.02))  # fmt: skip
    left.set_xticks([r["dims"][0] for r in prefixes], [str(r["dims"][0]) for r in prefixes])
    left.grid(alpha=0.3)
    left.legend()
    _latency_panel(right, rows, prefixes[-1])
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def _latency_panel(ax: Any, rows: list[dict[str, Any]], exact: dict[str, Any]) -> None:
    shapes: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "funnel":
            shapes.setdefault(f"{r['dims']} {r['codes']}", []).append(r)
    for name, points in shapes.items():
        points.sort(key=lambda r: r["recall"])
        ax.plot([r["recall"] for r in points], [r["p50_ms"] for r in points], ".-", label=f"funnel {name}")
    ax.plot([exact["recall"]], [exact["p50_ms"]], "k*", markersize=12, label=f"exact {exact['dims']}")
    for r in rows:
        if r["tuned"]:
            ax.plot([r["recall"]], [r["p50_ms"]], "o", markersize=12, markerfacecolor="none", color="red",
                    label=f"query() default: {r['dims']}, shortlist {r['shortlist']}")  # fmt: skip
    ax.set(yscale="log", xlabel="recall@k vs full dims", ylabel="p50 ms per query (one at a time)",
           title="Latency against recall")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
