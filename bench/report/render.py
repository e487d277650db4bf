"""Turning results.json into report.md and its PNG charts.

The tables are the assignment's: one row per concurrency level with the
columns of SPEC.md (ApacheBench's meanings), for each target and each tool;
then the ratios to the anchors and every speed target of issues 2-5, met or
not. Nothing is measured here.
"""

from __future__ import annotations

from pathlib import Path

from bench.report.charts import line_chart

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


HOW_TO_READ = [
    "How to read it:",
    "",
    "- *requests/s* (TCP: messages/s) is complete requests over the time from the first send to the last "
    "answer; with a connection per request it is also connections per second.",
    "- *p50/p99* in the ApacheBench tables, the headline and the HTTP charts are ab's: from the connect to "
    "the answer's last byte. In the stress tool's tables and the TCP charts they are its rtt: from the send "
    "to the whole answer (the ACK), without the connect.",
    "- *per-request*: a new TCP connection for each request (ab without `-k`); *keepalive*: each client keeps "
    "its connection (the TCP grid's keep-alive rows).",
    "- *spread*: half the range of requests/s over the repetitions, as a share of the median (the charts' "
    "bars show the range itself). Two cells whose ranges overlap are a tie, whatever their medians say.",
    "- Our programs run at `--log-level warning` (the anchors log nothing either); nginx runs one worker "
    "with its access log off, HAProxy `nbthread 1`; the servers use uvloop. The labels' ports are the "
    "defaults; the benchmark uses free ports.",
]


def table(cells: dict) -> str:
    lines = [HEADER, "|" + "---|" * 12]
    for c, r in sorted(cells.items(), key=lambda kv: int(kv[0])):
        lines.append("| " + " | ".join([str(c), _fmt(r["time_taken_s"], 4), _fmt(int(r["complete"])),
                                        _fmt(int(r["failed"])), _fmt(int(r["total_transferred_bytes"])),
                                        _fmt(r["requests_per_second"], 1), _fmt(r["time_per_request_ms"]),
                                        _fmt(r["time_per_request_all_ms"], 4), _fmt(r["transfer_rate_kbps"], 1),
                                        _fmt(r["p50_ms"]), _fmt(r["p99_ms"]),
                                        f"±{r['rps_spread_pct']}%"]) + " |")
    return "\n".join(lines)


