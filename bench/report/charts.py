"""PNG charts of the grid (matplotlib, Agg backend: no display needed).

One line per target against concurrency; anchors are dashed so the project's
own programs stand out. Only drawing here: the series come from render.py.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_chart(series: dict[str, dict], key: str, title: str, ylabel: str, path: Path, log: bool = False) -> None:
    """``series``: {label: {concurrency: cell}}; plots ``cell[key]`` against concurrency."""
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    for name, cells in series.items():
        if not cells:
            continue
        xs = sorted(int(c) for c in cells)
        ys = [cells[c if c in cells else str(c)][key] for c in xs]
        ax.plot(xs, ys, marker="o", label=name, linestyle="--" if "anchor" in name else "-")
    ax.set_title(title)
    ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
