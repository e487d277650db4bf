"""``make demo``: the main job, end to end, on free loopback ports.

Spawns the three echo servers and the load balancer, runs the stress tool
(``-n 1000 -c 10`` through the balancer, paced at 400 requests/s so the run
lasts long enough to watch), kills server2 with SIGKILL halfway, prints the
report (failed must be 0; server2's share stops where it died), and stops
everything it started. Logs go to logs/server_log.log and logs/client_log.log.
"""

from __future__ import annotations

import sys

from .stress.cli import main as stress_main

DEMO_ARGS = ["-n", "1000", "-c", "10", "--spawn", "--kill-backend", "server2@50%", "--rate", "400"]


def main() -> int:
    print("demo: ClientServer_StressTools.py " + " ".join(DEMO_ARGS), file=sys.stderr)
    code = stress_main(DEMO_ARGS + sys.argv[1:])
    if code == 0:
        print("demo: every message answered exactly once although server2 was killed mid-run; "
              "logs/server_log.log has the balancer's event=backend-down for it (and an event=failover "
              "for each client that had a message waiting on it then)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
