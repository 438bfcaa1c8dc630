"""Output of emitterctl: JSON documents and human-readable tables.

JSON rendering (``--json``): every value the daemon sends is msgpack, which
has types JSON lacks. :func:`to_jsonable` maps them so that ``json.dumps``
never fails:

* ``bytes`` -> a base64 string (standard alphabet, with padding);
* map keys that are not strings -> strings (bytes keys base64, others ``str()``);
* NaN / +-Infinity -> the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``;
* msgpack ``Timestamp`` -> float seconds, ``ExtType`` -> ``{"ext": code, "data": base64}``;
* anything else unknown -> its ``repr()``.
"""
from __future__ import annotations

import base64
import datetime
import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import msgpack
from wcwidth import wcswidth

# client text (stream names, selectors): one line each, no escape sequences
from emitterd.logs import escape_controls as printable


# ---- JSON --------------------------------------------------------------------

def _b64(b: bytes) -> str:
    return base64.b64encode(bytes(b)).decode("ascii")


def _key(k: Any) -> str:
    if isinstance(k, str):
        return k
    if isinstance(k, (bytes, bytearray, memoryview)):
        return _b64(k)
    if isinstance(k, bool) or k is None:
        return json.dumps(k)
    return str(k)


def to_jsonable(obj: Any) -> Any:
    """A copy of `obj` made only of JSON types (see the module docstring)."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, dict):
        return {_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, msgpack.ExtType):      # a namedtuple: before the tuple case
        return {"ext": obj.code, "data": _b64(obj.data)}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return _b64(obj)
    if isinstance(obj, msgpack.Timestamp):
        return obj.to_unix()
    return repr(obj)


def dumps(obj: Any, indent: Optional[int] = 2) -> str:
    """One JSON document (keys in the daemon's order, non-ASCII kept)."""
    return json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)


