"""What every benchmark in bench/ shares: the C tools, medians, ratios.

- ``build_tools()`` compiles bench/c/lineload.c and lineecho.c (needs cc).
- ``run_lineload()`` drives a line-protocol target with the C load generator
  and returns its JSON result as a dict.
- ``lineecho_process()`` is the C echo server as a ``cluster.Process``.
- ``median()``/``spread()`` and ``Table`` print results the same way in every
  benchmark.

What it is not: a test. Benchmarks report numbers; they assert nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from clusterkit import cluster

BENCH = Path(__file__).resolve().parent
C_DIR = BENCH / "c"
BUILD = C_DIR / "build"
LOCK = "/tmp/clusterkit-bench.lock"


def build_tools() -> dict[str, Path]:
    """Compile the C tools if missing or older than their source; return their paths."""
    BUILD.mkdir(exist_ok=True)
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("a C compiler is needed for the benchmark's load generator (apt-get install gcc)")
    out = {}
    for name in ("lineload", "lineecho"):
        src, exe = C_DIR / f"{name}.c", BUILD / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
        out[name] = exe
    return out


def run_lineload(host: str, port: int, *, connections: int = 10, seconds: float = 5.0, size: int = 64,
                 per_request: bool = False, pipeline: int = 1, warmup: float = 0.5,
                 requests: int = 0) -> dict:
    """Run the C load generator once; its JSON result (requests, errors, rps, p50_ms, ...)."""
    exe = build_tools()["lineload"]
    argv = [str(exe), "--host", host, "--port", str(port), "-c", str(connections), "-d", str(seconds),
            "-s", str(size), "-P", str(pipeline), "-w", str(warmup)]
    if per_request:
        argv.append("--per-request")
    if requests:
        argv += ["-n", str(requests)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + warmup + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"lineload failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def lineecho_process(name: str, port: int) -> cluster.Process:
    exe = build_tools()["lineecho"]
    return cluster.Process(name, [str(exe), "--port", str(port), "--name", name], port=port)


def describe(doc: str) -> str:
    """A script's ``--help`` description: its docstring's first paragraph, on one line."""
    return " ".join(doc.split("\n\n")[0].split())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """min-max as a percentage of the median, e.g. '±3%'."""
    if len(values) < 2:
        return "n=1"
    m = median(values)
    return f"±{(max(values) - min(values)) / 2 / m * 100:.0f}%" if m else "-"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(str(h).rjust(w) for h, w in zip(headers, widths)))
    for row in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(row, widths)))


def run_ab(url: str, requests: int, concurrency: int, keepalive: bool = False, timeout: float = 300) -> dict:
    """Run ApacheBench once; the nine columns of its table, as numbers."""
    with tempfile.NamedTemporaryFile("r", suffix=".csv") as csv_out:
        argv = (["ab", "-q", "-n", str(requests), "-c", str(concurrency), "-e", csv_out.name] +
                (["-k"] if keepalive else []) + [url])
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"ab failed: {proc.stderr.strip()[-300:]}")
        result = parse_ab(proc.stdout)
        # ab's table rounds to whole ms; its -e file has the percentiles to the microsecond.
        percent = dict(line.split(",") for line in csv_out.read().splitlines()[1:])
        result["p50_precise_ms"] = float(percent.get("50", result["p50_ms"]))
        return result


def parse_ab(text: str) -> dict:
    import re

    def num(pattern: str, default: float = 0.0) -> float:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else default

    return {
        "concurrency": int(num(r"Concurrency Level:\s+(\d+)")),
        "time_taken_s": num(r"Time taken for tests:\s+([\d.]+)"),
        "complete": int(num(r"Complete requests:\s+(\d+)")),
        "failed": int(num(r"Failed requests:\s+(\d+)")),
        "non_2xx": int(num(r"Non-2xx responses:\s+(\d+)")),
        # (ab counts a failed request under each kind it fits: a reset is a Receive and an Exception)
        "failed_kinds": _failed_kinds(text),
        "total_transferred_bytes": int(num(r"Total transferred:\s+(\d+)")),
        "requests_per_second": num(r"Requests per second:\s+([\d.]+)"),
        "time_per_request_ms": num(r"Time per request:\s+([\d.]+) \[ms\] \(mean\)"),
        "time_per_request_all_ms": num(r"Time per request:\s+([\d.]+) \[ms\] \(mean, across"),
        "transfer_rate_kbps": num(r"Transfer rate:\s+([\d.]+)"),
        "p50_ms": num(r"\n\s+50%\s+(\d+)"),
        "p99_ms": num(r"\n\s+99%\s+(\d+)"),
        "max_ms": num(r"100%\s+(\d+)"),
    }


def _failed_kinds(text: str) -> dict[str, int]:
    """ab's "(Connect: 0, Receive: 25, Length: 25, Exceptions: 25)" under Failed requests, when there is one."""
    import re
    m = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)", text)
    return dict(zip(("Connect", "Receive", "Length", "Exceptions"), map(int, m.groups()))) if m else {}


def run_wrk(url: str, connections: int = 10, seconds: float = 5.0, threads: int = 1) -> dict:
    import re
    proc = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency", url],
                          capture_output=True, text=True, timeout=seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed: {proc.stderr.strip()[-300:]}")
    m = re.search(r"Requests/sec:\s+([\d.]+)", proc.stdout)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", proc.stdout)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", proc.stdout)
    return {"rps": float(m.group(1)) if m else 0.0,
            "errors": (int(errors.group(1)) if errors else 0) + (sum(map(int, sock.groups())) if sock else 0)}
