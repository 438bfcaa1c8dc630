"""Logging: one line per event with key=value fields, on stderr (see configure()).

Formats:

* text: ``2025-01-31T12:00:00.123 INFO emitterd.pool: worker started pool=x pid=42``;
* text under journald: ``<6>emitterd.pool: worker started pool=x pid=42`` — a
  syslog priority prefix (``<7>`` debug, ``<6>`` info, ``<4>`` warning, ``<3>``
  error) that journald turns into the entry's PRIORITY, and no timestamp
  (journald adds its own);
* json: one object per line: ``{"ts", "level", "logger", "msg", "fields"}`` (and
  ``"exc"`` with a traceback), prefixed with the priority under journald too
  (journald strips the prefix, so the stored message is plain JSON).

"Under journald" means $JOURNAL_STREAM is set and names the device:inode of the
log stream, as systemd documents: a process that inherited the variable but
writes to another file does not use the prefix.
"""
import datetime
import json
import logging
import os
import re
import select
import time
import sys
from typing import IO, Any, Optional

_ROOT = "emitterd"

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


_CONTEXT: dict = {}      # fields every line of this process starts with (a worker: its pool)


def set_context(**fields: Any) -> None:
    """Fields put first on every line this process logs from now on."""
    _CONTEXT.clear()
    _CONTEXT.update(fields)


class KVLogger:
    """A logger whose calls take a message and key=value fields."""

    __slots__ = ("_log",)

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger("%s.%s" % (_ROOT, name) if name else _ROOT)

    def _emit(self, level: int, msg: str, fields: dict, exc_info: bool = False) -> None:
        if self._log.isEnabledFor(level):
            if _CONTEXT:
                fields = {**_CONTEXT, **fields}
            self._log.log(level, msg, extra={"kv": fields}, exc_info=exc_info)

    def isEnabledFor(self, level: int) -> bool:
        """For callers that build costly fields only when they will be written."""
        return self._log.isEnabledFor(level)

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, fields)

    def critical(self, msg: str, **fields: Any) -> None:
        self._emit(logging.CRITICAL, msg, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, fields, exc_info=True)


class Throttle:
    """For a line any client can cause once per connection (a refused peer, a bad frame):
    at most `burst` of them per `period` seconds; the next one to get through says how many
    were held back meanwhile (field suppressed=N), so a flood cannot fill the log."""

    def __init__(self, burst: int = 5, period: float = 60.0) -> None:
        self.burst = burst
        self.period = period
        self._start = -period
        self._count = 0
        self._held = 0

    def reset(self) -> None:
        """The cause is over: the next line of it goes out at once."""
        self._start, self._count, self._held = -self.period, 0, 0

    def allow(self) -> Optional[dict]:
        """None: do not log this one; else the fields to add to its line."""
        now = time.monotonic()
        if now - self._start >= self.period:
            self._start, self._count = now, 0
        if self._count >= self.burst:
            self._held += 1
            return None
        self._count += 1
        held, self._held = self._held, 0
        return {"suppressed": held} if held else {}


def get(name: str = "") -> KVLogger:
    """The logger `emitterd.<name>` (`emitterd` for "")."""
    return KVLogger(name)


# Characters that end or rewrite a line somewhere: C0 and C1 controls, DEL, the Unicode line
# and paragraph separators (journald ends a record at NUL or newline; a terminal obeys CR and
# ESC; str.splitlines splits at U+2028). Client strings reach the log, so none goes out raw.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: "re.Match[str]") -> str:
    c = m.group()
    return _SHORT.get(c) or ("\\x%02x" % ord(c) if ord(c) < 0x100 else "\\u%04x" % ord(c))


def escape_controls(s: str) -> str:
    """`s` with every character that ends or rewrites a line escaped (\\n, \\x1b, \\u2028):
    for text a client chose, in a log line or on a terminal."""
    return _UNSAFE.sub(_escape, s)