def compact(obj: Any) -> str:
    """One-line JSON (for event data in tables and tail lines)."""
    return json.dumps(to_jsonable(obj), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


# ---- small formats -----------------------------------------------------------

def human_bytes(n: Any) -> str:
    """1536 -> '1.5K', 73400320 -> '70.0M' (binary units)."""
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "-"
    n = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return ("%d%s" % (n, unit)) if unit == "B" else ("%.1f%s" % (n, unit))
        n /= 1024
    return "%.1fT" % n  # pragma: no cover


def human_duration(seconds: Any) -> str:
    """3725.4 -> '1h02m05s'."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return "%dd%02dh%02dm" % (d, h, m)
    if h:
        return "%dh%02dm%02ds" % (h, m, s)
    if m:
        return "%dm%02ds" % (m, s)
    return "%.1fs" % seconds if seconds < 10 else "%ds" % s


def num(v: Any) -> str:
    """A number for a table cell; '-' when missing."""
    if v is None or isinstance(v, bool):
        return "-"
    if isinstance(v, float):
        return "%.1f" % v
    if isinstance(v, int):
        return str(v)
    return str(v)


def events(n: int) -> str:
    """ "1 event", "12,345 events"."""
    return "%s event%s" % (num(n), "" if n == 1 else "s")


def rate(v: Optional[float]) -> str:
    return "-" if v is None else ("%.1f" % v if v < 100 else "%d" % round(v))


def text_width(s: str) -> int:
    """Terminal columns of `s` (wide characters take 2, combining marks 0)."""
    if s.isascii():
        return len(s)
    w = wcswidth(s)
    return len(s) if w < 0 else w       # -1: a character without a width; count it as one


def _pad(s: str, width: int, right: bool) -> str:
    fill = " " * max(0, width - text_width(s))
    return fill + s if right else s + fill


def clip(s: str, width: int) -> str:
    """`s` made printable and cut to `width` terminal columns, "…" included."""
    s = printable(s)
    if text_width(s) <= width:
        return s
    room = max(1, width - 1)
    # the longest prefix that fits, measured as text_width measures the whole (a variation
    # selector or a ZWJ sequence changes the width of what comes before it)
    lo, hi = 0, len(s)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_width(s[:mid]) <= room:
            lo = mid
        else:
            hi = mid - 1
    return s[:max(1, lo)] + "…"


def selector_text(sel: Any) -> str:
    return sel if isinstance(sel, str) else compact(sel)


# ---- tables ------------------------------------------------------------------

def table(headers: Sequence[str], rows: Iterable[Sequence[Any]],
          right: Iterable[int] = (), max_width: Optional[Dict[int, int]] = None) -> str:
    """A plain text table: a header line, then one line per row.

    `right` lists the column indexes aligned right (numbers); `max_width`
    clips the given columns."""
    right = set(right)
    max_width = max_width or {}
    cells: List[List[str]] = []
    for row in rows:
        line = []
        for i, v in enumerate(row):
            s = v if isinstance(v, str) else num(v)
            if i in max_width:
                s = clip(s, max_width[i])
            else:
                s = s.replace("\n", "\\n")
            line.append(s)
        cells.append(line)
    widths = [text_width(h) for h in headers]
    for line in cells:
        for i, s in enumerate(line):
            widths[i] = max(widths[i], text_width(s))

    def fmt(line: Sequence[str]) -> str:
        out = []
        for i, s in enumerate(line):
            out.append(_pad(s, widths[i], i in right))
        return "  ".join(out).rstrip()

    return "\n".join([fmt(list(headers))] + [fmt(line) for line in cells])


def _workers_summary(pool: Dict[str, Any]) -> str:
    workers = pool.get("workers") or []
    sub = pool.get("subscription") or {}
    ready = sum(1 for w in workers if w.get("state") == "ready")
    want = sub.get("pool_size")
    return "%d/%s" % (ready, want if want is not None else len(workers))


def pools_table(pools: List[Dict[str, Any]]) -> str:
    """`list`: one line per pool."""
    if not pools:
        return "no subscriptions"
    rows = []
    for p in pools:
        sub = p.get("subscription") or {}
        rows.append([
            str(p.get("key", "")), str(sub.get("name", "")), str(sub.get("type", "")),
            selector_text(sub.get("selector")), str(p.get("state", "")), _workers_summary(p),
            "%s/%s" % (num(p.get("checkpoint")), num(p.get("head"))),
            p.get("in_flight"), p.get("delivered"), p.get("restarts"),
        ])
    return table(["KEY", "NAME", "TYPE", "SELECTOR", "STATE", "WORKERS", "CHECKPOINT/HEAD",
                  "IN_FLIGHT", "DELIVERED", "RESTARTS"], rows, right=(5, 6, 7, 8, 9),
                 max_width={1: 30, 3: 40})


def workers_table(workers: List[Dict[str, Any]]) -> str:
    """The worker table of `status`."""
    if not workers:
        return "no workers"
    rows = []
    for w in workers:
        cpu = w.get("cpu_percent")
        rows.append([w.get("index"), w.get("pid"), str(w.get("state", "")),
                     human_bytes(w.get("rss")),
                     "%.1f" % cpu if isinstance(cpu, (int, float)) else "-",
                     w.get("in_flight"), w.get("delivered"), w.get("restarts"),
                     w.get("consumers")])
    return table(["#", "PID", "STATE", "RSS", "CPU%", "IN_FLIGHT", "DELIVERED", "RESTARTS",
                  "CONSUMERS"], rows, right=(0, 1, 3, 4, 5, 6, 7, 8))


def _block(pairs: Sequence[tuple]) -> str:
    width = max(len(k) for k, _ in pairs)
    # values carry clients' text (a name, a selector): one line each, no escape sequences
    return "\n".join("%s  %s" % ((k + ":").ljust(width + 1), printable(str(v)))
                     for k, v in pairs)


def _subscriber_text(subscriber: Any, workers: List[Dict[str, Any]]) -> str:
    """The subscriber, and who is not connected to it: a worker that cannot reach its
    subscriber retries and holds its events, which status otherwise only shows as lag."""
    ready = [w for w in workers if w.get("state") == "ready"]
    connected = sum(1 for w in ready if isinstance(w.get("consumers"), int) and w["consumers"] > 0)
    if not subscriber:
        if ready and not connected:
            return "- (attached consumers; none attached: events wait for one)"
        return "- (attached consumers)"
    if connected < len(ready):
        return ("%s (NOT CONNECTED from %d of %d ready workers: they retry, and their events "
                "wait; the daemon's log says why)" % (subscriber, len(ready) - connected,
                                                       len(ready)))
    return str(subscriber)


def pool_block(p: Dict[str, Any]) -> str:
    """`status`, `start`, `stop`, `update`: the pool, then its workers."""
    sub = p.get("subscription") or {}
    opts = sub.get("options") or {}
    checkpoint, head = p.get("checkpoint"), p.get("head")
    lag = head - checkpoint if isinstance(head, int) and isinstance(checkpoint, int) else None
    pairs = [
        ("key", p.get("key", "")),
        ("name", "%s (pool %s)" % (sub.get("name", ""), p.get("name", ""))),
        ("type", sub.get("type", "")),
        ("selector", selector_text(sub.get("selector"))),
        ("subscriber", _subscriber_text(sub.get("subscriber"), p.get("workers") or [])),
        ("state", p.get("state", "")),
        ("pool size", "%s (%s ready)" % (num(sub.get("pool_size")), _workers_summary(p))),
        ("start from", num(sub.get("start_from")) if not isinstance(sub.get("start_from"), str)
         else sub.get("start_from")),
        ("checkpoint", "%s of %s (lag %s)" % (num(checkpoint), num(head), num(lag))),
        ("in flight", num(p.get("in_flight"))),
        ("delivered", "%s (retried %s, parked %s)" % (num(p.get("delivered")),
                                                      num(p.get("retried")), num(p.get("parked")))),
        ("restarts", num(p.get("restarts"))),
        ("options", ", ".join("%s=%s" % (k, compact(v)) for k, v in opts.items()) or "-"),
    ]
    return _block(pairs) + "\n\n" + workers_table(p.get("workers") or [])


def ping_block(r: Dict[str, Any], socket_path: str) -> str:
    """`ping`."""
    return _block([
        ("emitterd", "%s, pid %s" % (r.get("version", "?"), num(r.get("pid")))),
        ("store", str(r.get("store_id", ""))),
        ("uptime", human_duration(r.get("uptime"))),
        ("head", num(r.get("head"))),
        ("socket", socket_path),
    ])


def event_line(e: Dict[str, Any]) -> str:
    """`tail`: position, stream, type, data on one line (attempt when > 1)."""
    attempt = e.get("attempt")
    extra = "  (attempt %s)" % attempt if isinstance(attempt, int) and attempt > 1 else ""
    return "%s  %s  %s  %s%s" % (num(e.get("position")), printable(str(e.get("stream", ""))),
                                 printable(str(e.get("type", ""))), compact(e.get("data")), extra)


def parked_table(events: List[Dict[str, Any]]) -> str:
    """`parked KEY`: the parked events."""
    if not events:
        return "no parked events"
    rows = [[e.get("position"), str(e.get("stream", "")), str(e.get("type", "")),
             e.get("attempt"), str(e.get("reason", "")), compact(e.get("data"))] for e in events]
    return table(["POSITION", "STREAM", "TYPE", "ATTEMPT", "REASON", "DATA"], rows,
                 right=(0, 3), max_width={1: 40, 2: 40, 4: 40, 5: 60})


# ---- top ---------------------------------------------------------------------

def top_frame(frame: Dict[str, Any]) -> str:
    """One screen of `top` from the dict built by the ctl `top` command."""
    ping = frame.get("daemon") or {}
    now = datetime.datetime.now().strftime("%H:%M:%S")
    head = "emitterd %s  pid %s  up %s  head %s  pools %d  %s" % (
        ping.get("version", "?"), num(ping.get("pid")), human_duration(ping.get("uptime")),
        num(ping.get("head")), len(frame.get("pools") or []), now)
    prows = []
    wrows = []
    for p in frame.get("pools") or []:
        prows.append([p["key"], p["name"], p["state"], p["workers"], p["lag"],
                      rate(p["delivered_per_s"]), p["delivered"], p["in_flight"], p["parked"],
                      p["restarts"]])
        for w in p.get("worker_rows") or []:
            wrows.append([p["key"], w["index"], w["pid"], w["state"], human_bytes(w["rss"]),
                          "%.1f" % w["cpu_percent"] if isinstance(w["cpu_percent"], (int, float))
                          else "-", w["in_flight"], rate(w["delivered_per_s"]), w["delivered"],
                          w["restarts"], w["consumers"]])
    out = [head, ""]
    if prows:
        out.append(table(["KEY", "NAME", "STATE", "WORKERS", "LAG", "DELIV/S", "DELIVERED",
                          "IN_FLIGHT", "PARKED", "RESTARTS"], prows,
                         right=(3, 4, 5, 6, 7, 8, 9), max_width={1: 24}))
    else:
        out.append("no subscriptions")
    if wrows:
        out += ["", table(["POOL", "#", "PID", "STATE", "RSS", "CPU%", "IN_FLIGHT", "DELIV/S",
                           "DELIVERED", "RESTARTS", "CONSUMERS"], wrows,
                          right=(1, 2, 4, 5, 6, 7, 8, 9, 10))]
    return "\n".join(out)
