"""Static files from the document root (``http_servers/www/``), from memory.

Each file is read once and kept with its ready-made response headers; a
``stat`` at most once a second per file notices edits. Paths are decoded,
normalised and resolved (symlinks included) and must stay inside the root.
Dot segments are resolved as nginx resolves them (``/x/../page.html`` and
``/x/%2e%2e/page.html`` are ``/page.html``); a ``..`` that would climb above
the root (also as ``%2e%2e`` or ``..%2f``), and symlinks pointing outside, get
404, never a byte from outside ``www/``; ``%2f`` is a ``/`` like any other
(``/%2fpage.html`` is ``//page.html``, inside the root).

Memory: one copy of each file, keyed by the file it resolves to (``/a``,
``//a`` and ``/%61`` share it), at most ``max_cache_bytes`` in all (past it
the cache starts again); the answers to a batch of pipelined requests are made
``ANSWER_BUDGET`` bytes at a time, the rest waiting until the client has taken
those. Before, each spelling of a path held its own copy of the file, and 200
pipelined requests for a 3 MB file were answered into 1 GB at once.

What it is not: a general file server. Files over ``max_cached`` bytes are
refused (404); directories are not listed; ``/`` serves ``page.html``. A
``Range`` asking for one span gets it (206, ``ranges.py``).
"""

from __future__ import annotations

import hashlib
import mimetypes
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote_to_bytes

from .. import logs
from .core import SERVER, HttpError, Request, build_response, error_response, http_date
from .ranges import UNSATISFIABLE, still_matches, wanted

INDEX = "page.html"
ANSWER_BUDGET = 256 * 1024
"""Bytes of answers ``StaticFiles.answer`` makes at once (one answer may pass it)."""
PATHS_KEPT = 10_000
"""Request paths remembered with the file they name; past it, the table starts again."""
DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "http_servers" / "www"


@dataclass
class CachedFile:
    path: Path
    body: bytes
    mtime: float
    size: int
    checked: float
    etag: bytes
    last_modified: bytes
    content_type: bytes
    fixed_headers: bytes
    """Every header line but Date and Connection, for a 200."""


