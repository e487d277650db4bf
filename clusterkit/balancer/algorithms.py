"""Choosing a backend: round-robin, weighted round-robin, least-connections and
power-of-two-choices, with HAProxy's names.

Each algorithm picks among the backends that are healthy right now; the pool
passes them in the configured order. Pure code, no I/O, tested on its own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol


class Candidate(Protocol):
    index: int
    weight: int
    active: int
    current_weight: int


class RoundRobin:
    """Each backend in turn, skipping the ones that are down."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.next = 0

    def choose(self, healthy: Sequence[Candidate]) -> Candidate:
        # ``healthy`` comes in index order: the first at or after ``next``, else wrap around.
        if not healthy:
            raise LookupError("no healthy backend")
        start = self.next % self.size
        chosen = healthy[0]
        for b in healthy:
            if b.index >= start:
                chosen = b
                break
        self.next = chosen.index + 1
        return chosen


class WeightedRoundRobin:
    """nginx's smooth weighted round-robin: weights 3:1 give a b a a, not a a a b."""

    def __init__(self, size: int) -> None:
        pass

    def choose(self, healthy: Sequence[Candidate]) -> Candidate:
        total = 0
        best = None
        for b in healthy:
            b.current_weight += b.weight
            total += b.weight
            if best is None or b.current_weight > best.current_weight:
                best = b
        if best is None:
            raise LookupError("no healthy backend")
        best.current_weight -= total
        return best


class LeastConnections:
    """The backend with the fewest active connections; ties go round-robin."""

    def __init__(self, size: int) -> None:
        self.rr = RoundRobin(size)

    def choose(self, healthy: Sequence[Candidate]) -> Candidate:
        if not healthy:
            raise LookupError("no healthy backend")
        least = min(b.active for b in healthy)
        return self.rr.choose([b for b in healthy if b.active == least])


class PowerOfTwoChoices:
    """Two backends at random, the less busy of them (cheap and near-optimal)."""

    def __init__(self, size: int, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, healthy: Sequence[Candidate]) -> Candidate:
        if not healthy:
            raise LookupError("no healthy backend")
        if len(healthy) == 1:
            return healthy[0]
        a, b = self.rng.sample(list(healthy), 2)
        return a if a.active <= b.active else b


ALGORITHMS = {"roundrobin": RoundRobin, "weighted": WeightedRoundRobin,
              "leastconn": LeastConnections, "p2c": PowerOfTwoChoices}
