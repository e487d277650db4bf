"""``make demo``: the main job, end to end, on free loopback ports.

Spawns the three echo servers and the load balancer, runs the stress tool
(``-n 1000 -c 10`` through the balancer, paced at 400 requests/s so the run
lasts long enough to watch), kills server2 with SIGKILL halfway, prints the
report (failed must be 0; server2's share stops where it died), and stops
everything it started. Logs go to server_log.log and client_log.log in logs/
(or --log-dir, or $CLUSTERKIT_LOG_DIR).
"""

from __future__ import annotations

import sys
from pathlib import Path

from .stress.cli import build_parser
from .stress.cli import main as stress_main

DEMO_ARGS = ["-n", "1000", "-c", "10", "--spawn", "--kill-backend", "server2@50%", "--rate", "400"]


def main() -> int:
    print("demo: ClientServer_StressTools.py " + " ".join(DEMO_ARGS), file=sys.stderr)
    args = sys.argv[1:]
    code = stress_main(DEMO_ARGS + args)
    if code == 0:
        where = build_parser().parse_args(DEMO_ARGS + args).log_dir  # (the log's folder; it said logs/)
        print(f"demo: every message answered exactly once although server2 was killed mid-run; "
              f"{Path(where) / 'server_log.log'} has the balancer's event=backend-down for it (and an "
              f"event=failover for each client that had a message waiting on it then)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