class StaticFiles:
    def __init__(self, root: str | Path = DEFAULT_ROOT, backend_name: str = "",
                 max_cached: int = 8 << 20, max_cache_bytes: int = 64 << 20) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"document root {self.root} is not a folder")
        self.backend_header = f"X-Backend: {backend_name}\r\n".encode() if backend_name else b""
        self.log_suffix = f" backend={backend_name}" if backend_name else ""
        self.max_cached = max_cached
        self.max_cache_bytes = max_cache_bytes
        self.cache: dict[bytes, CachedFile] = {}  # by request path, as written
        self.files: dict[Path, CachedFile] = {}  # by the file it resolves to: one copy each
        self.cached_bytes = 0
        self.lock = threading.Lock()

    def resolve(self, raw_path: bytes) -> Path | None:
        """The file a request path names, or None when it is outside the root or missing."""
        found = self._inside(raw_path)
        if found is None:
            return None
        real, named, slash = found
        if real.is_dir():
            if not slash:
                return None  # /docs: redirected to /docs/ (``folder_without_slash``)
            real = real / INDEX
            if not real.is_file():
                return None
        elif named and slash:
            return None  # /page.html/ names a directory, and a file is none (nginx: 404)
        return real if real.is_file() else None

    def folder_without_slash(self, raw_path: bytes) -> bool:
        """``/docs`` names a folder with a page: nginx answers 301 to ``/docs/``, so
        that the page's relative links (style.css) resolve inside the folder, not
        beside it (served as it was, the page lost its style and pictures)."""
        found = self._inside(raw_path)
        return found is not None and not found[2] and found[0].is_dir() and (found[0] / INDEX).is_file()

    def _inside(self, raw_path: bytes) -> tuple[Path, bool, bool] | None:
        """The real path a request path names inside the root (None: outside it, or
        nothing there; ``/`` names the index), whether it names anything below the
        root, and whether it ends in a slash."""
        try:
            decoded = unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\x00" in decoded or "\\" in decoded:
            return None
        parts = without_dot_segments(decoded.split("/"))
        if parts is None:
            return None
        candidate = self.root.joinpath(*parts) if parts else self.root / INDEX
        try:
            real = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if real != self.root and self.root not in real.parents:
            return None  # a symlink pointing outside the root
        return real, bool(parts), decoded.endswith(("/", "/.", "/.."))

    def _load(self, path: Path, now: float) -> CachedFile | None:
        try:
            st = path.stat()
            if st.st_size > self.max_cached:
                return None
            body = path.read_bytes()
        except OSError:
            return None
        ctype = content_type(path.name, body)
        etag = b'"%s"' % hashlib.blake2b(body, digest_size=8).hexdigest().encode()
        last_modified = formatdate(st.st_mtime, usegmt=True).encode()
        fixed = (b"Server: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nLast-Modified: %s\r\nETag: %s\r\n"
                 b"Accept-Ranges: bytes\r\n%s" % (SERVER, ctype.encode(), len(body), last_modified, etag,
                                                   self.backend_header))
        return CachedFile(path, body, st.st_mtime, st.st_size, now, etag, last_modified, ctype.encode(), fixed)

    def lookup(self, raw_path: bytes) -> CachedFile | None:
        now = time.monotonic()
        entry = self.cache.get(raw_path)
        if entry is not None and now - entry.checked < 1.0:
            return entry
        with self.lock:  # (the threaded server's threads: one at a time past here)
            return self._lookup(raw_path, entry, now)

    def _lookup(self, raw_path: bytes, entry: CachedFile | None, now: float) -> CachedFile | None:
        path = self.resolve(raw_path)
        if path is None:  # gone (or never there): its copy goes too
            if entry is not None:
                self._forget(entry.path)
            self.cache.pop(raw_path, None)
            return None
        entry = self.files.get(path)
        if entry is not None and now - entry.checked >= 1.0:
            try:
                st = path.stat()
            except OSError:
                st = None
            if st is not None and st.st_mtime == entry.mtime and st.st_size == entry.size:
                entry.checked = now
            else:
                entry = None
        if entry is None:
            entry = self._load(path, now)
            if entry is None:  # grown past max_cached, or unreadable
                self._forget(path)
                self.cache.pop(raw_path, None)
                return None
            self._keep(entry)
        if len(self.cache) >= PATHS_KEPT:
            self.cache.clear()
        self.cache[raw_path] = entry
        return entry

    def _forget(self, path: Path) -> None:
        """The file's copy goes, under every spelling of its path (rare: a file
        changed, deleted or grown past max_cached)."""
        old = self.files.pop(path, None)
        if old is not None:
            self.cached_bytes -= old.size
            for spelling in [k for k, e in self.cache.items() if e is old]:
                del self.cache[spelling]

    def _keep(self, entry: CachedFile) -> None:
        self._forget(entry.path)  # (its old copy, if the file changed)
        self.cached_bytes += entry.size
        if self.cached_bytes > self.max_cache_bytes:
            self.files.clear()
            self.cache.clear()
            self.cached_bytes = entry.size
        self.files[entry.path] = entry

    def answer(self, requests: list[Request], peer: str, elog: logs.EventLog,
               budget: int = ANSWER_BUDGET) -> tuple[bytes, bool, int]:
        """The answers to the first of a batch of (pipelined) requests, in order, as one
        buffer; whether the connection stays open; and how many requests they answer:
        all of them, or fewer once the answers pass ``budget`` bytes, or up to one
        that closes the connection. Logs one line per request. Both the async and
        the threaded server use this."""
        out = []
        keep = True
        size = 0
        for req in requests:
            if req.method not in (b"GET", b"HEAD"):
                status, resp, keep = 405, error_response(HttpError(405), self.backend_header), False
            else:
                try:
                    status, resp = self.respond(req)
                    keep = req.keep_alive
                except Exception as exc:  # a bug here: a 500 and the close, not a silent drop of the batch
                    if elog.error:
                        elog.line("ERROR", f"event=error client={peer} status=500 "
                                           f"reason={logs.quote(f'{type(exc).__name__}: {exc}')}")
                    status, resp, keep = 500, error_response(HttpError(500, head_only=req.method == b"HEAD"),
                                                              self.backend_header), False
            out.append(resp)
            if elog.info:
                elog.line("INFO", f"event=request client={peer} method={req.method.decode('latin-1')} "
                                  f"path={logs.quote(req.target.decode('latin-1'))} status={status} "
                                  f"bytes={len(resp)} ms={(time.monotonic() - req.started) * 1000:.3f}"
                                  f"{self.log_suffix}")
            size += len(resp)
            if not keep or size >= budget:
                break
        return (out[0] if len(out) == 1 else b"".join(out)), keep, len(out)

    def respond(self, req: Request) -> tuple[int, bytes]:
        """(status, whole response) for a GET or HEAD request."""
        path = req.path
        keep = req.keep_alive
        conn = b"keep-alive" if keep else b"close"
        if path == b"/healthz":
            return 200, build_response(200, b"ok\n", headers=self.backend_header, keep_alive=keep,
                                       head_only=req.method == b"HEAD")
        entry = self.lookup(path)
        if entry is None and self.folder_without_slash(path):
            query = req.target.partition(b"?")[2]
            # (one leading slash: //evil.example/ would send the browser to another host)
            location = b"/" + path.lstrip(b"/") + b"/" + (b"?" + query if query else b"")
            return 301, build_response(301, b"301 Moved Permanently\n", keep_alive=keep,
                                       headers=b"Location: %s\r\n%s" % (location, self.backend_header),
                                       head_only=req.method == b"HEAD")
        if entry is None:
            return 404, build_response(404, b"404 Not Found\n", headers=self.backend_header, keep_alive=keep,
                                       head_only=req.method == b"HEAD")
        if req.conditional and _precondition_failed(req, entry):
            return 412, build_response(412, b"412 Precondition Failed\n", headers=self.backend_header,
                                       keep_alive=keep, head_only=req.method == b"HEAD")
        if req.conditional and _not_modified(req, entry):
            return 304, (b"HTTP/1.1 304 Not Modified\r\nServer: %s\r\nDate: %s\r\nETag: %s\r\n"
                         b"Last-Modified: %s\r\n%sConnection: %s\r\n\r\n"
                         % (SERVER, http_date(), entry.etag, entry.last_modified,
                            self.backend_header, conn))
        if req.conditional and req.method == b"GET":
            span = wanted(req.header(b"range"), len(entry.body))
            if span is not None and still_matches(req.header(b"if-range"), entry.etag, entry.last_modified):
                return self._part(req, entry, span)
        head = b"HTTP/1.1 200 OK\r\n%sDate: %s\r\nConnection: %s\r\n\r\n" % (
            entry.fixed_headers, http_date(), conn)
        return 200, head if req.method == b"HEAD" else head + entry.body

    def _part(self, req: Request, entry: CachedFile, span: tuple[int, int]) -> tuple[int, bytes]:
        """206 with the bytes ``span`` names, or 416 for a range past the end."""
        size = len(entry.body)
        if span == UNSATISFIABLE:
            return 416, build_response(416, b"416 Range Not Satisfiable\n", keep_alive=req.keep_alive,
                                       headers=b"Content-Range: bytes */%d\r\n%s" % (size, self.backend_header))
        first, last = span
        return 206, build_response(206, entry.body[first:last + 1], content_type=entry.content_type,
                                   keep_alive=req.keep_alive,
                                   headers=b"Content-Range: bytes %d-%d/%d\r\nLast-Modified: %s\r\nETag: %s\r\n%s"
                                   % (first, last, size, entry.last_modified, entry.etag, self.backend_header))


COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz"}
"""What a compressed file (``page.html.gz``) is sent as: itself, not what it holds
(labelled text/html, a browser showed the compressed bytes as a page)."""


def without_dot_segments(segments: list[str]) -> list[str] | None:
    """A decoded path's segments with ``.`` and ``..`` resolved (RFC 3986 5.2.4, as
    nginx does: ``/x/../page.html`` is ``/page.html``) and the empty ones left out;
    None when a ``..`` would climb above the root (nginx: 400; here 404)."""
    parts: list[str] = []
    for segment in segments:
        if segment == "..":
            if not parts:
                return None
            parts.pop()
        elif segment not in ("", "."):
            parts.append(segment)
    return parts


def content_type(name: str, body: bytes) -> str:
    """A file's Content-Type. Text says ``charset=utf-8`` only when it is UTF-8 (or
    ASCII): a charset in the header overrides the page's own ``<meta charset>``, and
    a Latin-1 page came out garbled. nginx says no charset at all."""
    ctype, encoding = mimetypes.guess_type(name)
    if encoding is not None:
        return COMPRESSED.get(encoding, "application/octet-stream")
    ctype = ctype or "application/octet-stream"
    if ctype.startswith("text/") or ctype in ("application/javascript", "image/svg+xml"):
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return ctype
        ctype += "; charset=utf-8"
    return ctype


def _http_date(value: bytes) -> float | None:
    """An HTTP date header's time (None: no date)."""
    try:
        return parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, OverflowError):  # (a year past 9999 overflows)
        return None


def _precondition_failed(req: Request, entry: CachedFile) -> bool:
    """``If-Match`` or ``If-Unmodified-Since`` is false (RFC 9110 13.2.2, steps 1
    and 2, as nginx: a 412). If-Match compares strongly: a weak tag never
    matches; ``*`` matches any file. A date that is no date is ignored."""
    im = req.header(b"if-match")
    if im is not None:
        return not any(tag.strip() in (entry.etag, b"*") for tag in im.split(b","))
    ius = req.header(b"if-unmodified-since")
    if ius is not None:
        since = _http_date(ius)
        return since is not None and int(entry.mtime) > since
    return False


def _not_modified(req: Request, entry: CachedFile) -> bool:
    inm = req.header(b"if-none-match")
    if inm is not None:
        return any(tag.strip() in (entry.etag, b"*", b"W/" + entry.etag) for tag in inm.split(b","))
    ims = req.header(b"if-modified-since")
    if ims is not None:
        since = _http_date(ims)
        # A date later than the server's clock is no date (RFC 9110 13.1.3): the file goes out.
        return since is not None and int(entry.mtime) <= since <= time.time()
    return False