def render(results: dict, out: Path) -> None:
    m = results["machine"]
    http = {k: v for k, v in results["http"].items() if v["available"]}
    tcp = {k: v for k, v in results["tcp"].items() if v["available"]}
    line_chart({k: v["ab"] for k, v in http.items()}, "requests_per_second",
               "HTTP: requests/s against concurrency (ApacheBench, page.html)", "requests/s", out / "http_rps.png")
    # (ab's percentiles, as the headline's: connect to the answer's last byte)
    line_chart({k: v["ab"] or v["stress"] for k, v in http.items()}, "p50_ms",
               "HTTP: p50 time per request, connect to last byte (ApacheBench)", "ms", out / "http_p50.png")
    line_chart({k: v["ab"] or v["stress"] for k, v in http.items()}, "p99_ms",
               "HTTP: p99 time per request, connect to last byte (ApacheBench)", "ms", out / "http_p99.png", log=True)
    line_chart({f"{k}, {conn}": v[conn] for k, v in tcp.items() for conn in ("keepalive", "per-request")},
               "requests_per_second", "TCP cluster: messages/s against concurrency (stress tool)", "messages/s",
               out / "tcp_rps.png")
    line_chart({f"{k}, keepalive": v["keepalive"] for k, v in tcp.items()}, "p50_ms",
               "TCP cluster: p50 rtt, keep-alive (stress tool)", "ms", out / "tcp_p50.png")
    line_chart({f"{k}, keepalive": v["keepalive"] for k, v in tcp.items()}, "p99_ms",
               "TCP cluster: p99 rtt, keep-alive (stress tool)", "ms", out / "tcp_p99.png", log=True)
    md = [f"# Performance report, {results['date']}", "",
          f"Machine: {m['cores']} cores, {m['platform']}, Python {m['python']}; {m['nginx']}; "
          f"{m['haproxy']}; {m['ab']}; {m['wrk']}.", "",
          f"Each cell: {results['requests']} requests, the median of {results['reps']} repetition(s), "
          "interleaved (each round runs every target at every level once); the spread column is half the "
          "range of requests/s over the median. The load generators and the servers share "
          "the cores; only the threaded HTTP server keeps its threads on one core (its default), "
          "and the stress tool runs at nice 5 (its default). Reproduce with `make bench` "
          f"(this run{' was QUICK=1 and' if results['quick'] else ''} took {results['duration_s']:.0f} s"
          f"{', on commit ' + results['commit'] if results.get('commit') else ''}).", "",
          *HOW_TO_READ, "",
          "## Headline: concurrency 10, ratios to the anchors", "", *headline(results), "",
          "![HTTP requests/s](http_rps.png)", "", "![TCP messages/s](tcp_rps.png)", "",
          "![HTTP p50](http_p50.png) ![HTTP p99](http_p99.png)", "", "![TCP p50](tcp_p50.png) ![TCP p99](tcp_p99.png)", "",
          "## HTTP servers (page.html)", ""]
    for name, entry in results["http"].items():
        md.append(f"### {name}")
        if not entry["available"]:
            md += ["", "not available on this machine (install it to include this anchor)", ""]
            continue
        if entry["ab"]:
            md += ["", "ApacheBench (`ab -n N -c C`):", "", table(entry["ab"]), ""]
        md += ["The project's stress tool (`ClientServer_StressTools.py --http URL -n N -c C --engine epoll`; "
               "p50/p99 are rtt):",
               "", table(entry["stress"]), ""]
    md += ["## TCP cluster (line protocol, stress tool, 64-byte messages)", ""]
    for name, entry in results["tcp"].items():
        md.append(f"### {name}")
        if not entry["available"]:
            md += ["", "not available on this machine", ""]
            continue
        for conn in ("per-request", "keepalive"):
            md += ["", f"{conn} connections:", "", table(entry[conn]), ""]
    shown = next((f for f in results["failover"] if f.get("rate")), None)
    load = (f"{shown['requests']} requests at {shown['rate']} a second" if shown else "the requests at a fixed rate")
    after = f"{shown['kill_after_s']:g} s" if shown else "half the run's length"
    md += ["## Failover: one backend killed (SIGKILL) mid-run", "",
           f"The stress tool sends {load} (open loop, 10 clients, a connection per request); the backend is "
           f"killed {after} after the tool is started, its own start-up included, so about a third of the way "
           "in. Message mode and both HTTP balancers resend or retry "
           "what the dead backend had not answered; a byte relay (`--mode tcp`, HAProxy's `mode tcp`) "
           "cannot, so a request in flight on it may fail (`closed`).", "",
           "| balancer | requests | complete | failed | errors | killed | answered by |",
           "|---|---|---|---|---|---|---|"]
    for f in results["failover"]:
        if not f["available"]:
            md.append(f"| {f['balancer']} | not available | | | | | |")
            continue
        md.append(f"| {f['balancer']} | {f['requests']} | {f['complete']} | {f['failed']} | "
                  f"{', '.join(f'{k}={v}' for k, v in f['errors'].items()) or '-'} | {f.get('killed', '-')} | "
                  f"{', '.join(f'{k}={v}' for k, v in f['backends'].items())} |")
    md += ["", "## Speed targets of issues 2-5", "",
           *speed_summary(results), ""]
    for name, sub in results["speed"].items():
        md += [f"### {name}, as printed by its benchmark", "", "```", sub["stdout"].strip(), "```", ""]
    (out / "report.md").write_text("\n".join(md) + "\n")


def _at(cells: dict, c: int) -> dict | None:
    return cells.get(c) or cells.get(str(c))


