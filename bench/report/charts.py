"""PNG charts of the grid (matplotlib, Agg backend: no display needed).

One line per target against concurrency, each point the median of the
repetitions, with a bar from the slowest to the fastest repetition on the
requests/s charts; anchors are dashed so the project's own programs stand out.
Ticks at the measured levels; requests/s from 0, so gaps are not magnified;
p99 on a log scale (its outliers span decades; ticks at 1, 2 and 5 of each
decade, in plain numbers), p50 linear. A cell that was not measured is left
out of its line. Only drawing here: the series come from render.py.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402


def line_chart(series: dict[str, dict], key: str, title: str, ylabel: str, path: Path, log: bool = False) -> None:
    """``series``: {label: {concurrency: cell}}; plots ``cell[key]`` against concurrency."""
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    levels: set[int] = set()
    colours: dict[str, str] = {}  # a colour per target: "name, per-request" and "name, keepalive" share it
    for name, cells in series.items():
        if not cells:
            continue
        target = name.rsplit(", ", 1)[0]
        colour = colours.setdefault(target, f"C{len(colours) % 10}")
        marker = "s" if name.endswith("per-request") else "o"
        xs = sorted(int(c) for c in cells)
        levels.update(xs)
        picked = [cells[c if c in cells else str(c)] for c in xs]
        xs = [x for x, cell in zip(xs, picked) if cell.get(key) is not None]
        picked = [cell for cell in picked if cell.get(key) is not None]
        if not picked:
            continue
        ys = [cell[key] for cell in picked]
        style = "--" if "anchor" in name else "-"
        runs = [cell.get("rps_runs") or [] for cell in picked] if key == "requests_per_second" else []
        if runs and all(runs):  # the slowest and the fastest repetition
            err = [[y - min(r) for y, r in zip(ys, runs)], [max(r) - y for y, r in zip(ys, runs)]]
            ax.errorbar(xs, ys, yerr=err, marker=marker, label=name, linestyle=style, capsize=3, color=colour)
        else:
            ax.plot(xs, ys, marker=marker, label=name, linestyle=style, color=colour)
    ax.set_title(title + " (dashed: anchors)")
    ax.set_xlabel("concurrency (clients at once)")
    ax.set_ylabel(ylabel)
    ax.set_xticks(sorted(levels))
    plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 100 else f"{v:.3g}")
    if log:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(plain)
    ax.grid(True, alpha=0.3)
    if not ax.get_lines():
        ax.text(0.5, 0.5, "nothing measured", transform=ax.transAxes, ha="center", va="center")
    else:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
