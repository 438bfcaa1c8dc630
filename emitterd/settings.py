"""Every setting of the daemon, declared once (PROTOCOL §7, DESIGN §2).

The table SETTINGS is the single source: the TOML config file (top-level keys,
names as-is), the ``EMITTERD_<NAME>`` environment variables, the flags of
``emitterd run`` (``--name-with-dashes``), ``emitterd config`` and the example
file ``systemd/emitterd.toml`` all derive from it.

Precedence, per setting: flag, then environment, then file, then the built-in
default. Rules where the contract is silent (documented in `emitterd config`):

* The config file is only read when named: ``--config FILE`` (``load()``'s
  ``config_path``), else ``$EMITTERD_CONFIG``. There is no implicit location.
* File values have TOML types: integers, floats, arrays; ``socket_mode`` is a
  quoted octal string ("0660"), never a TOML integer (0660 / 0o660 / 432 would
  be ambiguous). An unknown key (a typo) is an error, and so is a table:
  section names in the example file are comments only.
* Environment values and flags are strings: lists comma-separated
  (``1000,1001``), pairs ``0.1,30``, modes ``0660``. An environment variable
  set to the empty string counts as unset (as for ``$EMITTERD_SOCKET`` in
  emitterd.paths); an empty flag is a value (``--metrics-listen ""`` = off,
  ``--allow-uids ""`` = no extra uids).
* An ``EMITTERD_*`` variable that names no setting (``EMITTERD_CONFIG`` aside)
  is not an error (other tools share the prefix) but is reported in
  ``Config.warnings``, which ``emitterd run`` logs.
* Relative paths from the config file are relative to that file's directory;
  from a flag or the environment, to the current directory. ``~`` is
  expanded. ``socket`` / ``data_dir`` "" means: derive (emitterd.paths).
"""
from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import textwrap
import tomllib
from typing import Any, Mapping, Optional

from emitterd import paths

# ---- types -------------------------------------------------------------------

STR = "str"
INT = "int"
FLOAT = "float"
BOOL = "bool"
OCTAL = "octal"            # value is an int; written everywhere as an octal string "0660"
INT_LIST = "int_list"      # TOML array of ints; "1000,1001" in env / flags
FLOAT_PAIR = "float_pair"  # [initial, maximum] seconds; "0.1,30" in env / flags
CHOICE = "choice"          # one of Setting.choices (lower case)
HOSTPORT = "hostport"      # "" = off, else "host:port" / "[v6]:port"
PATH = "path"              # "" = derive (emitterd.paths); resolved to an absolute path

TYPES = frozenset({STR, INT, FLOAT, BOOL, OCTAL, INT_LIST, FLOAT_PAIR, CHOICE, HOSTPORT, PATH})

SOURCES = ("flag", "env", "file", "default")
ENV_PREFIX = "EMITTERD_"
CONFIG_ENV = "EMITTERD_CONFIG"

# Room kept in a frame beside one event of max_event_bytes: the request or
# delivery envelope (op, key, position, attempt, ...) is far below this.
FRAME_SLACK = 4096

_MIB = 1024 * 1024
_UID_MAX = 2 ** 32 - 2  # (uid_t)-1 is "no uid"
_SUN_PATH_MAX = 107     # sockaddr_un.sun_path is 108 bytes with the NUL