def headline(results: dict, c: int = 10) -> list[str]:
    """The README's table: every target at concurrency ``c``, as a ratio to its anchor."""
    md = [f"HTTP, page.html, ApacheBench `-n {results['requests']} -c {c}` (no keep-alive), medians:", "",
          "| target | requests/s | p50 ms | p99 ms | failed | x nginx | x HAProxy http |", "|---|---|---|---|---|---|---|"]
    http = {k: _at(v["ab"] or v["stress"], c) for k, v in results["http"].items() if v["available"]}
    nginx = (http.get("nginx (anchor)") or {}).get("requests_per_second")
    hap = (http.get("HAProxy http over 4 backends (anchor)") or {}).get("requests_per_second")
    for name, cell in http.items():
        if cell is None:
            continue
        rps = cell["requests_per_second"]
        md.append(f"| {name} | {rps:,.0f} | {_fmt(cell['p50_ms'])} | {_fmt(cell['p99_ms'])} | {int(cell['failed'])} | "
                  f"{f'{rps / nginx:.2f}' if nginx else 'n/a'} | {f'{rps / hap:.2f}' if hap else 'n/a'} |")
    for name, entry in results["http"].items():
        if not entry["available"]:
            md.append(f"| {name} | not available | | | | | |")
    md += ["", f"TCP cluster, line protocol, 64-byte messages, stress tool `-n {results['requests']} -c {c} "
           f"--engine epoll`, medians:",
           "", "| target | connections | messages/s | p99 ms | failed | x HAProxy tcp |", "|---|---|---|---|---|---|"]
    for conn in ("per-request", "keepalive"):
        tcp = {k: _at(v[conn], c) for k, v in results["tcp"].items() if v["available"]}
        hap = (tcp.get("HAProxy tcp (anchor)") or {}).get("requests_per_second")
        for name, cell in tcp.items():
            if cell is None:
                continue
            rps = cell["requests_per_second"]
            md.append(f"| {name} | {conn} | {rps:,.0f} | {_fmt(cell['p99_ms'])} | {int(cell['failed'])} | "
                      f"{f'{rps / hap:.2f}' if hap else 'n/a'} |")
    for name, entry in results["tcp"].items():
        if not entry["available"]:
            md.append(f"| {name} | | not available | | | |")
    return md


def verdicts(results: dict) -> list[dict]:
    """Every speed target of the per-issue benchmarks as {issue, check, ratio, target, met}."""
    out = []
    for issue, sub in results.get("speed", {}).items():
        data = sub.get("data") or {}
        for v in data.get("verdicts") or []:
            check = v.get("what") or v.get("engine") or f"{v.get('connections', '')} {v.get('mode', '')}".strip() \
                or "--http vs ab"
            out.append({"issue": issue, "check": check,
                        "ratio": v.get("ratio", v.get("ratio_min", v.get("http_rps_ratio"))),
                        "target": v.get("target", "0.85-1.15"), "met": v.get("met")})
        if "ratio_warning" in data:
            out.append({"issue": issue, "check": "server at warning / bare uvloop echo",
                        "ratio": round(data["ratio_warning"], 3), "target": ">= 0.9",
                        "met": data["ratio_warning"] >= 0.9})
            out.append({"issue": issue, "check": "server at default logging / bare uvloop echo",
                        "ratio": round(data["ratio_info"], 3), "target": ">= 0.5", "met": data["ratio_info"] >= 0.5})
        if not data:
            out.append({"issue": issue, "check": "benchmark did not produce results", "ratio": None, "target": "-",
                        "met": False})
    return out


def speed_summary(results: dict) -> list[str]:
    rows = verdicts(results)
    if not results.get("speed"):
        return ["Speed targets were not run (QUICK=1)."]
    met = sum(1 for r in rows if r["met"])
    judged = sum(1 for r in rows if r["met"] is not None)
    md = [f"{met} of {judged} targets met ({len(rows) - judged} more rows are for information, without a "
          "target). Each benchmark measured in this session, its own run sizes and rounds (printed below); "
          "ratios of medians within one run. The stress tool's rows are the lower of its ratios on the two "
          "echo servers.", "",
          "| issue | check | ratio | target | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        verdict = "information" if r["met"] is None else ("met" if r["met"] else "**NOT met**")
        md.append(f"| {r['issue']} | {r['check']} | {_fmt(r['ratio'])} | {_target(r['target'])} | {verdict} |")
    return md


def _target(target) -> str:
    """One style for every target: >= 0.90x, or a range."""
    if target is None or target == "-":
        return "-"
    if isinstance(target, (int, float)):
        return f">= {target:.2f}x"
    text = str(target).replace(">=", "").strip()
    if "-" in text:
        return text.replace("-", "x to ") + "x"
    return f">= {float(text):.2f}x"
