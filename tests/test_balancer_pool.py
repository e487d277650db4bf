"""Backend states and algorithms, without sockets."""

import random

import pytest

from clusterkit.balancer.algorithms import PowerOfTwoChoices
from clusterkit.balancer.config import BackendSpec, BalancerConfig
from clusterkit.config import ConfigError
from clusterkit.balancer.pool import DOWN, FALLING, RISING, UP, LatencyHistogram, Pool


def make_pool(n=3, algorithm="roundrobin", weights=None, rise=2, fall=3):
    specs = tuple(BackendSpec("127.0.0.1", 7001 + i, (weights or [1] * n)[i], f"s{i + 1}") for i in range(n))
    changes = []
    pool = Pool(BalancerConfig(backends=specs, algorithm=algorithm, rise=rise, fall=fall),
                lambda b, old, new: changes.append((b.name, old, new)))
    return pool, changes


def test_state_table_checks_and_traffic():
    pool, changes = make_pool(rise=2, fall=2)
    b = pool.backends[0]
    pool.check_failed(b, "timeout")
    assert b.state == FALLING and b.healthy
    pool.check_passed(b)
    assert b.state == UP
    pool.check_failed(b, "timeout")
    pool.check_failed(b, "timeout")
    assert b.state == DOWN and not b.healthy
    pool.check_passed(b)
    assert b.state == RISING and not b.healthy
    pool.check_failed(b, "refused")
    assert b.state == DOWN
    pool.check_passed(b)
    pool.check_passed(b)
    assert b.state == UP
    pool.traffic_error(b, "reset")
    assert b.state == DOWN and b.reason == "reset"
    assert changes == [("s1", FALLING, DOWN), ("s1", RISING, UP), ("s1", UP, DOWN)]


def test_response_timeouts_take_a_backend_down_at_fall_in_a_row_one_per_timeout():
    """The clients waiting on one slow moment time out together: one timeout. Three
    such moments a response timeout apart, with no answer nor passed check
    between, take the backend down (a stopped one); a slow one that answers now
    and then stays (congestion took every backend down at once: ERR no-backend)."""
    pool, changes = make_pool(fall=3)
    b = pool.backends[0]
    for _ in range(10):  # ten clients, one moment
        pool.response_timed_out(b, 100.0, 2.0)
    pool.response_timed_out(b, 102.5, 2.0)
    assert b.state == UP and b.failures == 11
    b.response_timeouts = 0  # (an answer came: relay_message.backend_data)
    pool.response_timed_out(b, 105.0, 2.0)
    pool.response_timed_out(b, 107.5, 2.0)
    pool.check_passed(b)
    pool.response_timed_out(b, 110.0, 2.0)
    pool.response_timed_out(b, 112.5, 2.0)
    assert b.state == UP
    pool.response_timed_out(b, 113.0, 2.0)  # (within the last one's timeout: the same moment)
    assert b.state == UP
    pool.response_timed_out(b, 115.0, 2.0)
    assert b.state == DOWN and b.reason == "response-timeout (3 in a row)"
    assert changes == [("s1", UP, DOWN)]


def test_connect_timeouts_take_a_backend_down_only_at_fall_in_a_row():
    """A connect timeout may be one lost SYN: DOWN at ``fall`` in a row; a connect
    that succeeds, or a check that passes, starts the count again."""
    pool, changes = make_pool(fall=3)
    b = pool.backends[0]
    pool.connect_timed_out(b)
    pool.connect_timed_out(b)
    pool.connected(b)
    pool.connect_timed_out(b)
    pool.connect_timed_out(b)
    pool.check_passed(b)
    pool.connect_timed_out(b)
    pool.connect_timed_out(b)
    assert b.state == UP and b.failures == 6
    pool.connect_timed_out(b)
    assert b.state == DOWN and b.reason == "connect-timeout (3 in a row)"
    assert changes == [("s1", UP, DOWN)]


def test_round_robin_skips_down_backends():
    pool, _ = make_pool()
    pool.traffic_error(pool.backends[1], "reset")
    assert [pool.choose().name for _ in range(4)] == ["s1", "s3", "s1", "s3"]
    for b in pool.backends:
        pool.traffic_error(b, "reset")
    assert pool.choose() is None


