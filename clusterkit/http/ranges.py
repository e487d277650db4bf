"""Byte ranges (RFC 9110 14): what part of a file a ``Range`` header asks for.

The servers answer one range with ``206 Partial Content``, as nginx does
(``curl -r``, ``curl -C -`` resuming a download, a media player seeking), a
range that starts past the end with ``416``, and ignore what they do not take
(the whole file, ``200``, as the RFC lets a server do): a header that is not
``bytes=...`` or does not parse, several ranges (nginx answers those with a
multipart body; few clients ask), a HEAD, or an ``If-Range`` that no longer
matches the file. No socket here: ``tests/test_http_servers.py`` checks it directly.
"""

from __future__ import annotations

UNSATISFIABLE = (-1, -1)
"""``wanted``'s answer for a range that starts past the end of the file (416)."""


def wanted(header: bytes | None, size: int) -> tuple[int, int] | None:
    """The first and last byte (inclusive) a ``Range`` header asks for in a file
    of ``size`` bytes; ``UNSATISFIABLE``; or None: serve the whole file."""
    if header is None:
        return None
    unit, eq, spec = header.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    first, last = first.strip(), last.strip()
    if not dash or not _digits(first or b"0") or not _digits(last or b"0") or not (first or last):
        return None
    if not first:  # bytes=-N: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return UNSATISFIABLE
        return max(0, size - n), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # not a valid range (RFC 9110 14.1.1): ignored
    if start >= size:
        return UNSATISFIABLE
    return start, min(int(last), size - 1) if last else size - 1


def still_matches(if_range: bytes | None, etag: bytes, last_modified: bytes) -> bool:
    """An ``If-Range`` (RFC 9110 13.1.5): the range is served only while the file is
    the one the client has part of, named by its strong ETag or its exact date."""
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith(b'"') or value.startswith(b"W/"):
        return value == etag  # a weak tag never matches
    return value == last_modified


def _digits(value: bytes) -> bool:
    return value.isdigit() and len(value) <= 18  # (a longer number is no file's offset here)