_METAVARS = {STR: "TEXT", INT: "N", FLOAT: "SECONDS", BOOL: "", OCTAL: "MODE",
             INT_LIST: "ID,...", FLOAT_PAIR: "INITIAL,MAX", HOSTPORT: "HOST:PORT", PATH: "PATH"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: where it lives, what it accepts, what it means."""

    name: str
    type: str
    default: Any
    help: str
    section: str
    reloadable: bool
    choices: Optional[tuple[str, ...]] = None
    # Range of the value (each element, for lists and pairs).
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    pattern: Optional[str] = None   # STR: the whole value must match
    metavar: Optional[str] = None

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError("setting %s: unknown type %r" % (self.name, self.type))
        if (self.type == CHOICE) != bool(self.choices):
            raise ValueError("setting %s: choices go with type choice" % self.name)

    @property
    def env_var(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def flag_metavar(self) -> str:
        if self.metavar:
            return self.metavar
        if self.type == CHOICE:
            return "[%s]" % "|".join(self.choices or ())
        return _METAVARS[self.type]

    def format(self, value: Any) -> str:
        """The value as written in the environment or on the command line."""
        return _format_plain(self, value)

    def toml(self, value: Any) -> str:
        """The value as written in the TOML file."""
        return _format_toml(self, value)


def _s(name: str, type: str, default: Any, section: str, reloadable: bool, help: str,
       **kw: Any) -> Setting:
    return Setting(name, type, default, " ".join(help.split()), section, reloadable, **kw)


D, S, L, W, SUB, OBS = ("daemon", "storage", "limits", "workers", "subscription defaults",
                        "observability")

SETTINGS: tuple[Setting, ...] = (
    # -- daemon
    _s("socket", PATH, "", D, False, """
        Path of the control socket (a Unix stream socket). Empty: derive it:
        $XDG_RUNTIME_DIR/emitterd/emitterd.sock when XDG_RUNTIME_DIR is set, else
        /run/emitterd/emitterd.sock for root, else /tmp/emitterd-<uid>/emitterd.sock.
        Missing directories are created with mode 0700. With socket activation
        (LISTEN_FDS) it only names the inherited socket. Clients read
        EMITTERD_SOCKET too."""),
    _s("socket_mode", OCTAL, 0o660, D, False, """
        Permission bits of the socket file, an octal string as for chmod ("0660")
        in the file, the environment and on the command line. Connections are
        also checked with SO_PEERCRED: see allow_uids and allow_gids.""",
       minimum=0, maximum=0o777),
    _s("allow_uids", INT_LIST, [], D, True, """
        User ids allowed on the control socket besides root and the daemon's own
        uid; anyone else gets permission_denied. A TOML array; comma-separated in
        the environment and on the command line (1000,1001).""",
       minimum=0, maximum=_UID_MAX, metavar="UID,..."),
    _s("allow_gids", INT_LIST, [], D, True, """
        Group ids allowed on the control socket: a peer that is a member of a listed
        group (its primary or a supplementary one, as when it connected) may connect. A TOML array; comma-separated in the
        environment and on the command line.""",
       minimum=0, maximum=_UID_MAX, metavar="GID,..."),
    _s("drain_timeout", FLOAT, 10.0, D, True, """
        Seconds a stop, and the shutdown on SIGTERM / SIGINT, wait for in-flight
        events to be acked before the workers are stopped; the default of the
        stop operation's drain_timeout. 0 = do not wait.""",
       minimum=0),
    # -- storage
    _s("data_dir", PATH, "", S, False, """
        Directory of the event log and the checkpoints (created with mode 0700).
        One daemon at a time: it is locked (emitterd.lock) while a daemon runs.
        Empty: derive it: $XDG_STATE_HOME/emitterd when XDG_STATE_HOME is set,
        else /var/lib/emitterd for root, else ~/.local/state/emitterd."""),
    _s("store_id", STR, "default", S, False, """
        Name of this event store: returned by ping and part of every pool's name
        (so of log lines and worker process titles). 1 to 64 letters, digits,
        '.', '_' or '-', starting with a letter or digit.""",
       pattern=r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", metavar="ID"),
    _s("synchronous", CHOICE, "full", S, False, """
        SQLite synchronous mode of the event log. full: an answered publish
        survives a power loss. normal: faster; the last commits may be lost on a
        power loss (not on a crash of the daemon).""",
       choices=("full", "normal")),
    _s("wal_rewind_bytes", INT, 32 * _MIB, S, True, """
        Length, in bytes, past which the event log's write-ahead log is rewound:
        publishes wait for one short WAL checkpoint (about a millisecond, at
        most 0.2 s), and the WAL is then written from its start again. Under a
        steady stream of publishes SQLite never rewinds it by itself; this
        bounds the file's size (about this much plus half a second of
        publishing) and keeps commits rewriting blocks the file already has,
        which syncs faster than growing it. With synchronous = "full" the WAL
        is written to this length (zeros; at most 256 MiB, and only if as
        much again is free) when the daemon starts, so that the first commits
        do not grow it either; a change takes effect for that at the next
        start.""",
       minimum=_MIB, maximum=2 ** 40, metavar="BYTES"),
    _s("checkpoint_interval", FLOAT, 1.0, S, True, """
        Seconds between checkpoint flushes while checkpoints move; at most 1
        (PROTOCOL §5). Checkpoints are also persisted on every graceful stop.""",
       minimum=0, maximum=1.0, exclusive_minimum=True),
    # -- limits
    _s("max_frame_bytes", INT, 8 * _MIB, L, True, """
        Largest frame, in bytes, read or written on any connection. A larger
        incoming frame is answered with frame_too_large and that connection is
        closed; delivery batches are split to stay below it.""",
       minimum=64 * 1024, maximum=2 ** 32 - 1, metavar="BYTES"),
    _s("max_event_bytes", INT, _MIB, L, True, """
        Largest event, msgpack-encoded, in bytes; publishing a larger one is
        invalid. At most max_frame_bytes - %d.""" % FRAME_SLACK,
       minimum=1024, maximum=2 ** 32 - 1, metavar="BYTES"),
    _s("max_publish_events", INT, 10000, L, True, """
        Most events in one publish request.""",
       minimum=1, maximum=1_000_000),
    _s("max_connections", INT, 1024, L, True, """
        Most open connections on the control socket, attached consumers
        included; more are refused. Root and the daemon's own user have 4
        more, so a client holding them all cannot lock out an administrator.""",
       minimum=1, maximum=1_000_000),
    _s("max_subscriptions", INT, 1000, L, True, """
        Most registered subscriptions (pools); starting one more fails.""",
       minimum=1, maximum=1_000_000),
    _s("output_buffer_bytes", INT, 16 * _MIB, L, True, """
        Unsent output, in bytes, one connection may hold. A consumer or client
        that passes it and takes nothing for 2 s is disconnected (a consumer's
        events are delivered again); a control client over it that still reads
        is sent no more answers, its requests left unread, until it has taken
        half. At least max_frame_bytes.""",
       minimum=64 * 1024, maximum=2 ** 40, metavar="BYTES"),
    _s("partial_frame_timeout", FLOAT, 60.0, L, True, """
        Seconds a control connection may take to send a frame whole, from its
        first byte, before it is closed: a client that sends the start of a
        large frame and stops (or trickles the rest a byte at a time) would
        hold that memory for good.""",
       minimum=0.1),
    # -- workers
    _s("heartbeat_interval", FLOAT, 1.0, W, False, """
        Seconds between a worker's heartbeats to the parent. Workers take it when
        they start, so a change needs a restart of the daemon.""",
       minimum=0, maximum=3600, exclusive_minimum=True),
    _s("worker_timeout", FLOAT, 10.0, W, True, """
        A worker that sent no heartbeat for this many seconds is killed
        (SIGKILL at once: a worker that does not answer cannot be trusted to
        stop) and replaced. Greater than heartbeat_interval.""",
       minimum=0, exclusive_minimum=True),
    _s("worker_grace", FLOAT, 2.0, W, True, """
        Seconds between SIGTERM and SIGKILL when a worker is stopped.""",
       minimum=0),
    _s("max_worker_rss", INT, 0, W, True, """
        Recycle a worker (a planned restart, not counted by max_restarts) when
        its resident memory passes this many bytes; 0 = never. A fresh worker
        takes about 13 MiB and more while it delivers large batches: below 32
        MiB workers are recycled often (below 13 MiB, every second), and the
        daemon warns at start and reload.""",
       minimum=0, metavar="BYTES"),
    _s("worker_nice", INT, 5, W, True, """
        Niceness each worker adds to the parent's when it starts (0 to 19; 0:
        the parent's own). Every event passes through the parent alone (append,
        fsync, routing) while workers share the load, so a worker that wakes
        on the parent's CPU should wait for it rather than take the CPU from
        it: with 5, about 8 to 13 percent more throughput on a 2-core machine,
        latency within its noise (README, Performance). Under CPU pressure from
        other programs the workers get a smaller share; set 0 for the parent's
        priority. Workers started after a change (reload) take it.""",
       minimum=0, maximum=19),
    _s("restart_backoff", FLOAT_PAIR, [1.0, 30.0], W, True, """
        Initial and maximum delay, in seconds, of a pool in backoff (after more
        than max_restarts restarts within restart_period); the delay doubles with
        each backoff in a row.""",
       minimum=0, exclusive_minimum=True),
    _s("max_backoffs", INT, 5, W, True, """
        Backoffs in a row after which a pool is failed (until start or update).""",
       minimum=1, maximum=1000),
    # -- subscription defaults (PROTOCOL §2 Subscription)
    _s("default_pool_size", INT, 1, SUB, True, """
        Workers of a pool when the subscription gives no pool_size (1 to 64).""",
       minimum=1, maximum=64),
    _s("default_strategy", CHOICE, "pinned", SUB, True, """
        Default options.strategy: pinned (each stream to one worker, in order),
        round_robin or random.""",
       choices=("pinned", "round_robin", "random")),
    _s("default_batch_size", INT, 64, SUB, True, """
        Default options.batch_size: events per delivery frame (1 to 10000).""",
       minimum=1, maximum=10000),
    _s("default_max_in_flight", INT, 256, SUB, True, """
        Default options.max_in_flight: unfinished events per worker.""",
       minimum=1, maximum=1_000_000),
    _s("default_ack_timeout", FLOAT, 30.0, SUB, True, """
        Default options.ack_timeout: seconds before an event not acked counts as
        nack retry.""",
       minimum=0, exclusive_minimum=True),
    _s("default_max_retries", INT, 10, SUB, True, """
        Default options.max_retries: retries of an event before it is parked.""",
       minimum=0, maximum=1_000_000),
    _s("default_retry_backoff", FLOAT_PAIR, [0.1, 30.0], SUB, True, """
        Default options.retry_backoff: initial and maximum seconds before a retry
        (retry n waits min(initial * 2**(n-1), maximum)).""",
       minimum=0, exclusive_minimum=True),
    _s("default_max_restarts", INT, 10, SUB, True, """
        Default options.max_restarts: unplanned worker restarts allowed within
        restart_period before the pool goes to backoff.""",
       minimum=0, maximum=1_000_000),
    _s("default_restart_period", FLOAT, 60.0, SUB, True, """
        Default options.restart_period, in seconds.""",
       minimum=0, exclusive_minimum=True),
    _s("default_ephemeral", BOOL, False, SUB, True, """
        Default options.ephemeral for subscriptions without subscriber (deleted
        when their last attached consumer leaves, or 60 s after start if none
        attached). A subscription with a subscriber is never ephemeral."""),
    # -- observability
    _s("log_level", CHOICE, "info", OBS, True, """
        Least severe log level written to stderr.""",
       choices=("debug", "info", "warning", "error")),
    _s("log_format", CHOICE, "text", OBS, True, """
        text: one line per event with key=value fields (with a syslog priority
        prefix and no timestamp under journald; a value with a space, quote, =
        or control character is quoted, its controls escaped); json: one JSON
        object per line.""",
       choices=("text", "json")),
    _s("metrics_listen", HOSTPORT, "", OBS, False, """
        Serve Prometheus metrics over HTTP at HOST:PORT, e.g. 127.0.0.1:9464;
        empty = off (the metrics operation works either way). The endpoint has no
        authentication: keep it on a loopback address."""),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
MIN_WORKER_RSS = 32 << 20
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))
ENV_VARS: dict[str, Setting] = {s.env_var: s for s in SETTINGS}