def test_smooth_weighted_round_robin():
    pool, _ = make_pool(algorithm="weighted", weights=[5, 1, 1])
    picks = [pool.choose().name for _ in range(7)]
    assert picks[:3] != ["s1", "s1", "s1"]  # smooth: the heavy backend's turns are spread out
    assert sorted(picks) == ["s1"] * 5 + ["s2", "s3"]


def test_least_connections_and_p2c():
    pool, _ = make_pool(algorithm="leastconn")
    pool.backends[0].active = 2
    pool.backends[1].active = 1
    assert pool.choose().name == "s3"
    p2c = PowerOfTwoChoices(3, random.Random(1))
    backends = pool.backends
    backends[2].active = 9
    assert all(p2c.choose([backends[1], backends[2]]).name == "s2" for _ in range(10))


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:7001", ("127.0.0.1", 7001, 1, "127.0.0.1:7001")),
    ("a=localhost:9:3", ("localhost", 9, 3, "a")),
    ("[::1]:7001:2", ("::1", 7001, 2, "[::1]:7001")),
])
def test_backend_spec_parse(text, expected):
    b = BackendSpec.parse(text)
    assert (b.host, b.port, b.weight, b.name) == expected


def test_an_ipv6_backend_in_an_error_is_in_brackets():
    with pytest.raises(ConfigError, match=r"backend \[::1\]:70000: not a port number"):  # (was ::1:70000)
        BackendSpec.parse("a=[::1]:70000")


@pytest.mark.parametrize("text", ["nope", "h:0", "h:1:0", "h:x", "a=nope", "a=h:0",
                                  "[::1]7001", "[::1]::7001"])  # (the last two were taken as [::1]:7001)
def test_bad_backend_spec(text):
    with pytest.raises(ConfigError) as info:
        BackendSpec.parse(text)
    # The flag as given, named form and all; and every form it takes (it left NAME= out).
    assert f"--backend {text!r}: " in str(info.value)
    if "0" not in text:
        assert str(info.value).endswith("expected [NAME=]HOST:PORT[:WEIGHT]")


def test_the_open_files_limit_bounds_clients_and_idle_backend_connections(monkeypatch):
    """Two descriptors a client; idle backend connections (reuse.py) get at most a
    quarter of what is left after the reserve."""
    import resource

    from clusterkit.balancer.app import client_limit

    monkeypatch.setattr(resource, "getrlimit", lambda what: (120, 120))
    room = 120 - 32  # (an eighth of it kept for the lingering closes of clients told ERR busy)
    assert client_limit(10_000, 32, 3) == ((room - room // 8 - 21) // 2, 7)
    assert client_limit(10_000, 0, 3) == ((room - room // 8) // 2, 0)
    monkeypatch.setattr(resource, "getrlimit", lambda what: (1 << 20, 1 << 20))
    assert client_limit(10_000, 32, 3) == (10_000, 32)


def test_the_idle_pool_keeps_at_most_its_limit_newest_first_and_forgets_closed_ones():
    from types import SimpleNamespace

    from clusterkit.balancer.reuse import IdlePool

    backend = object()

    def conn():
        c = SimpleNamespace(backend=backend, closed=False)
        c.drop = lambda: setattr(c, "closed", True)
        return c

    pool = IdlePool(2)
    a, b, c = conn(), conn(), conn()
    assert pool.put(a) and pool.put(b) and not pool.put(c)  # full
    b.drop()  # the server closed it while idle
    assert pool.count(backend) == 1
    assert pool.put(c)  # room again: the closed one is forgotten
    assert pool.take(backend) is c and pool.take(backend) is a and pool.take(backend) is None
    pool.put(a)
    pool.close(backend)
    assert a.closed and pool.take(backend) is None


def test_stats_latency_percentiles_are_within_two_percent():
    """/stats read p50, p90 and p99 off buckets 15% apart: three backends showed the
    same three figures."""
    h = LatencyHistogram()
    values = [0.2 + i * 0.001 for i in range(1000)]  # 0.2 .. 1.199 ms
    for v in values:
        h.record(v)
    for p in (50, 90, 99):
        exact = values[int(p / 100 * len(values)) - 1]
        assert exact <= h.percentile(p) <= exact * 1.02, (p, exact, h.percentile(p))
