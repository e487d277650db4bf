"""Settings of the TCP echo server and the blocking client, as frozen dataclasses.

Each program builds one config object (from argparse or TOML), validated once
with clear messages, and passes it down; nothing reads flags or globals later.
The balancer, the HTTP servers and the stress tool keep their own config
classes next to their code and use the helpers here (``load_toml``,
``ConfigError``, ``check``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .protocol import DEFAULT_MAX_LINE, MAX_MAX_LINE, check_server_name, LocalProtocolError
from .sockets import unbracket


class ConfigError(ValueError):
    """A setting is missing, of the wrong type or out of range (the user's fault)."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_max_line(max_line: int) -> None:
    check(1 <= max_line <= MAX_MAX_LINE, f"--max-line must be 1 to {MAX_MAX_LINE} bytes (64 MiB), got {max_line}: "
                                         f"a line is held whole until it ends")


def check_unique_names(names: list[str]) -> None:
    """Backend names must differ: they key the logs, /stats and /metrics."""
    twice = sorted({n for n in names if names.count(n) > 1})
    check(not twice, f"backend names must be unique: {', '.join(twice)} given twice (name them: NAME=HOST:PORT)")


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:  # (TOML is UTF-8)
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:  # a folder, no permission
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror or exc}") from None


MAX_SECONDS = 365 * 86400.0
"""The longest a timeout or interval may be: a year. Past it, some clock or kernel
field overflows (a socket timeout of 1e300 s: every threaded-server connection died)."""


def check_positive(config: Any, *names: str) -> None:
    """Each of the ``config``'s settings ``names``, in seconds, is above 0 and at most
    a year (nan is not): a check interval of inf left a backend that went down down for good."""
    for name in names:
        value = getattr(config, name)
        check(0 < value <= MAX_SECONDS, f"--{name.replace('_', '-')} must be positive, at most a year, got {value}")


def check_non_negative(config: Any, *names: str) -> None:
    """Each of the ``config``'s settings ``names``, in seconds, is 0 or more, at most a year."""
    for name in names:
        value = getattr(config, name)
        check(0 <= value <= MAX_SECONDS, f"--{name.replace('_', '-')} must be 0 or more, at most a year, got {value}")


def check_backend_name(name: str, what: str = "backend name") -> None:
    """Printable ASCII without spaces, '=', quotes or backslashes: it goes into
    key=value log lines, and into a header (X-Backend), where a line break would
    start a header of its own. ``what`` names it in the error."""
    check(all(" " < c < "\x7f" and c not in '="\\' for c in name),
          f"{what} {name!r}: printable ASCII, no spaces, '=', '\"' or '\\' (it goes into key=value log lines)")


_TYPES = {"bool": bool, "int": int, "float": float, "str": str}
_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}


