"""The shared board between the clients and the process watching the run.

One flat array of integers, a plain list when every client runs in this
process and a shared-memory array when they are spread over processes (each
process writes only its own slots, so no lock is needed):

- ``done[c]`` and ``failed[c]``: requests done and failed by client ``c``
  (failed holds one total per Recorder, in the slot of its first client);
- ``streak[c]``: requests in a row for which client ``c`` got nothing back (a
  failed connect, a timeout; 0 after any answer), which tells a dead target from
  a slow one;
- ``stop``: set by the watcher to end every client early;
- a coarse latency histogram per process (four buckets per power of two of
  microseconds, so within 25%), enough for a live p50/p99. The exact
  percentiles of the report come from the HDR histograms, not from here.
"""

from __future__ import annotations

BUCKETS = 4 * 40  # up to 2**40 us: far beyond any --timeout


def bucket(us: int) -> int:
    """The live-histogram bucket of a latency in microseconds."""
    b = us.bit_length()
    if b < 3:
        return us
    if b >= 40:
        return BUCKETS - 1
    return (b << 2) | ((us >> (b - 3)) & 3)


LIVE_CACHE = 1 << 14
BUCKET_OF = [bucket(us) for us in range(LIVE_CACHE)]
"""``bucket`` of each latency under 16 ms, looked up, not computed, per answer."""


def bucket_value(index: int) -> float:
    """The middle of a bucket, in microseconds."""
    if index < 4:
        return float(index)
    b, sub = index >> 2, index & 3
    low = (4 | sub) << (b - 3)
    return low + (1 << (b - 3)) / 2


class Board:
    """Index arithmetic over the shared array; the array itself is ``self.a``."""

    def __init__(self, concurrency: int, processes: int, array=None) -> None:
        self.n = concurrency
        self.stop_slot = 3 * concurrency
        self.hist_base = self.stop_slot + 1
        self.size = self.size_for(concurrency, processes)
        self.a = array if array is not None else [0] * self.size

    @staticmethod
    def size_for(concurrency: int, processes: int) -> int:
        """Slots in all: done, failed and streak per client, stop, a histogram per process."""
        return 3 * concurrency + 1 + processes * BUCKETS

    def failed_slot(self, client: int) -> int:
        return self.n + client

    def streak_slot(self, client: int) -> int:
        return 2 * self.n + client

    def hist_offset(self, process: int) -> int:
        return self.hist_base + process * BUCKETS

    # -- read by the watcher ------------------------------------------------------

    def done(self) -> int:
        return sum(self.a[:self.n])

    def failed(self) -> int:
        return sum(self.a[self.n:2 * self.n])

    def stop(self) -> None:
        self.a[self.stop_slot] = 1

    def all_refused(self, streak: int, shares: list[int | None] | None = None) -> bool:
        """Some client is still meant to send (every client, without ``shares``), and
        every client got nothing back for its last ``streak`` requests: those done
        with their share too, whose last answers say the target answers. (Counted
        over the clients still sending only, a server that left every other
        connection unanswered was called dead once the answered clients were done.)"""
        a, n = self.a, self.n
        sending = any(shares is None or shares[c] is None or a[c] < shares[c] for c in range(n))
        return sending and all(a[2 * n + c] >= streak for c in range(n))

    def percentiles(self, *qs: float) -> list[float | None]:
        """Approximate latency percentiles so far, in milliseconds (None before any answer)."""
        counts = [0] * BUCKETS
        a = self.a
        for base in range(self.hist_base, self.size, BUCKETS):
            for i, v in enumerate(a[base:base + BUCKETS]):
                counts[i] += v
        total = sum(counts)
        if not total:
            return [None for _ in qs]
        out = []
        for q in qs:
            want = q / 100 * total
            seen = 0
            for i, c in enumerate(counts):
                seen += c
                if c and seen >= want:
                    out.append(bucket_value(i) / 1000)
                    break
        return out


class StopFlag:
    """``threading.Event``'s ``is_set`` over the board's stop slot, which
    ``Board.stop`` sets: one write stops the clients of every process."""

    __slots__ = ("a", "i")

    def __init__(self, board: Board) -> None:
        self.a = board.a
        self.i = board.stop_slot

    def is_set(self) -> bool:
        return bool(self.a[self.i])
