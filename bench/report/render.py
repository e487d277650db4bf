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
    "- *p50/p99* of HTTP (tables, headline, charts) are from the connect to the answer's last byte, from "
    "both tools: ab's, and the stress tool's *total*. For the TCP cluster they are the stress tool's rtt: "
    "from the send to the whole answer (the ACK), without the connect.",
    "- *Complete* is SPEC.md's \"answered correctly\": an answer other than 2xx, which ab counts as complete "
    "and lists apart (Non-2xx responses), is counted failed in ab's rows too, and its rates count the correct "
    "answers only. ab runs with `-r` (a reset is a failed request, not the end of its run) and `-l` (an "
    "error page is not also a length failure); a request it counts under several failure kinds counts once.",
    "- Each cell is one repetition's row, whole: the one with the median requests/s (the lower of the middle "
    "two for an even count), so complete / time taken is its requests/s. Only *Failed requests* is the sum "
    "over all the repetitions (SPEC.md's column names are kept), so that a failure in any of them shows; their "
    "kinds are listed under the table.",
    "- *per-request*: a new TCP connection for each request (ab without `-k`); *keepalive*: each client keeps "
    "its connection (the TCP grid's keep-alive rows).",
    "- *spread*: half the range of requests/s over the repetitions, as a share of the median (the charts' "
    "bars show the range itself). Two cells whose ranges overlap are a tie, whatever their medians say.",
    "- Our programs run at `--log-level warning`; nginx runs one worker with its access log off, HAProxy "
    "`nbthread 1` and no log; Python's http.server writes its line per request to stderr, as it always does. "
    "The servers use uvloop. The labels' ports are the defaults; the benchmark uses free ports.",
]


def table(cells: dict) -> str:
    lines = [HEADER, "|" + "---|" * 12]
    notes = []
    for c, r in sorted(cells.items(), key=lambda kv: int(kv[0])):
        if r.get("error"):
            notes.append(f"- concurrency {c}: {r['unmeasured']} of {r['reps']} repetition(s) not measured: "
                         f"{r['error']}")
        if r.get("errors_by_kind"):
            notes.append(f"- concurrency {c}: failed requests by kind: "
                         + ", ".join(f"{k}={v}" for k, v in r["errors_by_kind"].items()))
        if r["requests_per_second"] is None:
            lines.append(f"| {c} | " + " | ".join(["not measured"] + ["-"] * 10) + " |")
            continue
        lines.append("| " + " | ".join([str(c), _fmt(r["time_taken_s"]), _fmt(_int(r["complete"])),
                                        _fmt(_int(r["failed"])), _fmt(_int(r["total_transferred_bytes"])),
                                        _fmt(r["requests_per_second"], 1), _fmt(r["time_per_request_ms"]),
                                        _fmt(r["time_per_request_all_ms"]), _fmt(r["transfer_rate_kbps"], 1),
                                        _fmt(r["p50_ms"]), _fmt(r["p99_ms"]), _spread(r)]) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


def _int(v):
    return None if v is None else int(v)


def _spread(cell: dict) -> str:
    """Half the range over the median; n=1 when there was one repetition to judge by."""
    pct = cell.get("rps_spread_pct")
    return "n=1" if pct is None else f"±{pct}%"


def _why(entry: dict, default: str) -> str:
    return entry.get("why") or default


def render(results: dict, out: Path) -> None:
    m = results["machine"]
    http = {k: v for k, v in results["http"].items() if v["available"]}
    tcp = {k: v for k, v in results["tcp"].items() if v["available"]}
    tool, label = http_tool(results)
    line_chart({k: v[tool] for k, v in http.items()}, "requests_per_second",
               f"HTTP: requests/s against concurrency ({label}, page.html)", "requests/s", out / "http_rps.png")
    # (as the headline's: connect to the answer's last byte)
    line_chart({k: v[tool] for k, v in http.items()}, "p50_ms",
               f"HTTP: p50 time per request, connect to last byte ({label})", "ms", out / "http_p50.png")
    line_chart({k: v[tool] for k, v in http.items()}, "p99_ms",
               f"HTTP: p99 time per request, connect to last byte ({label})", "ms", out / "http_p99.png", log=True)
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
          f"and the stress tool runs at nice 5 (its default). Reproduce with `{results.get('reproduce', 'make bench')}` "
          f"(this run{' was QUICK=1 and' if results['quick'] else ''} took {results['duration_s']:.0f} s"
          f"{', on commit ' + results['commit'] if results.get('commit') else ''}).", "",
          *([] if tool == "ab" else ["ApacheBench is not installed here: the HTTP headline and charts are the "
                                     "stress tool's (`--http`, built like ab), and there are no ab tables.", ""]),
          *HOW_TO_READ, "",
          "## Headline: concurrency 10, ratios to the anchors", "", *headline(results), "",
          "![HTTP requests/s](http_rps.png)", "", "![TCP messages/s](tcp_rps.png)", "",
          "![HTTP p50](http_p50.png) ![HTTP p99](http_p99.png)", "", "![TCP p50](tcp_p50.png) ![TCP p99](tcp_p99.png)", "",
          "## HTTP servers (page.html)", ""]
    for name, entry in results["http"].items():
        md.append(f"### {name}")
        if not entry["available"]:
            md += ["", f"not measured: {_why(entry, 'not available on this machine')}", ""]
            continue
        if entry["ab"]:
            md += ["", "ApacheBench (`ab -n N -c C`):", "", table(entry["ab"]), ""]
        md += ["The project's stress tool (`ClientServer_StressTools.py --http URL -n N -c C --engine epoll`; "
               "p50/p99 are its total, connect to last byte, as ab's):",
               "", table(entry["stress"]), ""]
    md += ["## TCP cluster (line protocol, stress tool, 64-byte messages)", ""]
    for name, entry in results["tcp"].items():
        md.append(f"### {name}")
        if not entry["available"]:
            md += ["", f"not measured: {_why(entry, 'not available on this machine')}", ""]
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
            md.append(f"| {f['balancer']} | not measured: {_why(f, 'not available')} | | | | | |")
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


