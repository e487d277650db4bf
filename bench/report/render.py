"""Turning results.json into report.md and PNG charts (matplotlib, no display).

The tables are the assignment's: one row per concurrency level with the
columns of SPEC.md (ApacheBench's meanings), for each target and each tool.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HEADER = ("| Concurrency level | Time taken for test (s) | Complete requests | Failed requests | "
          "Total transferred (bytes) | Requests per second (#/sec) | Time per request (ms) | "
          "Time per request, across all concurrent requests (ms) | Transfer rate (Kbytes/sec) | "
          "p50 (ms) | p99 (ms) | spread of req/s |")


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def table(cells: dict) -> str:
    lines = [HEADER, "|" + "---|" * 12]
    for c, r in sorted(cells.items(), key=lambda kv: int(kv[0])):
        lines.append("| " + " | ".join([str(c), _fmt(r["time_taken_s"]), _fmt(int(r["complete"])),
                                        _fmt(int(r["failed"])), _fmt(int(r["total_transferred_bytes"])),
                                        _fmt(r["requests_per_second"], 1), _fmt(r["time_per_request_ms"]),
                                        _fmt(r["time_per_request_all_ms"]), _fmt(r["transfer_rate_kbps"], 1),
                                        _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
                                        f"±{r['rps_spread_pct']}%"]) + " |")
    return "\n".join(lines)


def chart(series: dict[str, dict], key: str, title: str, ylabel: str, path: Path, log: bool = False) -> None:
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


def render(results: dict, out: Path) -> None:
    m = results["machine"]
    http = {k: v for k, v in results["http"].items() if v["available"]}
    tcp = {k: v for k, v in results["tcp"].items() if v["available"]}
    chart({k: v["ab"] for k, v in http.items()}, "requests_per_second",
          "HTTP: requests/s against concurrency (ApacheBench, page.html)", "requests/s", out / "http_rps.png")
    chart({k: v["stress"] for k, v in http.items()}, "p50_ms", "HTTP: p50 latency (stress tool, rtt)",
          "ms", out / "http_p50.png")
    chart({k: v["stress"] for k, v in http.items()}, "p99_ms", "HTTP: p99 latency (stress tool, rtt)",
          "ms", out / "http_p99.png", log=True)
    chart({f"{k}, {conn}": v[conn] for k, v in tcp.items() for conn in ("keepalive", "per-request")},
          "requests_per_second", "TCP cluster: messages/s against concurrency (stress tool)", "messages/s",
          out / "tcp_rps.png")
    chart({f"{k}, keepalive": v["keepalive"] for k, v in tcp.items()}, "p99_ms",
          "TCP cluster: p99 rtt, keep-alive (stress tool)", "ms", out / "tcp_p99.png", log=True)
    md = [f"# Performance report, {results['date']}", "",
          f"Machine: {m['cores']} cores, {m['platform']}, Python {m['python']}; {m['nginx']}; "
          f"{m['haproxy']}; {m['ab']}; {m['wrk']}.", "",
          f"Each cell: {results['requests']} requests, the median of {results['reps']} repetition(s); "
          "the spread column is half the range of requests/s over the median. Nothing is pinned to a core: "
          "the load generator and the servers share the cores. Reproduce with `make bench` "
          f"(this run{' was QUICK=1 and' if results['quick'] else ''} took {results['duration_s']:.0f} s).", "",
          "![HTTP requests/s](http_rps.png)", "", "![TCP messages/s](tcp_rps.png)", "",
          "![HTTP p50](http_p50.png) ![HTTP p99](http_p99.png)", "", "![TCP p99](tcp_p99.png)", "",
          "## HTTP servers (page.html)", ""]
    for name, entry in results["http"].items():
        md.append(f"### {name}")
        if not entry["available"]:
            md += ["", "not available on this machine (install it to include this anchor)", ""]
            continue
        if entry["ab"]:
            md += ["", "ApacheBench (`ab -n N -c C`):", "", table(entry["ab"]), ""]
        md += ["The project's stress tool (`ClientServer_StressTools.py --http URL -n N -c C`; p50/p99 are rtt):",
               "", table(entry["stress"]), ""]
    md += ["## TCP cluster (line protocol, stress tool, 64-byte messages)", ""]
    for name, entry in results["tcp"].items():
        md.append(f"### {name}")
        if not entry["available"]:
            md += ["", "not available on this machine", ""]
            continue
        for conn in ("per-request", "keepalive"):
            md += ["", f"{conn} connections:", "", table(entry[conn]), ""]
    md += ["## Failover: one backend killed (SIGKILL) halfway", "",
           "| balancer | requests | complete | failed | errors | answered by |", "|---|---|---|---|---|---|"]
    for f in results["failover"]:
        if not f["available"]:
            md.append(f"| {f['balancer']} | not available | | | | |")
            continue
        md.append(f"| {f['balancer']} | {f['requests']} | {f['complete']} | {f['failed']} | "
                  f"{', '.join(f'{k}={v}' for k, v in f['errors'].items()) or '-'} | "
                  f"{', '.join(f'{k}={v}' for k, v in f['backends'].items())} |")
    md += ["", "## Ratios to the anchors and the speed targets", ""]
    for c_key in ("10",):
        rows = []
        for name, entry in http.items():
            cells = entry["ab"] or entry["stress"]
            cell = cells.get(int(c_key)) or cells.get(c_key)
            if cell:
                rows.append((name, cell["requests_per_second"]))
        nginx = dict(rows).get("nginx (anchor)")
        if nginx:
            md += [f"HTTP at concurrency {c_key}, 1000 requests, ApacheBench, ratio to nginx:", "",
                   "| target | requests/s | x nginx |", "|---|---|---|"]
            md += [f"| {n} | {r:,.0f} | {r / nginx:.2f} |" for n, r in rows]
            md.append("")
    if results["speed"]:
        for name, sub in results["speed"].items():
            md += [f"### {name}", "", "```", sub["stdout"].strip(), "```", ""]
            data = sub["data"] or {}
            verdicts = data.get("verdicts")
            if verdicts:
                md += ["| check | ratio | target | verdict |", "|---|---|---|---|"]
                for v in verdicts:
                    label = v.get("what") or v.get("engine") or f"{v.get('connections', '')} {v.get('mode', '')}".strip() \
                        or "--http vs ab"
                    ratio = v.get("ratio", v.get("ratio_min", v.get("http_rps_ratio")))
                    target = v.get("target", "0.85-1.15")
                    verdict = "-" if v.get("met") is None else ("met" if v["met"] else "NOT met")
                    md.append(f"| {label} | {ratio} | {target} | {verdict} |")
                md.append("")
            elif "ratio_warning" in data:
                md += [f"server at warning / reference: {data['ratio_warning']:.2f} (target 0.9: "
                       f"{'met' if data['ratio_warning'] >= 0.9 else 'NOT met'}); default logging / reference: "
                       f"{data['ratio_info']:.2f} (target 0.5: {'met' if data['ratio_info'] >= 0.5 else 'NOT met'})", ""]
    else:
        md += ["Speed targets were not run (QUICK=1).", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
