"""The minimal reference for the balancer benchmark: a TCP byte relay in one
flat ``select.epoll`` loop, round-robin over its backends, with no health
checks, timeouts, flow control, logging or failover.

What it is for: the ceiling a Python relay reaches here, so
``bench_balancer.py`` can show how far HAProxy's rate is from what Python
can do at all on this machine, and how much our balancer's extras cost.
What it is not: a balancer to use. It never waits for a socket: what a full
socket (a slow reader) or a backend still connecting cannot take at once is
dropped.

Usage: python bench/ref_relay.py PORT BACKEND_PORT [BACKEND_PORT ...]
"""

import select
import socket
import sys

import _socket

BUF = 65536


def main(port: int, backends: list[tuple[str, int]]) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(4096)
    listener.setblocking(False)
    ep = select.epoll()
    lfd = listener.fileno()
    ep.register(lfd, select.EPOLLIN)
    other: dict[int, tuple[_socket.socket, _socket.socket]] = {}  # fd: (its socket, the peer socket)
    turn = 0
    while True:
        for fd, _ in ep.poll():
            if fd == lfd:
                for _ in range(64):
                    try:
                        cfd, _ = listener._accept()
                    except BlockingIOError:
                        break
                    client = _socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, cfd)
                    client.setblocking(False)
                    backend = _socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                    for s in (client, backend):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    backend.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as clusterkit/sockets.py says
                    turn = (turn + 1) % len(backends)
                    backend.connect_ex(backends[turn])
                    other[cfd] = (client, backend)
                    other[backend.fileno()] = (backend, client)
                    ep.register(cfd, select.EPOLLIN)
                    ep.register(backend.fileno(), select.EPOLLIN)
                continue
            pair = other.get(fd)
            if pair is None:
                continue
            sock, peer = pair
            try:
                data = sock.recv(BUF)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                del other[fd]
                other.pop(peer.fileno(), None)
                sock.close()
                peer.close()
                continue
            try:
                peer.send(data)
            except OSError:
                pass


if __name__ == "__main__":
    main(int(sys.argv[1]), [("127.0.0.1", int(p)) for p in sys.argv[2:]])
