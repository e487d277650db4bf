"""The minimal reference for the stress tool's benchmark: a Python load loop
for line protocol v1 in one flat ``select.epoll`` loop over persistent
connections, counting answers and nothing else (no timings, no checks of
what came back, no timeouts).

What it is for: the ceiling a Python load generator reaches here, next to
the C generator (bench/c/lineload), so ``bench_stress.py`` can show how
much of the C generator's rate Python can drive at all, and what the stress
tool's checks and histograms cost on top. What it is not: a load tool.

Usage: python bench/ref_load.py PORT [CONNECTIONS] [SECONDS]; prints JSON.
"""

import json
import select
import socket
import sys
import time


def main(port: int, connections: int, seconds: float) -> None:
    message = b"c000-000000000" + b"x" * 49 + b"\n"  # 64 bytes with the newline, as lineload's
    ep = select.epoll()
    socks = {}
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        socks[s.fileno()] = s
        ep.register(s.fileno(), select.EPOLLIN)
    lines = dict.fromkeys(socks, 0)  # answer lines still due per connection (two per message)
    for fd, s in socks.items():
        s.send(message)
        lines[fd] = 2
    done = 0
    cpu0, start = time.process_time(), time.monotonic()
    end = start + seconds
    poll = ep.poll
    while time.monotonic() < end:
        for fd, _ in poll(0.1):
            s = socks[fd]
            data = s.recv(65536)
            if not data:
                raise SystemExit("the server closed a connection")
            left = lines[fd] - data.count(b"\n")
            if left <= 0:
                done += 1
                s.send(message)
                left += 2
            lines[fd] = left
    elapsed = time.monotonic() - start
    print(json.dumps({"tool": "ref_load", "requests": done, "seconds": elapsed, "rps": done / elapsed,
                      "cpu_percent": 100 * (time.process_time() - cpu0) / elapsed}))


if __name__ == "__main__":
    args = sys.argv[1:]
    main(int(args[0]), int(args[1]) if len(args) > 1 else 10, float(args[2]) if len(args) > 2 else 3.0)
