"""The minimal reference for the TCP benchmark: a bare asyncio.Protocol echo of
line protocol v1 on uvloop, with no logging, limits or timeouts.

What it is for: the ceiling a Python server of this protocol can reach here,
so ``bench_tcp.py`` can say how much our server's extras (flow control, idle
sweep, logging) cost. What it is not: a server to use.
"""

import asyncio
import sys

import uvloop


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t = transport
        self.rest = b""

    def data_received(self, data):
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        out = []
        for m in lines:
            if m[-1:] == b"\r":
                m = m[:-1]
            out.append(b"REPLY ref %s\nACK ref %d\n" % (m, len(m)))
        self.t.write(b"".join(out))


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
