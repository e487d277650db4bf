"""The log writer when its file cannot be written: lines lost are counted and
said, and none runs into another (SPEC: no torn lines)."""

from __future__ import annotations

import errno
import os
import re

import pytest

from clusterkit import logs

pytestmark = pytest.mark.timeout(30)

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ \S+ ")


def disk_full_after(size: int):
    """An ``os.write`` for a disk that fills up: the first write puts ``size`` bytes
    (half a line), every later one fails with ENOSPC."""
    real_write = os.write
    calls = []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:size]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def _three_lines_then_one(path, monkeypatch, name: str, full, then=lambda: True) -> None:
    """A log at ``path`` gets three lines flushed while ``os.<name>`` is ``full``
    (``then()`` must hold after that flush), and one more once it is itself again."""
    writer = logs.LineWriter(path, program="server1", flush_interval=3600)
    real = getattr(os, name)
    try:
        for i in range(3):
            writer.write(f"{logs.timestamp()} INFO server1 event=first n={i}")
        monkeypatch.setattr(logs.os, name, full)
        writer.flush()
        assert then()
        monkeypatch.setattr(logs.os, name, real)  # room again
        writer.write(f"{logs.timestamp()} INFO server1 event=second")
        writer.flush()
    finally:
        writer.close()


def test_a_full_disk_is_said_once_and_the_lost_lines_counted(tmp_path, capsys):
    path = tmp_path / "server_log.log"
    path.symlink_to("/dev/full")  # every write: ENOSPC
    writer = logs.LineWriter(path, program="server1", flush_interval=3600)
    try:
        for i in range(10):
            writer.write(f"line {i}")
        writer.flush()
        for i in range(5):
            writer.write(f"more {i}")
        writer.flush()
    finally:
        writer.close()
    err = capsys.readouterr().err
    assert err.count("cannot write the log") == 1 and "No space left on device" in err, err
    assert writer.dropped + writer.lost == 15


def test_a_write_cut_short_by_a_full_disk_leaves_no_line_run_into_the_next(tmp_path, monkeypatch):
    """A write that stopped mid-line left half a line, and the next write's first
    line ran on from it: '2026-11-272026-11-27T13:22:48.632Z INFO ...'."""
    path = tmp_path / "server_log.log"
    _three_lines_then_one(path, monkeypatch, "write", disk_full_after(15))
    lines = path.read_text().splitlines()
    assert len(lines[0]) == 15  # the piece that went, on a line of its own
    assert all(LINE.match(line) and line.count("Z INFO") + line.count("Z WARNING") == 1 for line in lines[1:]), lines
    assert [line.split(" ", 3)[3] for line in lines[1:]] == ["event=second", "event=log-dropped lines=3"]


def test_lines_lost_after_a_torn_write_are_counted_once_each(tmp_path, monkeypatch):
    """The newline that ends a torn line (see above) is no line of its own: a second
    failed write after the torn one counted it as one more line lost."""
    path = tmp_path / "server_log.log"
    writer = logs.LineWriter(path, program="server1", flush_interval=3600)
    real_write = os.write
    full_after_a_few_bytes = disk_full_after(15)
    try:
        writer.write(f"{logs.timestamp()} INFO server1 event=first")
        monkeypatch.setattr(logs.os, "write", full_after_a_few_bytes)
        writer.flush()  # torn: 15 bytes of it went
        for i in range(2):
            writer.write(f"{logs.timestamp()} INFO server1 event=lost n={i}")
        writer.flush()  # nothing goes
        monkeypatch.setattr(logs.os, "write", real_write)
        writer.flush()
    finally:
        writer.close()
    lines = path.read_text().splitlines()
    assert len(lines[0]) == 15 and len(lines) == 2, lines
    assert lines[1].split(" ", 3)[3] == "event=log-dropped lines=3"  # the first, and the two


def test_a_tally_says_the_rest_of_a_burst_even_when_its_timer_fires_early(monkeypatch):
    """The rest of a burst is said a second on by a timer; uvloop's fired a moment
    early now and then (its clock is a loop turn's, in whole ms), the second was not
    up, and the count stayed unsaid for good (a flaky test of the balancer's
    no-backend lines found it)."""
    clock = [100.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    said: list[int] = []
    timers: list = []
    tally = logs.Tally(said.append, later=lambda delay, fn: timers.append((clock[0] + delay, fn)))
    tally.count()
    assert said == [1] and not timers  # the first at once
    clock[0] = 100.5
    tally.count()
    tally.count()
    assert said == [1] and len(timers) == 1  # the rest held back, one timer for them
    due, fire = timers.pop()
    assert due == pytest.approx(101.0)
    clock[0] = 100.9995  # early
    fire()
    assert said == [1] and len(timers) == 1  # not yet: again for the rest of the second
    clock[0], (due, fire) = 101.0005, timers.pop()
    fire()
    assert said == [1, 2] and not timers


class _FullFs:
    """os.fstatvfs's answer for a file system with ``free`` bytes left."""

    def __init__(self, free: int) -> None:
        self.f_frsize = 4096
        self.f_bfree = self.f_bavail = free // 4096


def test_a_batch_the_disk_has_no_room_for_is_dropped_whole_not_cut_mid_line(tmp_path, monkeypatch):
    """A write the disk had no room for was cut short by the kernel inside a line;
    in a file several processes append to, another's line then ran into it (two
    servers' lines on one). Now a batch without room is not written at all, and
    counted in the event=log-dropped line once there is room again."""
    path = tmp_path / "server_log.log"
    _three_lines_then_one(path, monkeypatch, "fstatvfs", lambda fd: _FullFs(100_000),  # less than the margin
                          then=lambda: path.read_bytes() == b"")
    lines = path.read_text().splitlines()
    assert all(LINE.match(line) for line in lines), lines
    assert [line.split(" ", 3)[3] for line in lines] == ["event=second", "event=log-dropped lines=3"]
