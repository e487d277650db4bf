"""The performance report behind ``make bench``: runners (ab, the stress tool),
the grid of medians, the targets, the failover runs, charts and report.md.

Entry point: ``bench/run_bench.py``. Not a library for other benchmarks; the
per-issue speed benchmarks live in ``bench/bench_*.py`` and are only called.
"""