def typed_settings(cls: type | tuple[type, ...], values: Any, where: str,
                   settable: set[str] | None = None) -> dict[str, Any]:
    """A TOML table's settings (``max-line`` or ``max_line``) as keyword arguments of
    the dataclass ``cls``, each of its field's type (a whole number is a number too;
    true is not a number); an unknown key, or one not in ``settable``, is an error.
    So a file gets the one-line errors a command line gets, not a TypeError later.
    ``cls`` may be several dataclasses, when one table sets the fields of each
    (lb.py's [lb]: ``ProxyConfig``'s and its ``Limits``')."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {values!r}")
    fields = {f.name: f for c in (cls if isinstance(cls, tuple) else (cls,)) for f in dataclasses.fields(c)}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in fields or (settable is not None and name not in settable):
            raise ConfigError(f"{where}: unknown setting {key!r}")
        if name in spelled:  # (max-line and max_line: the last one won, unsaid)
            raise ConfigError(f"{where}: {key!r} is set twice (also as {spelled[name]!r})")
        spelled[name] = key
        kind = _TYPES.get(fields[name].type)  # a string, under ``from __future__ import annotations``
        if kind is float and type(value) is int:
            value = float(value)
        if kind is not None and type(value) is not kind:
            raise ConfigError(f"{where}: {key} must be {_KINDS[kind]}, got {value!r}")
        out[name] = value
    return out


def settings_and_backends(path: str, section: str, cls: type | tuple[type, ...], settable: set[str],
                          backend_cls: type, defaults: Callable[[dict[str, Any]], dict[str, Any]],
                          make: Callable[[list[dict[str, Any]]], list] | None = None) -> dict[str, Any]:
    """A balancer's config file: its ``[section]`` as keyword arguments of ``cls``
    (``typed_settings``) and, when the file has ``[[backends]]``, ``backends``: a
    ``backend_cls`` per entry, its fields typed, a port required, the rest filled
    in by ``defaults(fields)``; or ``make(every entry's fields)``, when what one
    entry lacks depends on the others (lb.py's names)."""
    data = load_toml(path)
    unknown = set(data) - {section, "backends"}
    if unknown:
        raise ConfigError(f"{path}: unknown tables {', '.join(sorted(unknown))} (use [{section}] and [[backends]])")
    kwargs = _unbracketed(typed_settings(cls, data.get(section, {}), f"{path} [{section}]", settable))
    if "backends" in data:
        entries = data["backends"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError(f"{path}: [[backends]] must list at least one backend")
        filled = []
        for i, entry in enumerate(entries):
            where = f"{path} backends[{i}]"
            fields = _unbracketed(typed_settings(backend_cls, entry, where))
            if "port" not in fields:
                raise ConfigError(f"{where} needs at least a port")
            filled.append({**defaults(fields), **fields})
        kwargs["backends"] = tuple(make(filled) if make else [backend_cls(**fields) for fields in filled])
    return kwargs


def _unbracketed(fields: dict[str, Any]) -> dict[str, Any]:
    """An IPv6 ``host`` also in brackets, as ``--host`` and ``--backend`` take it
    (``"[::1]"``, which the resolver does not know)."""
    if isinstance(fields.get("host"), str):
        fields["host"] = unbracket(fields["host"])
    return fields


@dataclass(frozen=True)
class ServerConfig:
    """One echo server (server1.py .. server3.py)."""

    name: str = "server1"
    host: str = "127.0.0.1"
    port: int = 7001
    max_line: int = DEFAULT_MAX_LINE
    idle_timeout: float = 300.0
    """Close a connection that sent nothing for this long (0 turns it off)."""
    line_timeout: float = 10.0
    """A line begun must end within this long (slowloris; HTTP's header timeout; 0: never)."""
    max_connections: int = 10_000
    drain_timeout: float = 5.0
    """On SIGTERM: how long connections may go on before they are closed."""
    drain_quiet: float = 0.25
    """On SIGTERM: a connection quiet for this long, its replies written, is closed."""
    backlog: int = 4096
    write_high_water: int = 256 * 1024
    """Stop reading from a client whose unsent replies pass this many bytes."""
    log_level: str = "info"
    log_dir: str = "logs"
    loop: str = "auto"

    def __post_init__(self) -> None:
        try:
            check_server_name(self.name)
        except LocalProtocolError as exc:
            raise ConfigError(f"--name: {exc.detail}") from None
        check(0 <= self.port <= 65535, f"--port: not a port number: {self.port}")
        check_max_line(self.max_line)
        check_non_negative(self, "idle_timeout", "line_timeout", "drain_timeout")
        check(self.max_connections >= 1, "--max-connections must be at least 1")
        check(self.backlog >= 1, "--backlog must be at least 1")
        check(self.write_high_water >= 1024, "write high-water mark must be at least 1024 bytes")


@dataclass(frozen=True)
class ClientConfig:
    """The blocking client (client.py)."""

    host: str = "127.0.0.1"
    port: int = 7000
    timeout: float = 5.0
    """Bound on connect, and on each wait for reply bytes."""
    max_line: int = DEFAULT_MAX_LINE

    def __post_init__(self) -> None:
        check(0 < self.port <= 65535, f"--port: not a port number: {self.port}")
        check(self.timeout > 0, "--timeout must be positive")
