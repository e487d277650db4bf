"""``make demo``: the main job, end to end, on free loopback ports.

Starts the three echo servers, sends a few messages to each with the client,
prints the replies and timings, and stops everything it started.
"""

from __future__ import annotations

import sys

from . import cluster
from .client import client_send_message


def main() -> int:
    log_dir = "logs"
    with cluster.ProcessGroup() as group:
        ports = cluster.free_ports(3)
        for i, port in enumerate(ports, 1):
            group.start(cluster.echo_server(f"server{i}", port, log_dir=log_dir))
        print(f"started server1..3 on ports {ports}")
        for port in ports:
            for text in ("hello", "how are you?"):
                r = client_send_message(text, port=port)
                print(f"{r.reply!r:32} {r.confirmation!r:20} connect={r.connect_ms:.3f}ms "
                      f"latency={r.latency_ms:.3f}ms rtt={r.rtt_ms:.3f}ms")
    print("stopped; logs in logs/server_log.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