def http_tool(results: dict) -> tuple[str, str]:
    """Whose HTTP numbers the headline and charts show: ab's, or the stress tool's where ab is missing."""
    if results["machine"].get("ab") == "not installed":  # (run_bench.versions)
        return "stress", "stress tool --http"
    return "ab", "ApacheBench"


def _ratio(rps: float | None, anchor: float | None) -> str:
    return f"{rps / anchor:.2f}" if rps is not None and anchor else "n/a"


def headline(results: dict, c: int = 10) -> list[str]:
    """The README's table: every target at concurrency ``c``, as a ratio to its anchor.
    Ratios of medians; two cells whose spreads overlap are a tie."""
    tool, label = http_tool(results)
    how = f"ApacheBench `-n {results['requests']} -c {c}`" if tool == "ab" else \
        f"the stress tool `--http -n {results['requests']} -c {c} --engine epoll` (ab is not installed)"
    md = [f"HTTP, page.html, {how} (no keep-alive), medians:", "",
          "| target | requests/s | spread | p50 ms | p99 ms | failed | x nginx | x HAProxy http |",
          "|---|---|---|---|---|---|---|---|"]
    http = {k: _at(v[tool], c) for k, v in results["http"].items() if v["available"]}
    nginx = (http.get("nginx (anchor)") or {}).get("requests_per_second")
    hap = (http.get("HAProxy http over 4 backends (anchor)") or {}).get("requests_per_second")
    for name, cell in http.items():
        if cell is None:
            continue
        rps = cell["requests_per_second"]
        if rps is None:
            md.append(f"| {name} | not measured: {cell.get('error')} | | | | | | |")
            continue
        md.append(f"| {name} | {rps:,.0f} | {_spread(cell)} | {_fmt(cell['p50_ms'])} | {_fmt(cell['p99_ms'])} | "
                  f"{int(cell['failed'])} | {_ratio(rps, nginx)} | {_ratio(rps, hap)} |")
    for name, entry in results["http"].items():
        if not entry["available"]:
            md.append(f"| {name} | not measured: {_why(entry, 'not available')} | | | | | | |")
    md += ["", f"TCP cluster, line protocol, 64-byte messages, stress tool `-n {results['requests']} -c {c} "
           f"--engine epoll`, medians:",
           "", "| target | connections | messages/s | spread | p99 ms | failed | x HAProxy tcp |",
           "|---|---|---|---|---|---|---|"]
    for conn in ("per-request", "keepalive"):
        tcp = {k: _at(v[conn], c) for k, v in results["tcp"].items() if v["available"]}
        hap = (tcp.get("HAProxy tcp (anchor)") or {}).get("requests_per_second")
        for name, cell in tcp.items():
            if cell is None:
                continue
            rps = cell["requests_per_second"]
            if rps is None:
                md.append(f"| {name} | {conn} | not measured: {cell.get('error')} | | | | |")
                continue
            md.append(f"| {name} | {conn} | {rps:,.0f} | {_spread(cell)} | {_fmt(cell['p99_ms'])} | "
                      f"{int(cell['failed'])} | {_ratio(rps, hap)} |")
    for name, entry in results["tcp"].items():
        if not entry["available"]:
            md.append(f"| {name} | | not measured: {_why(entry, 'not available')} | | | | |")
    return md


def verdicts(results: dict) -> list[dict]:
    """Every speed target of the per-issue benchmarks as {issue, check, ratio, target, met}."""
    out = []
    for issue, sub in results.get("speed", {}).items():
        data = sub.get("data") or {}
        for v in data.get("verdicts") or []:
            if "http_rps_ratio" in v:  # two targets, each with its own ratio (bench_stress.py)
                for what, key, low, high in (("requests/s", "http_rps_ratio", 0.85, 1.15),
                                             ("p50", "http_p50_ratio", 0.8, 1.2)):
                    ratio = v.get(key)
                    out.append({"issue": issue, "check": f"--http vs ab, {what}", "ratio": ratio,
                                "target": f"{low}-{high}", "met": ratio is not None and low <= ratio <= high})
                continue
            check = v.get("what") or v.get("engine") or f"{v.get('connections', '')} {v.get('mode', '')}".strip()
            out.append({"issue": issue, "check": check, "ratio": v.get("ratio", v.get("ratio_min")),
                        "target": v.get("target"), "met": v.get("met")})
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
