"""Logging: one line per event with key=value fields (see configure())."""
import logging
import sys
from typing import Any

_ROOT = "emitterd"


class KVLogger:
    """A logger whose calls take a message and key=value fields."""

    __slots__ = ("_log",)

    def __init__(self, name: str) -> None:
        self._log = logging.getLogger("%s.%s" % (_ROOT, name) if name else _ROOT)

    def _emit(self, level: int, msg: str, fields: dict, exc_info: bool = False) -> None:
        if self._log.isEnabledFor(level):
            self._log.log(level, msg, extra={"kv": fields}, exc_info=exc_info)

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit(logging.DEBUG, msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit(logging.INFO, msg, fields)

    def warning(self, msg: str, **fields: Any) -> None:
        self._emit(logging.WARNING, msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, fields)

    def exception(self, msg: str, **fields: Any) -> None:
        self._emit(logging.ERROR, msg, fields, exc_info=True)


def get(name: str = "") -> KVLogger:
    return KVLogger(name)


def _fmt_value(v: Any) -> str:
    s = str(v)
    if not s or any(c in s for c in ' "=\n'):
        return '"%s"' % s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return s


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        kv = getattr(record, "kv", None) or {}
        line = "%s %s %s: %s" % (self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), record.levelname,
                                 record.name, record.getMessage())
        if kv:
            line += " " + " ".join("%s=%s" % (k, _fmt_value(v)) for k, v in kv.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", fmt: str = "text") -> None:
    """Send emitterd's logs to stderr at `level`."""
    root = logging.getLogger(_ROOT)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TextFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    root.propagate = False
