"""Load_Balancer.py's settings, as real processes: the TOML file and the
flags, bad values as one clear line, names and addresses (IPv6 too), and its
log lines."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time

import pytest

from clusterkit import cluster
from clusterkit.balancer import balancer_process
from clusterkit.balancer.config import BackendSpec
from clusterkit.balancer.health import check_once
from clusterkit.balancer.pool import Backend
from clusterkit.sockets import is_listener

from .balancer_setup import one_message
from .conftest import assert_bad_config, assert_usage_error, send_all_then_read

pytestmark = pytest.mark.timeout(90)


def test_tcp_mode_backend_names_resolve_at_start(procs, log_dir):
    """``localhost`` may list ::1 first; the servers listen on 127.0.0.1. A name
    that does not resolve stops the start with a clear error."""
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    port = cluster.free_port()
    procs.start(balancer_process(port, [f"solo=localhost:{server.port}"], "--mode", "tcp", log_dir=str(log_dir)))
    assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"
    bad = subprocess.run(cluster.python_script("Load_Balancer.py", "--mode", "tcp", "--port", "0", "--admin-port",
                                               "0", "--backend", "nowhere.invalid:7001", "--log-dir", str(log_dir)),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "nowhere.invalid" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("script, flags", [("Load_Balancer.py", ("--mode", "message", "--admin-port", "0")),
                                           ("Load_Balancer.py", ("--mode", "tcp", "--admin-port", "0")),
                                           ("Load_Balancer.py", ("--admin-port", "0", "--algorithm", "leastconn")),
                                           ("http_servers/lb.py", ())])
def test_a_backend_at_the_balancers_own_address_is_refused(script, flags, log_dir):
    """It started, and connected to itself in a loop: 17,000 connections in 3 s
    (``python Load_Balancer.py --port 7001``, meant for server1, does this); lb.py
    sent each request round itself until its headers grew past the limit. Also
    by name (localhost)."""
    port = cluster.free_port()
    host = "localhost" if "leastconn" in flags else "127.0.0.1"
    bad = subprocess.run(cluster.python_script(script, "--port", str(port), *flags, "--backend", f"{host}:{port}",
                                               "--backend", f"127.0.0.1:{cluster.free_port()}",
                                               "--log-dir", str(log_dir)),
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert f"{host}:{port}" in bad.stderr and "own address" in bad.stderr, bad.stderr


def test_a_wildcard_listener_is_every_address_of_its_family():
    """(Checked without listening on every interface.)"""
    assert is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("127.0.0.1", 7000))
    assert is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("127.0.0.2", 7000))  # (all of 127/8 is local)
    assert not is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("127.0.0.1", 7001))
    assert not is_listener([("0.0.0.0", 7000)], socket.AF_INET, ("192.0.2.1", 7000))  # (TEST-NET: not here)
    assert not is_listener([("0.0.0.0", 7000)], socket.AF_INET6, ("::1", 7000, 0, 0))
    assert is_listener([("127.0.0.1", 7000)], socket.AF_INET, ("127.0.0.1", 7000))
    assert not is_listener([("127.0.0.1", 7000)], socket.AF_INET, ("127.0.0.2", 7000))


def test_an_ipv4_address_written_as_ipv6_is_its_ipv4_one():
    """``[::ffff:127.0.0.1]:PORT`` as a backend reached the balancer itself in a loop
    unseen (150 connections for one message); to an IPv6-only ``::`` listener it
    is no loop, and was refused as one."""
    mapped = ("::ffff:127.0.0.1", 7000, 0, 0)
    assert is_listener([("127.0.0.1", 7000)], socket.AF_INET6, mapped)
    assert is_listener([("0.0.0.0", 7000)], socket.AF_INET6, mapped)
    assert not is_listener([("::", 7000, 0, 0)], socket.AF_INET6, mapped)
    assert not is_listener([("127.0.0.1", 7001)], socket.AF_INET6, mapped)
    # (a connect to 0.0.0.0, or ::, reaches this machine too)
    assert is_listener([("127.0.0.1", 7000)], socket.AF_INET, ("0.0.0.0", 7000))
    assert is_listener([("127.0.0.1", 7000)], socket.AF_INET6, ("::ffff:0.0.0.0", 7000, 0, 0))
    assert is_listener([("::1", 7000, 0, 0)], socket.AF_INET6, ("::", 7000, 0, 0))


def test_checks_find_the_address_of_a_name_the_server_listens_on(procs, log_dir):
    """A name with an IPv4 and an IPv6 address (Debian's ``localhost``), the server
    on ``::1`` alone: the traffic went to 127.0.0.1 only, and the backend stayed
    DOWN ("check refused") for good. Now a check refused at the first address
    tries the others; the first that passes takes the traffic, until the first
    address passes again. Something else listening at the other address takes
    nothing, and the verdict is the first address's."""
    try:
        port = cluster.free_port("::1")
    except OSError:
        pytest.skip("no ::1 on this machine")
    six = procs.start(cluster.echo_server("six", port, log_dir=str(log_dir), host="::1"))
    backend = Backend(0, BackendSpec("localhost", port, name="six"))
    backend.addresses = [(socket.AF_INET, ("127.0.0.1", port)), (socket.AF_INET6, ("::1", port, 0, 0))]
    backend.address = backend.addresses[0]
    assert asyncio.run(check_once(backend, 5.0)) is None
    assert backend.address == backend.addresses[1] and backend.snapshot()["connects_to"] == f"[::1]:{port}"
    four = procs.start(cluster.echo_server("four", port, log_dir=str(log_dir)))
    assert asyncio.run(check_once(backend, 5.0)) is None  # (the first address passes: the traffic goes back)
    assert backend.address == backend.addresses[0]
    four.stop()
    six.stop()
    with socket.create_server(("::1", port), family=socket.AF_INET6):  # (accepts, and answers nothing)
        assert asyncio.run(check_once(backend, 0.5)) == "refused"
    assert backend.address == backend.addresses[0]


def test_lb_refuses_a_backend_name_that_does_not_resolve(log_dir):
    """As Load_Balancer.py, nginx and HAProxy do; it started and answered 503 to everything."""
    bad = subprocess.run(cluster.python_script("http_servers/lb.py", "--port", "0", "--backend", "nowhere.invalid:9002",
                                               "--log-dir", str(log_dir)), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "nowhere.invalid" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_ipv6_hosts_in_brackets_in_the_config_file(procs, log_dir, tmp_path):
    """``host = "[::1]"`` as ``--host [::1]`` and ``--backend [::1]:PORT`` take it: it
    was "cannot resolve '[::1]'" (Load_Balancer.py) and a start over a backend that
    answered 503 for ever (lb.py)."""
    try:
        ports = [cluster.free_port("::1") for _ in range(2)]
    except OSError:
        pytest.skip("no ::1 on this machine")
    server = procs.start(cluster.echo_server("six", ports[0], log_dir=str(log_dir), host="::1"))
    toml = tmp_path / "six.toml"
    toml.write_text(f'[balancer]\nhost = "[::1]"\nport = {ports[1]}\nadmin-port = 0\n\n'
                    f'[[backends]]\nname = "six"\nhost = "[::1]"\nport = {server.port}\n')
    procs.start(cluster.Process("balancer", cluster.python_script("Load_Balancer.py", "--config", str(toml),
                                                                  "--log-dir", str(log_dir)),
                                port=ports[1], host="::1"))
    assert send_all_then_read(ports[1], b"over six\n", "::1") == b"REPLY six over six\nACK six 8\n"


@pytest.mark.parametrize("mode", ["tcp", "message"])
def test_balancer_over_ipv6_loopback(procs, log_dir, mode):
    try:
        ports = [cluster.free_port("::1") for _ in range(2)]
    except OSError:
        pytest.skip("no ::1 on this machine")
    server = procs.start(cluster.echo_server("six", ports[0], log_dir=str(log_dir), host="::1"))
    balancer = procs.start(balancer_process(ports[1], [f"six=[::1]:{server.port}"], "--mode", mode,
                                            log_dir=str(log_dir), host="::1"))
    assert send_all_then_read(balancer.port, b"over six\n", "::1") == b"REPLY six over six\nACK six 8\n"
    assert f"listening on [::1]:{balancer.port} " in balancer.stderr()  # (was ::1:PORT)
    # A client's address in the log as the backends' are: in brackets (it was peer=::1:PORT).
    log = log_dir / "server_log.log"
    deadline = time.monotonic() + 30
    while not re.search(r" balancer event=session conn=\d+ peer=\[::1\]:\d+ ", log.read_text()):
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    assert re.search(r" six event=open conn=\d+ peer=\[::1\]:\d+", log.read_text()), log.read_text()


def test_session_log_names_the_backends_used(lb, log_dir):
    lb.start()
    one_message(lb.port)
    lb.lb.stop()
    text = (log_dir / "server_log.log").read_text()
    assert " balancer event=session " in text and "backends=server1" in text


def test_toml_config_and_bad_flags(tmp_path, procs, log_dir):
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[balancer]\nalgorithm = "leastconn"\n\n[[backends]]\nname = "solo"\nport = {server.port}\n')
    port = cluster.free_port()
    procs.start(cluster.Process("lb", cluster.python_script(
        "Load_Balancer.py", "--config", str(toml), "--port", str(port), "--admin-port", "0",
        "--log-dir", str(log_dir)), port=port))
    assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"
    bad = subprocess.run(cluster.python_script("Load_Balancer.py", "--backend", "nonsense", "--log-dir",
                                               str(log_dir)), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "nonsense" in bad.stderr and "Traceback" not in bad.stderr
    same = subprocess.run(cluster.python_script("Load_Balancer.py", "--port", "7500", "--admin-port", "7500",
                                                "--log-dir", str(log_dir)), capture_output=True, text=True, timeout=30)
    assert same.returncode == 2 and "--admin-port 7500 is the balancer's own --port" in same.stderr


@pytest.mark.parametrize("text, message", [
    ('[[backends]]\nport = "abc"\n', "port must be a whole number, got 'abc'"),
    ('[balancer]\nrise = "two"\n', "rise must be a whole number"),
    ("balancer = 5\n", "expected a table of settings"),
    ("[[backends]]\nhost = 5\nport = 7001\n", "host must be a string"),
    ("backends = []\n", "[[backends]] must list at least one backend"),
    ("[[backends]]\nport = 7001\nwieght = 3\n", "unknown setting 'wieght'"),
    ("[balancr]\nport = 1\n", "unknown tables balancr"),
    ("[[backends]]\nport = true\n", "port must be a whole number, got True"),
    ("[balancer]\nmax-line = 0\n", "--max-line must be 1 to"),
    ("[balancer]\nmax-line = 99999999999999\n", "--max-line must be 1 to"),
    ('[[backends]]\nport = 7001\nname = "a b"\n', "printable ASCII, no spaces"),
    ('[balancer]\nlog-level = "warning"\n', "unknown setting 'log-level'"),  # (was taken, and ignored)
    ("[balancer]\ncheck-interval = inf\n", "--check-interval must be positive, at most a year, got inf"),
    ("[balancer]\ndrain-timeout = -1.0\n", "--drain-timeout must be 0 or more"),
    ('[balancer]\nname = "a=b"\n', "--name 'a=b': printable ASCII, no spaces"),
    ('[balancer]\nhost = ""\n', "host: give a host name or address"),  # (listened on every interface)
    ('[balancer]\nname = ""\n', "--name: give it a name"),
    ("[balancer]\nmax_line = 100\nmax-line = 200\n", "'max-line' is set twice (also as 'max_line')"),  # (200 won)
])
def test_a_bad_config_file_is_one_clear_line(tmp_path, log_dir, text, message):
    """Each was a traceback, or accepted (an empty backend list meant the default backends)."""
    assert_bad_config("Load_Balancer.py", text, tmp_path, message, "--port", "0", "--admin-port", "0",
                      "--log-dir", str(log_dir))


@pytest.mark.parametrize("text, message", [("[balancer]\nadmin-port = 70000\n", "--admin-port: not a port number: 70000"),
                                           ("[balancer]\nport = 99999\n", "--port: not a port number: 99999")])
def test_a_port_out_of_range_in_the_config_file_is_named(tmp_path, log_dir, text, message):
    """It said 'not a port number', naming neither the setting nor its value."""
    extra = ["--admin-port", "0"] if "admin" not in text else ["--port", "0"]
    assert_bad_config("Load_Balancer.py", text, tmp_path, message, *extra, "--log-dir", str(log_dir))


@pytest.mark.parametrize("flag, value", [("--check-interval", "inf"), ("--response-timeout", "nan"),
                                         ("--drain-timeout", "inf"), ("--idle-timeout", "-1")])
def test_a_timeout_that_is_no_finite_number_is_a_usage_error(flag, value, log_dir):
    """--check-interval inf was taken: a backend that went down stayed down for good."""
    assert_usage_error("Load_Balancer.py", flag, value, "--log-dir", str(log_dir), message=f"argument {flag}")


@pytest.mark.parametrize("script", ["server1.py", "client.py", "ClientServer_StressTools.py", "Load_Balancer.py",
                                    "http_servers/lb.py"])
@pytest.mark.parametrize("host", ["[::1]:7001", "127.0.0.1:7001", "[::1"])
def test_a_host_with_a_port_is_a_usage_error(script, host, log_dir):
    """``--host [::1]:7001`` was looked up as a name: "cannot connect to
    [[::1]:7001]:7000" and exit 69 (peer unavailable), where the flag is at fault."""
    assert_usage_error(script, "--host", host, "--log-dir", str(log_dir), message="a host without a port")


def test_a_config_file_that_cannot_be_read_is_one_clear_line(tmp_path, log_dir):
    """A file not in UTF-8 was a traceback; a folder a bare "[Errno 21]" and exit 1."""
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'[balancer]\nmode = "m\xe9ssage"\n')
    assert_usage_error("Load_Balancer.py", "--config", str(latin), "--log-dir", str(log_dir),
                       message="not valid TOML")
    assert_usage_error("Load_Balancer.py", "--config", str(tmp_path), "--log-dir", str(log_dir),
                       message="cannot read it")


def test_the_config_files_port_holds_unless_the_flag_is_given(tmp_path, procs, log_dir):
    """The command line's defaults replaced the file's port, host and admin port."""
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    port = cluster.free_port()
    toml = tmp_path / "c.toml"
    toml.write_text(f"[balancer]\nport = {port}\nadmin-port = 0\n\n[[backends]]\nname = \"solo\"\n"
                    f"port = {server.port}\n")
    procs.start(cluster.Process("lb", cluster.python_script("Load_Balancer.py", "--config", str(toml),
                                                            "--log-dir", str(log_dir)), port=port))
    assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"


def test_two_balancers_in_one_log_go_by_their_names(tmp_path, procs, log_dir):
    """Both wrote their lines as 'balancer': whose backend went down was anyone's guess.
    The name comes from the config file, and --name wins over it."""
    server = procs.start(cluster.echo_server("solo", cluster.free_port(), log_dir=str(log_dir)))
    toml = tmp_path / "c.toml"
    toml.write_text(f'[balancer]\nname = "front-tcp"\nmode = "tcp"\nadmin-port = 0\n\n[[backends]]\n'
                    f'name = "solo"\nport = {server.port}\n')
    ports = cluster.free_ports(2)
    for port, extra in ((ports[0], ()), (ports[1], ("--name", "front-msg", "--mode", "message"))):
        procs.start(cluster.Process("lb", cluster.python_script(
            "Load_Balancer.py", "--config", str(toml), "--port", str(port), *extra, "--log-dir", str(log_dir)),
            port=port))
        assert one_message(port) == b"REPLY solo hi\nACK solo 2\n"
    deadline = time.monotonic() + 10
    while True:
        log = (log_dir / "server_log.log").read_text()
        if " INFO front-tcp event=session " in log and " INFO front-msg event=session " in log:
            break
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    assert " balancer event=" not in log and " WARNING front-msg event=listen " in log