def _fmt_value(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=') or _UNSAFE.search(s):
        return '"%s"' % escape_controls(s.replace("\\", "\\\\").replace('"', '\\"'))
    return s


def _json_safe(m: "re.Match[str]") -> str:
    return "\\u%04x" % ord(m.group())


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (sd-daemon(3) prefixes)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def _utc_offset(created: float) -> str:
    """The local time zone's offset at `created`, as ISO 8601 writes it (+01:00, Z for UTC)."""
    off = time.strftime("%z", time.localtime(created))
    return "Z" if off in ("+0000", "-0000") else off[:3] + ":" + off[3:]


class _TextFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        kv = getattr(record, "kv", None) or {}
        if self.journal:
            line = "%s: %s" % (record.name, record.getMessage())
        else:
            # local time, with its offset: a line read in another time zone (or beside the
            # json format's UTC) still says when it happened
            line = "%s.%03d%s %s %s: %s" % (
                self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), record.msecs,
                _utc_offset(record.created), record.levelname, record.name,
                record.getMessage())
        if kv:
            line += " " + " ".join("%s=%s" % (k, _fmt_value(v)) for k, v in kv.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if self.journal:
            # journald makes one entry per line: give every line the priority.
            pri = "<%d>" % syslog_priority(record.levelno)
            line = "\n".join(pri + part for part in line.split("\n"))
        return line


class _JsonFormatter(logging.Formatter):
    def __init__(self, journal: bool = False) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        obj = {"ts": ts.isoformat(timespec="microseconds").replace("+00:00", "Z"),
               "level": record.levelname.lower(),
               "logger": record.name,
               "msg": record.getMessage(),
               "fields": getattr(record, "kv", None) or {}}
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        # default=str: a field value that JSON cannot hold (bytes, paths) is shown as text
        line = json.dumps(obj, default=str, ensure_ascii=False, separators=(",", ":"))
        # json escapes C0 controls, not DEL, C1 or U+2028/9 (only inside strings: valid JSON)
        line = _UNSAFE.sub(_json_safe, line)
        if self.journal:
            line = "<%d>%s" % (syslog_priority(record.levelno), line)
        return line


def journal_stream_matches(stream: Optional[IO[str]] = None, env: Optional[dict] = None) -> bool:
    """True when $JOURNAL_STREAM names `stream` (default stderr): it goes to journald."""
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM")
    if not value:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def _level(level: str) -> int:
    try:
        return LEVELS[level.lower()]
    except (KeyError, AttributeError):
        raise ValueError("unknown log level %r (expected one of %s)"
                         % (level, ", ".join(LEVELS))) from None


class _NoWaitHandler(logging.StreamHandler):
    """Writes a line only when the stream can take it now: a pipe nobody reads (a stalled
    journald, `emitterd run 2>&1 | less` paused) would otherwise hold the loop in write(),
    and with it every client, delivery and watchdog ping. A line it cannot take is dropped
    and counted; the next line written says how many (field log_lines_dropped=N). Files
    and terminals always take them. The stream is written in pieces of at most PIPE_BUF
    bytes, each only when poll() says the pipe has room for it, so no write blocks."""

    PIECE = select.PIPE_BUF

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.dropped = 0
        self._cut = False             # a line was cut short: the next one starts anew
        self._fd: Optional[int] = None
        try:
            fd = stream.fileno()
            self._poll = select.poll()
            self._poll.register(fd, select.POLLOUT)
            self._fd = fd
        except (AttributeError, OSError, ValueError):
            pass                      # no descriptor (a StringIO in tests): write as is

    def emit(self, record: logging.LogRecord) -> None:
        if self._fd is None:
            super().emit(record)
            return
        try:
            if self.dropped:
                record.kv = {**(getattr(record, "kv", None) or {}),
                             "log_lines_dropped": self.dropped}
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            if self._cut:
                data = b"\n" + data
            self.stream.flush()       # what else went to the stream goes first
            for i in range(0, len(data), self.PIECE):
                if not self._poll.poll(0):
                    self.dropped += 1
                    self._cut = self._cut or i > 0   # a fragment left unended stays so
                    return
                os.write(self._fd, data[i:i + self.PIECE])
            self.dropped = 0
            self._cut = False
        except OSError:
            pass                      # nobody reads any more (EPIPE): nobody to tell
        except Exception:             # noqa: BLE001 - logging's own rule: never raise
            self.handleError(record)


def configure(level: str = "info", fmt: str = "text", stream: Optional[IO[str]] = None,
              journal: Optional[bool] = None) -> None:
    """Send emitterd's logs to `stream` (stderr) at `level`, as `fmt` ("text" or "json").

    `journal` None = detect journald from $JOURNAL_STREAM. Calling it again
    replaces the previous set-up (a reload of log_format).
    """
    if fmt not in ("text", "json"):
        raise ValueError("unknown log format %r (expected text or json)" % (fmt,))
    levelno = _level(level)
    stream = sys.stderr if stream is None else stream
    if journal is None:
        journal = journal_stream_matches(stream)
    root = logging.getLogger(_ROOT)
    handler = _NoWaitHandler(stream)
    for h in list(root.handlers):
        if isinstance(h, _NoWaitHandler) and h.stream is stream:
            # a reload: the lines dropped so far, and a line left cut short, are still owed
            handler.dropped, handler._cut = h.dropped, h._cut
        root.removeHandler(h)
    handler.setFormatter(_JsonFormatter(journal) if fmt == "json" else _TextFormatter(journal))
    root.addHandler(handler)
    root.setLevel(levelno)
    root.propagate = False


def set_level(level: str) -> None:
    """Change the level live (SIGHUP reload of log_level)."""
    logging.getLogger(_ROOT).setLevel(_level(level))