class ConfigError(Exception):
    """A setting could not be read; the message names where it came from."""


class _Invalid(ValueError):
    """A value failed to parse or validate (the caller adds the source)."""


# ---- parsing -------------------------------------------------------------------

def _show(raw: Any) -> str:
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return repr(raw)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _quoted_hint(raw: Any) -> str:
    # A TOML string holding a number is the commonest file mistake.
    return " (a string: drop the quotes)" if isinstance(raw, str) else ""


def _parse_int_str(s: Setting, raw: str) -> int:
    try:
        return int(raw.strip(), 10)
    except ValueError:
        raise _Invalid("expected an integer, got %s" % _show(raw)) from None


def _parse_float_str(s: Setting, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise _Invalid("expected a number, got %s" % _show(raw)) from None


_OCTAL_RE = re.compile(r"(?:0o)?([0-7]{1,4})")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_string(s: Setting, raw: str) -> Any:
    """A value written as text (environment, command line)."""
    t = s.type
    if t == INT:
        return _parse_int_str(s, raw)
    if t == FLOAT:
        return _parse_float_str(s, raw)
    if t == BOOL:
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _Invalid("expected true or false, got %s" % _show(raw))
    if t == OCTAL:
        m = _OCTAL_RE.fullmatch(raw.strip())
        if not m:
            raise _Invalid('expected an octal mode like "0660", got %s' % _show(raw))
        return int(m.group(1), 8)
    if t == INT_LIST:
        if not raw.strip():
            return []
        items = [p.strip() for p in raw.split(",")]
        try:
            if any(not p for p in items):
                raise ValueError
            return [int(p, 10) for p in items]
        except ValueError:
            raise _Invalid("expected comma-separated integers like 1000,1001, got %s"
                           % _show(raw)) from None
    if t == FLOAT_PAIR:
        items = [p.strip() for p in raw.split(",")]
        try:
            if len(items) != 2:
                raise ValueError
            return [float(p) for p in items]
        except ValueError:
            raise _Invalid("expected two numbers INITIAL,MAX like 0.1,30, got %s"
                           % _show(raw)) from None
    return _typed(s, raw, "flag")


def _typed(s: Setting, raw: Any, origin: str) -> Any:
    """A value that already has a type (TOML file, or a typed flag)."""
    t = s.type
    if t == INT:
        if not _is_int(raw):
            raise _Invalid("expected an integer, got %s%s" % (_show(raw), _quoted_hint(raw)))
        return raw
    if t == FLOAT:
        if not _is_number(raw):
            raise _Invalid("expected a number, got %s%s" % (_show(raw), _quoted_hint(raw)))
        return float(raw)
    if t == BOOL:
        if not isinstance(raw, bool):
            raise _Invalid("expected true or false, got %s" % _show(raw))
        return raw
    if t == OCTAL:
        if isinstance(raw, str):
            return _parse_string(s, raw)
        if origin in ("flag", "default") and _is_int(raw):  # already the mode itself
            return raw
        raise _Invalid('expected an octal mode as a quoted string like "0660", got %s'
                       % _show(raw))
    if t == INT_LIST:
        if not isinstance(raw, (list, tuple)) or not all(_is_int(x) for x in raw):
            raise _Invalid("expected an array of integers like [1000, 1001], got %s"
                           % _show(raw))
        return list(raw)
    if t == FLOAT_PAIR:
        if (not isinstance(raw, (list, tuple)) or len(raw) != 2
                or not all(_is_number(x) for x in raw)):
            raise _Invalid("expected an array of two numbers [initial, maximum] like "
                           "[0.1, 30.0], got %s" % _show(raw))
        return [float(x) for x in raw]
    if t == PATH and isinstance(raw, os.PathLike):
        raw = os.fspath(raw)
    if not isinstance(raw, str):
        raise _Invalid("expected a string, got %s" % _show(raw))
    if t == CHOICE:
        low = raw.strip().lower()
        if low not in (s.choices or ()):
            raise _Invalid("expected one of %s, got %s" % (", ".join(s.choices or ()), _show(raw)))
        return low
    if t == HOSTPORT:
        if raw:
            parse_hostport(raw)
        return raw
    return raw


def parse_hostport(value: str) -> tuple[str, int]:
    """Split "host:port" / "[v6addr]:port" (as metrics_listen holds it); ValueError if malformed."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise _Invalid("expected HOST:PORT like 127.0.0.1:9464 or [::1]:9464, got %s"
                           % _show(value))
        port_s = rest[1:]
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or ":" in host:
            raise _Invalid("expected HOST:PORT like 127.0.0.1:9464 (an IPv6 address in "
                           "brackets), got %s" % _show(value))
    # port 0 asks for any free port; the daemon logs the one it got (tests use this)
    if not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise _Invalid("expected HOST:PORT with a port 0..65535, got %s" % _show(value))
    return host, int(port_s)


def _fmt_num(x: float) -> str:
    return str(int(x)) if isinstance(x, int) else repr(x)


def _check_range(s: Setting, value: Any) -> None:
    t = s.type
    if t in (INT, FLOAT, OCTAL):
        items = [value]
    elif t in (INT_LIST, FLOAT_PAIR):
        items = list(value)
    else:
        items = []
    show = (lambda x: "%04o" % x) if t == OCTAL else _fmt_num
    for x in items:
        if isinstance(x, float) and not math.isfinite(x):
            raise _Invalid("expected a finite number, got %r" % x)
        lo, hi = s.minimum, s.maximum
        if lo is not None and (x <= lo if s.exclusive_minimum else x < lo):
            if s.exclusive_minimum:
                raise _Invalid("must be greater than %s, got %s" % (show(lo), show(x)))
            if hi is not None:
                raise _Invalid("must be between %s and %s, got %s" % (show(lo), show(hi), show(x)))
            raise _Invalid("must be at least %s, got %s" % (show(lo), show(x)))
        if hi is not None and x > hi:
            if lo is not None and not s.exclusive_minimum:
                raise _Invalid("must be between %s and %s, got %s" % (show(lo), show(hi), show(x)))
            raise _Invalid("must be at most %s, got %s" % (show(hi), show(x)))
    if t == FLOAT_PAIR and value[0] > value[1]:
        raise _Invalid("the initial delay must not exceed the maximum, got %s,%s"
                       % (_fmt_num(value[0]), _fmt_num(value[1])))
    if t == STR and s.pattern and not re.fullmatch(s.pattern, value):
        raise _Invalid("%s does not match %s" % (_show(value), s.pattern))


def _coerce(s: Setting, raw: Any, origin: str) -> Any:
    """Parse and validate one raw value from `origin` (flag/env/file/default)."""
    if origin in ("flag", "env") and isinstance(raw, str):
        value = _parse_string(s, raw)
    else:
        value = _typed(s, raw, origin)
    _check_range(s, value)
    return value


# ---- formatting ----------------------------------------------------------------

def _format_plain(s: Setting, value: Any) -> str:
    t = s.type
    if t == OCTAL:
        return "%04o" % value
    if t in (INT_LIST, FLOAT_PAIR):
        return ",".join(_fmt_num(x) for x in value)
    if t == BOOL:
        return "true" if value else "false"
    if t == FLOAT:
        return _fmt_num(float(value))
    return str(value)


def _format_toml(s: Setting, value: Any) -> str:
    t = s.type
    if t == OCTAL:
        return '"%04o"' % value
    if t in (INT_LIST, FLOAT_PAIR):
        return "[%s]" % ", ".join(_fmt_num(x) for x in value)
    if t == BOOL:
        return "true" if value else "false"
    if t == INT:
        return str(value)
    if t == FLOAT:
        return repr(float(value))
    # json string escapes are valid TOML basic-string escapes
    return json.dumps(str(value), ensure_ascii=False)


# ---- the resolved configuration -------------------------------------------------

class Config:
    """Resolved settings, read-only: ``cfg.max_frame_bytes``, ``cfg.socket`` (absolute), ..."""

    sources: dict[str, str]
    config_path: Optional[str]
    flags: dict[str, Any]
    warnings: list[str]

    def __init__(self, values: Mapping[str, Any], sources: Mapping[str, str],
                 config_path: Optional[str] = None, flags: Optional[Mapping[str, Any]] = None,
                 warnings: Optional[list[str]] = None) -> None:
        d = self.__dict__
        for s in SETTINGS:
            d[s.name] = values[s.name]
        d["sources"] = dict(sources)
        d["config_path"] = config_path
        d["flags"] = dict(flags or {})   # kept so that a reload re-applies them
        d["warnings"] = list(warnings or [])

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only (use replace() or load())")

    def __getattr__(self, name: str) -> Any:
        # Only reached for missing attributes; says which names exist.
        if name.startswith("__"):
            raise AttributeError(name)
        match = difflib.get_close_matches(name, BY_NAME, n=1)
        raise AttributeError("no setting %r%s" % (name, " (did you mean %r?)" % match[0]
                                                   if match else ""))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        changed = ", ".join("%s=%r" % (n, v) for n, v in self.as_dict().items()
                            if self.sources.get(n) != "default")
        return "Config(%s)" % changed

    def as_dict(self) -> dict:
        """name -> resolved value, in table order (lists copied)."""
        return {s.name: (list(v) if isinstance(v, list) else v)
                for s in SETTINGS for v in (self.__dict__[s.name],)}

    def diff(self, other: "Config") -> dict[str, tuple]:
        """name -> (value here, value in other) for every setting that differs."""
        a, b = self.as_dict(), other.as_dict()
        return {n: (a[n], b[n]) for n in a if a[n] != b[n]}

    def subscription_defaults(self) -> dict[str, Any]:
        """The default_* settings without their prefix: pool_size, strategy, batch_size, ..."""
        return {s.name[len("default_"):]: self.as_dict()[s.name]
                for s in SETTINGS if s.name.startswith("default_")}

    def where(self, name: str) -> str:
        """Where a setting's value came from, as error messages name it."""
        return _where(BY_NAME[name], self.sources.get(name, "default"), self.config_path)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some settings changed (values as for flags), validated."""
        values, sources = self.as_dict(), dict(self.sources)
        for name, raw in changes.items():
            s = _setting_for(name, "flag", None)
            values[name] = _resolve_one(s, raw, "flag", None, os.environ)
            sources[name] = "flag"
        _cross_check(values, sources, self.config_path)
        return Config(values, sources, self.config_path, self.flags, self.warnings)

    def reload(self, env: Optional[Mapping[str, str]] = None
               ) -> tuple["Config", dict[str, tuple], dict[str, tuple]]:
        """SIGHUP: read the file and environment again with the same flags.

        Returns (effective config, applied changes, changes that need a restart).
        The effective config takes the new value of every reloadable setting and
        keeps the running value of the others. Raises ConfigError (keep running
        with self then).
        """
        new = load(self.config_path, self.flags, env)
        values, sources = self.as_dict(), dict(self.sources)
        applied: dict[str, tuple] = {}
        pending: dict[str, tuple] = {}
        for name, (old, nv) in self.diff(new).items():
            if BY_NAME[name].reloadable:
                values[name], sources[name] = nv, new.sources[name]
                applied[name] = (old, nv)
            else:
                pending[name] = (old, nv)
        for name in values:
            if BY_NAME[name].reloadable:
                sources[name] = new.sources[name]
        # a clash with a value kept until a restart names it so, not the file (which says
        # otherwise, and is valid on its own)
        _cross_check(values, {**sources, **{n: "running" for n in pending}}, self.config_path)
        return Config(values, sources, self.config_path, self.flags, new.warnings), applied, pending


# ---- loading -------------------------------------------------------------------

def _where(s: Setting, origin: str, config_path: Optional[str]) -> str:
    if origin == "flag":
        return s.flag
    if origin == "env":
        return s.env_var
    if origin == "file":
        return "config file %s: %s" % (config_path, s.name)
    if origin == "running":
        return "the running %s, which needs a restart to change" % s.name
    return "default %s" % s.name


def _setting_for(name: str, origin: str, config_path: Optional[str]) -> Setting:
    s = BY_NAME.get(name.replace("-", "_"))
    if s is None:
        match = difflib.get_close_matches(name.replace("-", "_"), BY_NAME, n=1)
        hint = " (did you mean %s?)" % match[0] if match else ""
        label = {"flag": "--" + name.replace("_", "-"),
                 "file": "config file %s: %s" % (config_path, name)}.get(origin, name)
        raise ConfigError("%s: unknown setting%s" % (label, hint))
    return s


def _resolve_path(value: str, origin: str, config_path: Optional[str]) -> str:
    value = os.path.expanduser(value)
    if origin == "file" and config_path and not os.path.isabs(value):
        value = os.path.join(os.path.dirname(config_path), value)
    return os.path.abspath(value)


def _resolve_one(s: Setting, raw: Any, origin: str, config_path: Optional[str],
                 env: Mapping[str, str]) -> Any:
    try:
        value = _coerce(s, raw, origin)
        if s.type == PATH:
            if value:
                value = _resolve_path(value, origin, config_path)
            elif s.name == "socket":
                # paths reads EMITTERD_SOCKET itself: already handled as the env source
                value = os.path.abspath(paths.default_socket_path(env))
            elif s.name == "data_dir":
                value = os.path.abspath(paths.default_data_dir(env))
            if s.name == "socket" and len(os.fsencode(value)) > _SUN_PATH_MAX:
                raise _Invalid("socket path %s is longer than %d bytes" % (value, _SUN_PATH_MAX))
    except _Invalid as e:
        raise ConfigError("%s: %s" % (_where(s, origin, config_path), e)) from None
    return value


def _is_default(s: Setting, raw: Any) -> bool:
    """Whether a file's raw value for `s` is its built-in default."""
    try:
        return _coerce(s, raw, "file") == _coerce(s, s.default, "default")
    except _Invalid:
        return False


def _cross_check(values: Mapping[str, Any], sources: Mapping[str, str],
                 config_path: Optional[str]) -> None:
    """Rules that tie two settings together."""
    def w(name: str) -> str:
        return _where(BY_NAME[name], sources.get(name, "default"), config_path)

    if values["max_event_bytes"] > values["max_frame_bytes"] - FRAME_SLACK:
        raise ConfigError("%s: %d must be at most max_frame_bytes - %d = %d (%s)" % (
            w("max_event_bytes"), values["max_event_bytes"], FRAME_SLACK,
            values["max_frame_bytes"] - FRAME_SLACK, w("max_frame_bytes")))
    if values["output_buffer_bytes"] < values["max_frame_bytes"]:
        raise ConfigError("%s: %d must be at least max_frame_bytes = %d (%s)" % (
            w("output_buffer_bytes"), values["output_buffer_bytes"],
            values["max_frame_bytes"], w("max_frame_bytes")))
    if values["worker_timeout"] <= values["heartbeat_interval"]:
        raise ConfigError("%s: %s must be greater than heartbeat_interval = %s (%s)" % (
            w("worker_timeout"), _fmt_num(values["worker_timeout"]),
            _fmt_num(values["heartbeat_interval"]), w("heartbeat_interval")))


def _read_file(config_path: str) -> dict:
    try:
        with open(config_path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("config file %s: cannot read: %s" % (config_path, e.strerror or e)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config file %s: invalid TOML: %s" % (config_path, e)) from None
    except UnicodeDecodeError as e:
        # TOML is UTF-8: a Latin-1 comment (café) is not
        raise ConfigError("config file %s: not UTF-8 text (TOML must be): byte 0x%02x at "
                          "offset %d" % (config_path, e.object[e.start], e.start)) from None
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError("config file %s: [%s]: settings are top-level keys; the section "
                              "names of the example file are only comments" % (config_path, key))
        _setting_for(key, "file", config_path)
    return data


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load(config_path: Optional[str] = None, flags: Optional[Mapping[str, object]] = None,
         env: Optional[Mapping[str, str]] = None) -> Config:
    """Resolve every setting: flag, then environment, then file, then default.

    `flags` maps setting names (underscores or dashes) to raw values: strings
    as typed on the command line, or values that already have their type;
    None means "not given" (a "config" key is taken as `config_path`). `env` defaults to os.environ. The file is
    `config_path`, else $EMITTERD_CONFIG, else none. Raises ConfigError.
    """
    env = os.environ if env is None else env
    given = {}
    for name, raw in (flags or {}).items():
        if name in ("config", "config_path"):   # click kwargs passed through whole
            if config_path is None and raw is not None:
                config_path = raw
            continue
        if raw is not None:
            given[_setting_for(name, "flag", None).name] = raw
    if config_path is not None and not os.fspath(config_path):
        # abspath("") is the working directory: "cannot read: Is a directory" said nothing
        raise ConfigError("--config: empty; give a file, or leave the option out for none")
    if config_path is None and env.get(CONFIG_ENV):
        config_path = env[CONFIG_ENV]
    if config_path is not None:
        config_path = os.path.abspath(os.path.expanduser(os.fspath(config_path)))
        file_values = _read_file(config_path)
    else:
        file_values = {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for s in SETTINGS:
        if s.name in given:
            origin, raw = "flag", given[s.name]
        elif env.get(s.env_var):          # empty = unset (see the module docstring)
            origin, raw = "env", env[s.env_var]
        elif s.name in file_values:
            origin, raw = "file", file_values[s.name]
        else:
            origin, raw = "default", s.default
        values[s.name] = _resolve_one(s, raw, origin, config_path, env)
        sources[s.name] = origin
    _cross_check(values, sources, config_path)
    for s in SETTINGS:
        if (s.name in file_values and sources[s.name] != "file"
                and not _is_default(s, file_values[s.name])):
            # overridden, but still the file's value: a bad one is an error, as it would be
            # without the override (and at the restart that drops it)
            _resolve_one(s, file_values[s.name], "file", config_path, env)

    warnings = []
    for s in SETTINGS:
        if (s.name in file_values and sources[s.name] in ("flag", "env")
                and not _is_default(s, file_values[s.name])):
            # (a key left at its built-in default, as in the example file, asks for nothing)
            # a file value that never applies: say so, at start and at every reload, where
            # editing the file and reloading would otherwise change nothing, silently
            warnings.append("config file %s sets %s, but %s overrides it (flags and the "
                            "environment come first and are read at start only)"
                            % (config_path, s.name, _where(s, sources[s.name], config_path)))
    for var in sorted(env):
        if var.startswith(ENV_PREFIX) and var != CONFIG_ENV and var not in ENV_VARS:
            match = difflib.get_close_matches(var, ENV_VARS, n=1)
            warnings.append("environment variable %s names no setting, ignored%s"
                            % (var, " (did you mean %s?)" % match[0] if match else ""))
    if values["metrics_listen"]:
        host, _ = parse_hostport(values["metrics_listen"])
        if not _is_loopback(host):
            warnings.append("metrics_listen %s is not a loopback address; the metrics endpoint "
                            "has no authentication" % values["metrics_listen"])
    if 0 < values["max_worker_rss"] < MIN_WORKER_RSS:
        warnings.append("max_worker_rss %d is below 32 MiB: a fresh worker takes about 13 MiB "
                        "and more while it delivers, so workers will be recycled often (below "
                        "13 MiB, every second)" % values["max_worker_rss"])
    return Config(values, sources, config_path, given, warnings)


# ---- documentation -------------------------------------------------------------

_TOML_HEADER = """\
# emitterd configuration file (TOML): an example with every setting at its
# built-in default. Generated from emitterd/settings.py by scripts/gen-config;
# `emitterd config` prints the same list.
#
# Use it with `emitterd run --config FILE` or EMITTERD_CONFIG=FILE. Every key
# is top level: the section names below are comments, not TOML tables. An
# unknown key is an error. Precedence: flag (--name-with-dashes), then the
# environment (EMITTERD_<NAME>), then this file, then the built-in default.
# Settings marked "reloadable" take effect on SIGHUP (systemctl reload
# emitterd); the others need a restart.
"""


def render_toml(cfg: Optional[Config] = None) -> str:
    """A config file, help as comments: every setting at its default, or its value in cfg."""
    values = cfg.as_dict() if cfg is not None else {s.name: s.default for s in SETTINGS}
    header = _TOML_HEADER
    if cfg is not None:
        header = header.replace(
            "an example with every setting at its\n# built-in default. Generated from "
            "emitterd/settings.py by scripts/gen-config;\n# `emitterd config` prints the "
            "same list.",
            "every setting at its effective value\n# (environment, config file, defaults), "
            "written by `emitterd config --toml\n# --effective`.")
    out = [header]
    for section in SECTIONS:
        out.append("\n# %s\n# %s\n# %s\n" % ("=" * 76, section, "=" * 76))
        for s in SETTINGS:
            if s.section != section:
                continue
            out.append("\n")
            out.extend("# %s\n" % line for line in textwrap.wrap(s.help, 76))
            out.append("# env %s, flag %s%s\n" % (s.env_var, s.flag,
                                                  ", reloadable" if s.reloadable else ""))
            out.append("%s = %s\n" % (s.name, s.toml(values[s.name])))
    return "".join(out)


def _display(s: Setting, value: Any) -> str:
    text = s.format(value)
    return text if text else '""'


def render_table(cfg: Optional[Config] = None, width: int = 100) -> str:
    """Plain text: every setting with its default (or, given cfg, value and source),
    environment variable and help, by section."""
    name_w = max(len(s.name) for s in SETTINGS)
    env_w = max(len(s.env_var) for s in SETTINGS)
    shown = {s.name: _display(s, s.default if cfg is None else getattr(cfg, s.name))
             for s in SETTINGS}
    if cfg is not None:
        shown = {n: "%s (%s)" % (v, cfg.sources[n]) for n, v in shown.items()}
    val_w = min(max(len(v) for v in shown.values()), 40)
    lines = ["Settings: TOML key (--config FILE, top level), environment variable, and the "
             "flag --name-with-dashes of `emitterd run`.",
             "Precedence: flag, then environment, then file, then built-in default. "
             "R = reloadable with SIGHUP.",
             "Environment and flags: lists are comma-separated (1000,1001); socket_mode is an "
             "octal string (0660); an empty variable counts as unset."]
    if cfg is not None:
        lines.append("Config file: %s" % (cfg.config_path or "none"))
    head = "%-*s  %-*s  %-*s  %s" % (name_w, "NAME", val_w, "DEFAULT" if cfg is None
                                     else "VALUE (SOURCE)", env_w, "ENVIRONMENT", "R")
    lines += ["", head]
    for section in SECTIONS:
        lines += ["", "[%s]" % section]
        for s in SETTINGS:
            if s.section != section:
                continue
            lines.append("%-*s  %-*s  %-*s  %s" % (name_w, s.name, val_w, shown[s.name],
                                                    env_w, s.env_var, "R" if s.reloadable else "-"))
            lines.extend(textwrap.wrap(s.help, width, initial_indent="    ",
                                       subsequent_indent="    "))
    return "\n".join(lines) + "\n"


def _self_check() -> None:
    # Every default must pass its own validation, and no name may shadow Config's API.
    for s in SETTINGS:
        _coerce(s, s.default, "default")
        if s.name in ("sources", "config_path", "flags", "warnings", "config") or \
                hasattr(Config, s.name):
            raise ValueError("setting name %s clashes" % s.name)


_self_check()
