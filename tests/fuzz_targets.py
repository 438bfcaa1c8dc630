"""Fuzz targets of emitterd, shared by scripts/fuzz (atheris, coverage-guided, and the socket
fuzzer) and by the test suite (a few hundred hypothesis-generated inputs each).

In-process targets (each takes plain Python values; ``*_from_bytes`` adapters turn a fuzzer's
byte string into such values, so atheris and hypothesis drive the very same code):

* :func:`check_decoder` -- ``emitterd.framing.Decoder`` fed byte chunks: returns only maps or
  None, or raises FrameError (bad_frame / frame_too_large) and stays poisoned; the result
  does not depend on how the bytes were chunked and agrees with a reference decoder of
  PROTOCOL §1.
* :func:`check_subscription` -- ``subscription.validate(sub, cfg)`` raises only ProtocolError
  (``invalid`` with a ``subscription...`` field); a result is complete, validates again to
  itself and has a key.
* :func:`check_publish` -- ``control.events.validate_publish(args, cfg)`` raises only
  ProtocolError (``invalid``).
* :func:`check_selector` -- ``filters.normalize`` raises only SelectorError; a normalized
  selector normalizes to itself, compiles, and its matcher never raises, returns a bool, and
  agrees with a plain reference implementation of PROTOCOL §4 on well-formed events.

A violated property raises :class:`FuzzFailure`; any other exception escaping a target is a
crash. Generated values are what msgpack can carry on the wire (str is valid UTF-8, ints in
[-2**63, 2**64), lists not tuples, ExtType/Timestamp possible).

Socket fuzzing (black box, hypothesis) lives in the second half: :class:`SocketFuzzer` sends
requests that must fail (one or more fields of a valid request replaced by a wrong value),
random bytes, truncated frames, huge and deeply nested values and random op names to a
dedicated daemon, checks every response, pings on another connection after each case, and
compares a snapshot of the daemon (pools, states, worker pids, specs, head) before/after.

Run one target under atheris (what scripts/fuzz does)::

    python tests/fuzz_targets.py atheris decoder -runs=10000 -artifact_prefix=/tmp/x/
"""
from __future__ import annotations

import sys

if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "atheris":
    # Instrument emitterd for coverage before anything imports it.
    import atheris  # type: ignore

    with atheris.instrument_imports(include=["emitterd"]):
        import emitterd.control.events  # noqa: F401
        import emitterd.filters  # noqa: F401
        import emitterd.framing  # noqa: F401
        import emitterd.settings  # noqa: F401
        import emitterd.subscription  # noqa: F401

import base64
import json
import math
import os
import random
import re
import select
import socket
import struct
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack

from emitterd import errors as E
from emitterd import filters, framing, settings, subscription
from emitterd.control import events as ev_ops
from emitterd.eventlog import EventRecord

HEADER = struct.Struct(">I")
MAX_FRAME = framing.DEFAULT_MAX_FRAME


class FuzzFailure(AssertionError):
    """A property of a target does not hold for this input."""


def _fail(msg: str) -> None:
    raise FuzzFailure(msg)


_CFG = None


def cfg() -> Any:
    global _CFG
    if _CFG is None:
        _CFG = settings.load(env={})
    return _CFG


def packed(v: Any) -> Optional[bytes]:
    """Canonical bytes for comparing values (NaN == NaN here); None when not encodable."""
    try:
        return msgpack.packb(v, use_bin_type=True)
    except Exception:  # noqa: BLE001
        return None


def short(v: Any, n: int = 300) -> str:
    try:
        s = repr(v)
    except Exception:  # noqa: BLE001 - e.g. RecursionError on deep values
        s = "<%s, repr failed>" % type(v).__name__
    return s if len(s) <= n else s[:n] + "..."


# =========================================================================== generators
# A byte string drives every choice, so coverage-guided mutation of the bytes explores the
# structure. An exhausted source keeps answering 0 (the first, simplest choice).

ALPHABET = "ab-_.*?$/:" + "xyz019 " + "\u00e9\u20ac\U0001f600\x00\n"
KEYS = (list(subscription.FIELDS) + list(subscription.OPTION_NAMES)
        + ["stream", "type", "data", "metadata", "tags", "id", "events", "expected_version",
           "any", "all", "$gt", "$gte", "$lt", "$lte", "$ne", "$in", "$nin", "$exists",
           "$glob", "$regex", "key", "x", "", "kind", "amount", "a", "b", "user"])
STRINGS = (list(filters.SELECTOR_TYPES) + list(subscription.STRATEGIES)
           + ["origin", "now", "$all", "unix:/tmp/fz.sock", "unix:rel.sock", "unix:", "unix:/",
              "tcp:/x", "*", "?", "**", "a*b?c", "order-*", "*-1", "user-?", "user-1", "vip",
              "a", "b", "", "\u00e9", "x" * 200, "x" * 201, "y" * 256, "z" * 257, "i" * 128,
              "i" * 129, "unix:/" + "p" * 102, "unix:/" + "p" * 120, "unix:/a\x00b",
              "order.created", "list", "replay", "purge", "-1", "1", "true", "null"])
INTS = [0, 1, -1, 2, 3, 63, 64, 65, 255, 256, 10000, 10001, 100000, 100001, 2 ** 31 - 1,
        2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1, -2 ** 63, -2]
FLOATS = [0.0, -0.0, 0.1, 0.5, 1.0, 1.5, 30.0, 1e-300, 5e-324, 1e308, float("inf"),
          float("-inf"), float("nan"), 2.0 ** 63, -1.0, 64.0, 1.0000000001]


class ByteSource:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u8(self) -> int:
        if self.pos < len(self.data):
            b = self.data[self.pos]
            self.pos += 1
            return b
        return 0

    def below(self, n: int) -> int:
        if n <= 1:
            return 0
        if n <= 256:
            return self.u8() % n
        return ((self.u8() << 8) | self.u8()) % n

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.below(len(seq))]

    def flip(self, num: int = 1, den: int = 2) -> bool:
        return self.u8() % den < num

    def take(self, n: int) -> bytes:
        b = self.data[self.pos:self.pos + n]
        self.pos += len(b)
        return b

    def rest(self) -> bytes:
        b = self.data[self.pos:]
        self.pos = len(self.data)
        return b

    def text(self, max_len: int = 12) -> str:
        n = self.below(max_len + 1)
        return "".join(ALPHABET[self.u8() % len(ALPHABET)] for _ in range(n))

    def name(self) -> str:
        return self.choice(STRINGS) if self.flip(1, 4) else (self.text(8) or "n")

    def key(self) -> Any:
        k = self.u8() % 10
        if k < 6:
            return self.choice(KEYS)
        if k < 8:
            return self.text(6)
        if k == 8:
            return self.choice(INTS[:12])
        return self.choice([None, True, 1.5, b"k"])

    def value(self, depth: int = 0) -> Any:
        k = self.u8() % 16
        if depth >= 6 and k >= 10:
            k = k % 10
        if k == 0:
            return None
        if k == 1:
            return bool(self.u8() & 1)
        if k == 2:
            return self.choice(INTS)
        if k == 3:
            return int.from_bytes(self.take(8).ljust(8, b"\0"), "big", signed=True)
        if k == 4:
            return self.choice(FLOATS)
        if k == 5:
            return struct.unpack(">d", self.take(8).ljust(8, b"\0"))[0]
        if k == 6:
            return self.choice(STRINGS)
        if k == 7:
            return self.text()
        if k == 8:
            return self.take(self.below(8))
        if k == 9:
            return msgpack.ExtType(self.u8() % 128, self.take(self.below(4))) if self.flip() \
                else msgpack.Timestamp(self.below(1 << 16), 0)
        if k in (10, 11):
            return [self.value(depth + 1) for _ in range(self.below(5))]
        if k in (12, 13):
            return {self.key(): self.value(depth + 1) for _ in range(self.below(5))}
        if k == 14:
            return deep(self.choice([5, 62, 63, 64, 65, 66, 100, 300]),
                        self.choice(["list", "map", "opmap"]), self.value(6))
        return self.selector_value(depth + 1)

    # -- selector-shaped values
    def glob(self) -> str:
        if self.flip(1, 3):
            return self.choice(STRINGS)
        return "".join(self.choice("ab*?-.\u00e9\n") for _ in range(self.below(8)))

    def literal(self, depth: int) -> Any:
        return self.value(depth + 1) if self.flip(1, 3) else self.choice(
            [0, 1, 1.0, -1, 2.5, True, False, None, "a", "b", "", b"a", [1, "a"], [], {"a": 1},
             {"$gt": 1}, float("nan")])

    def op_map(self, depth: int) -> dict:
        out = {}
        for _ in range(1 + self.below(3)):
            op = self.choice(["$gt", "$gte", "$lt", "$lte", "$ne", "$in", "$nin", "$exists",
                              "$glob", "$regex", "$"])
            if op in ("$in", "$nin") and self.flip(3, 4):
                arg: Any = [self.literal(depth) for _ in range(self.below(4))]
            elif op == "$exists" and self.flip(3, 4):
                arg = bool(self.u8() & 1)
            elif op == "$glob" and self.flip(3, 4):
                arg = self.glob()
            else:
                arg = self.literal(depth)
            out[op] = arg
        return out

    def payload_map(self, depth: int) -> dict:
        out = {}
        for _ in range(self.below(4)):
            k = self.choice(["kind", "amount", "a", "b", "user", "$x", "", "x"])
            r = self.u8() % 4
            if r == 0 and depth < 70:
                out[k] = self.payload_map(depth + 1)
            elif r == 1:
                out[k] = self.op_map(depth + 1)
            else:
                out[k] = self.literal(depth + 1)
        return out

    def selector_value(self, depth: int = 0) -> Any:
        k = self.u8() % 6
        if k == 0:
            return self.glob()
        if k == 1:
            d: Dict[str, Any] = {}
            if self.flip():
                d["stream"] = self.glob()
            if self.flip():
                d["type"] = self.glob()
            if self.flip(1, 8):
                d[self.key()] = self.value(depth + 1)
            return d
        if k == 2:
            return [self.glob() for _ in range(self.below(4))]
        if k == 3:
            d = {}
            if self.flip():
                d["any"] = [self.glob() for _ in range(self.below(3))]
            if self.flip():
                d["all"] = [self.glob() for _ in range(self.below(3))]
            if self.flip(1, 8):
                d[self.key()] = self.value(depth + 1)
            return d
        if k == 4:
            return self.payload_map(depth)
        return self.value(depth + 1)


def deep(depth: int, kind: str, leaf: Any = None) -> Any:
    """A value nested `depth` levels (built iteratively)."""
    v = leaf
    for _ in range(depth):
        if kind == "list":
            v = [v]
        elif kind == "opmap":
            v = {"a": {"$in": [v]}}
        else:
            v = {"a": v}
    return v


def mutate(src: ByteSource, obj: Any, rounds: int) -> Any:
    """Replace, delete or add values at random paths of a nested map/list structure."""
    for _ in range(rounds):
        paths: List[Tuple[Any, ...]] = []

        def walk(v: Any, path: Tuple[Any, ...], d: int) -> None:
            paths.append(path)
            if d > 4:
                return
            if isinstance(v, dict):
                for k in list(v)[:8]:
                    walk(v[k], path + (k,), d + 1)
            elif isinstance(v, list):
                for i in range(min(len(v), 4)):
                    walk(v[i], path + (i,), d + 1)
        walk(obj, (), 0)
        path = src.choice(paths)
        if not path:
            if src.flip(1, 4):
                obj = src.value()
            continue
        parent = obj
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        r = src.u8() % 5
        if r == 0 and isinstance(parent, dict):
            del parent[last]
        elif r == 0 and isinstance(parent, list):
            del parent[last]
        elif r == 1 and isinstance(parent, dict):
            parent[src.key()] = src.value()
        elif r == 2:
            parent[last] = src.selector_value() if src.flip() else src.choice(
                STRINGS + INTS + FLOATS + [None, True, False, [], {}])
        else:
            parent[last] = src.value()
    return obj


# ---- templates: valid-looking inputs that mutations then break

def template_subscription(src: ByteSource) -> dict:
    t = src.choice(filters.SELECTOR_TYPES)
    if t in ("stream", "event_type"):
        sel: Any = src.choice(["$all", "user-1", "order.created", "x"]) if src.flip() \
            else src.glob() or "s"
    elif t == "event_pattern":
        sel = src.selector_value() if src.flip(1, 3) else (
            src.glob() or "*" if src.flip() else {"stream": src.glob() or "*"})
    elif t == "tags":
        sel = [src.glob() or "t" for _ in range(1 + src.below(3))] if src.flip() else \
            {"any": ["vip"], "all": [src.glob() or "t"]}
    else:
        sel = src.payload_map(0) or {"kind": "a"}
    sub: Dict[str, Any] = {"name": src.name(), "type": t, "selector": sel}
    if src.flip():
        sub["subscriber"] = src.choice([None, "unix:/tmp/fz.sock", "unix:/run/x/y.sock"])
    if src.flip():
        sub["pool_size"] = src.choice([1, 2, 64, None])
    if src.flip():
        sub["start_from"] = src.choice(["origin", "now", 1, 5, None])
    if src.flip():
        opts: Dict[str, Any] = {}
        valid = {"strategy": ["pinned", "round_robin", "random"], "batch_size": [1, 64, 10000],
                 "max_in_flight": [1, 256], "ack_timeout": [0.5, 30, 1e-9],
                 "max_retries": [0, 10], "retry_backoff": [[0.1, 30], [1, 1], [0.5, 2.0]],
                 "max_restarts": [0, 10], "restart_period": [60, 0.1], "ephemeral": [False, True]}
        for name in subscription.OPTION_NAMES:
            if src.flip(1, 3):
                opts[name] = src.choice(valid[name])
        sub["options"] = opts
    return sub


def template_event(src: ByteSource) -> dict:
    e: Dict[str, Any] = {"stream": src.name() or "s", "type": src.name() or "t"}
    if src.flip():
        e["data"] = src.value()
    if src.flip(1, 3):
        e["metadata"] = {src.text(4): src.value(3)}
    if src.flip(1, 3):
        e["tags"] = [src.text(4) for _ in range(src.below(3))]
    if src.flip(1, 3):
        e["id"] = src.name()
    return e


def template_publish(src: ByteSource) -> dict:
    args: Dict[str, Any] = {"events": [template_event(src) for _ in range(1 + src.below(3))]}
    if src.flip(1, 4):
        args["expected_version"] = src.choice([-1, 0, 5, None])
    return args


# =========================================================================== targets

FRAME_CODES = (E.BAD_FRAME, E.FRAME_TOO_LARGE)


def reference_frames(stream: bytes, max_frame: int) -> Tuple[List[bytes], Optional[str]]:
    """PROTOCOL §1, read straight from the text: (packed maps decoded, error code or None)."""
    out: List[bytes] = []
    i = 0
    while len(stream) - i >= 4:
        (n,) = HEADER.unpack_from(stream, i)
        if n == 0:
            return out, E.BAD_FRAME
        if n > max_frame:
            return out, E.FRAME_TOO_LARGE
        if len(stream) - i - 4 < n:
            return out, None
        payload = stream[i + 4:i + 4 + n]
        try:
            obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - invalid msgpack, extra data, bad UTF-8
            return out, E.BAD_FRAME
        if not isinstance(obj, dict):
            return out, E.BAD_FRAME
        out.append(packed(obj) or b"?")
        i += 4 + n
    return out, None


def _run_decoder(chunks: Sequence[bytes], max_frame: int) -> Tuple[List[bytes], Optional[str]]:
    d = framing.Decoder(max_frame)
    out: List[bytes] = []
    for chunk in chunks:
        d.feed(chunk)
        while True:
            try:
                m = d.next()
            except framing.FrameError as e:
                if e.code not in FRAME_CODES:
                    _fail("FrameError with code %r" % (e.code,))
                try:
                    d.next()
                except framing.FrameError as e2:
                    if e2.code != e.code:
                        _fail("a poisoned decoder changed its error %s -> %s" % (e.code, e2.code))
                else:
                    _fail("the decoder answered again after a FrameError")
                return out, e.code
            if m is None:
                break
            if not isinstance(m, dict):
                _fail("Decoder.next() returned a %s" % type(m).__name__)
            out.append(packed(m) or b"?")
    return out, None


def check_decoder(stream: bytes, max_frame: int, cuts: Sequence[int]) -> None:
    """Feed `stream` cut at `cuts` (offsets) and check the decoder's answers."""
    bounds = sorted({c for c in cuts if 0 < c < len(stream)})
    chunks, prev = [], 0
    for b in bounds + [len(stream)]:
        chunks.append(stream[prev:b])
        prev = b
    got = _run_decoder(chunks, max_frame)
    whole = _run_decoder([stream], max_frame)
    if got != whole:
        _fail("chunking changed the result: %d frames/%s vs %d frames/%s"
              % (len(got[0]), got[1], len(whole[0]), whole[1]))
    ref = reference_frames(stream, max_frame)
    if got != ref:
        _fail("decoder disagrees with PROTOCOL §1: %d frames/%s, reference %d frames/%s"
              % (len(got[0]), got[1], len(ref[0]), ref[1]))
    # (the reference refuses an oversized frame from its header alone, body or not, so the
    # equality above also checks that frame_too_large never waits for the body)


def decoder_from_bytes(data: bytes) -> None:
    src = ByteSource(data)
    max_frame = src.choice([1, 2, 5, 16, 100, 4096, MAX_FRAME])
    mode = src.u8() % 3
    if mode == 0:
        stream = src.rest()
    else:
        parts = []
        for _ in range(1 + src.below(4)):
            kind = src.u8() % 5
            if kind == 0:
                payload = src.take(src.below(40))
            elif kind == 1:
                payload = packed(src.value()) or b"\xc1"
            elif kind == 2:
                payload = packed({"id": src.choice(INTS), "op": src.name(),
                                  "args": src.value()}) or b"\xc1"
            elif kind == 3:
                body = packed({src.key(): src.value()}) or b"\x80"
                payload = body + src.take(src.below(4))           # trailing bytes
            else:
                body = packed({"s": src.text()}) or b"\x80"
                payload = body.replace(b"a", bytes([0xC0 | src.u8() % 64]))  # break UTF-8
            n = len(payload)
            h = src.u8() % 8
            if h == 0:
                n = 0
            elif h == 1:
                n = max(0, n + src.choice([-1, 1, 2]))
            elif h == 2:
                n = src.choice([max_frame, max_frame + 1, 0xFFFFFFFF])
            parts.append(HEADER.pack(n) + payload)
        stream = b"".join(parts)
        if src.flip(1, 4):
            stream = stream[:src.below(len(stream) + 1)]
    seed = src.u8()
    rnd = random.Random(seed)
    cuts = [rnd.randrange(len(stream) + 1) for _ in range(rnd.randrange(6))] if stream else []
    if seed & 1:
        cuts = list(range(1, len(stream)))[:4096]          # byte by byte
    check_decoder(stream, max_frame, cuts)


def _check_invalid(e: E.ProtocolError, prefix: str, what: str) -> None:
    if e.code != E.INVALID:
        _fail("%s raised %s, not invalid: %s" % (what, e.code, e.message))
    field = (e.details or {}).get("field") if isinstance(e.details, dict) else None
    if not isinstance(field, str) or not (field == prefix or field.startswith(prefix + ".")
                                          or prefix == ""):
        _fail("%s: invalid without a %r field path: details=%r" % (what, prefix, e.details))
    if not isinstance(e.message, str):
        _fail("%s: message is not a str" % what)
    if packed(e.to_wire()) is None:
        _fail("%s: the error cannot be encoded: %s" % (what, short(e.to_wire())))


def check_subscription(sub: Any) -> None:
    try:
        out = subscription.validate(sub, cfg())
    except E.ProtocolError as e:
        _check_invalid(e, "subscription", "validate")
        return
    if set(out) != set(subscription.FIELDS):
        _fail("validate() result has fields %s" % sorted(out))
    if set(out["options"]) != set(subscription.OPTION_NAMES):
        _fail("validate() result has options %s" % sorted(out["options"]))
    try:
        again = subscription.validate(out, cfg())
    except E.ProtocolError as e:
        _fail("a validated subscription does not validate again: %s %s" % (e.message, e.details))
    if packed(again) != packed(out):
        _fail("validate() is not idempotent: %s -> %s" % (short(out), short(again)))
    k = subscription.key_of(out)
    if not subscription.is_key(k):
        _fail("key_of() gave %r" % (k,))
    if packed(out) is None:
        _fail("a validated subscription cannot be encoded (it is persisted and answered)")


def check_publish(args: Any) -> None:
    if not isinstance(args, dict):
        return          # the control server answers non-map args before any op runs
    try:
        batch = ev_ops.validate_publish(args, cfg())
    except E.ProtocolError as e:
        _check_invalid(e, "", "validate_publish")
        return
    if len(batch.events) != len(args["events"]):
        _fail("validate_publish dropped events")


class Ev:
    """An event as the dispatcher's matcher sees it (attributes only)."""
    __slots__ = ("stream", "type", "tags", "data")

    def __init__(self, stream: Any, type_: Any, tags: Any, data: Any) -> None:
        self.stream = stream
        self.type = type_
        self.tags = tags
        self.data = data


def stored_record(stream: str, type_: str, tags: list, data: Any, corrupt: bool = False) -> Any:
    """A real EventRecord (data decoded lazily from its body), or None if not encodable."""
    items = [("position", 1), ("id", "x"), ("stream", stream), ("version", 0), ("type", type_),
             ("data", data), ("metadata", {}), ("tags", tags), ("timestamp", 0), ("attempt", 1)]
    try:       # the stored layout: the whole delivered map, "attempt" 1 last
        body = b"\x8a" + b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True)
                                   for k, v in items)
    except Exception:  # noqa: BLE001
        return None
    if corrupt:
        body = body[:len(body) // 2]
    return EventRecord(1, stream, type_, tags, body)


# -- reference semantics of PROTOCOL §4 (written from the text, not from filters.py)

def ref_glob(glob: str, s: Any) -> bool:
    if not isinstance(s, str):
        return False
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    return re.fullmatch(rx, s, re.DOTALL) is not None


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ref_eq(a: Any, b: Any) -> bool:
    if _num(a) or _num(b):
        return _num(a) and _num(b) and a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(ref_eq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return (isinstance(b, dict) and len(a) == len(b)
                and all(k in b and ref_eq(v, b[k]) for k, v in a.items()))
    if isinstance(a, (str, bytes)):
        return type(a) is type(b) and a == b
    return False


def _is_opmap(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(isinstance(k, str) and k.startswith("$")
                                                   for k in v)


def ref_op(op: str, arg: Any, v: Any) -> bool:
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if not ((_num(arg) and _num(v)) or (isinstance(arg, str) and isinstance(v, str))):
            return False
        return {"$gt": v > arg, "$gte": v >= arg, "$lt": v < arg, "$lte": v <= arg}[op]
    if op == "$ne":
        return not ref_eq(arg, v)
    if op == "$in":
        return any(ref_eq(x, v) for x in arg)
    if op == "$nin":
        return not any(ref_eq(x, v) for x in arg)
    if op == "$exists":
        return arg is True
    if op == "$glob":
        return ref_glob(arg, v)
    raise AssertionError(op)


def ref_subset(sel: dict, data: Any) -> bool:
    if not isinstance(data, dict):
        return False
    for k, want in sel.items():
        if k not in data:
            if not (isinstance(want, dict) and want == {"$exists": False}
                    and want["$exists"] is False):
                return False
            continue
        v = data[k]
        if _is_opmap(want):
            if not all(ref_op(op, arg, v) for op, arg in want.items()):
                return False
        elif isinstance(want, dict):
            if not ref_subset(want, v):
                return False
        elif not ref_eq(want, v):
            return False
    return True


def ref_match(type_: str, sel: Any, e: Ev) -> bool:
    if type_ == "stream":
        return sel == "$all" or e.stream == sel
    if type_ == "event_type":
        return e.type == sel
    if type_ == "event_pattern":
        if isinstance(sel, str):
            return ref_glob(sel, e.stream)
        return all(ref_glob(g, e.stream if k == "stream" else e.type) for k, g in sel.items())
    if type_ == "tags":
        if isinstance(sel, list):
            sel = {"any": sel}
        ok = True
        if "any" in sel:
            ok = any(t in e.tags for t in sel["any"])
        if "all" in sel:
            ok = ok and all(t in e.tags for t in sel["all"])
        return ok
    return ref_subset(sel, e.data)


def check_selector(type_: str, selector: Any, events: Sequence[Tuple[Any, Any, Any, Any]]) -> None:
    """normalize -> compile -> match each (stream, type, tags, data)."""
    try:
        norm = filters.normalize(type_, selector)
    except filters.SelectorError as e:
        if not isinstance(e.field, str) or not isinstance(e.message, str):
            _fail("SelectorError without str field/message")
        return
    if packed(norm) is None:
        _fail("a normalized selector cannot be encoded: %s" % short(norm))
    again = filters.normalize(type_, norm)
    if packed(again) != packed(norm):
        _fail("normalize is not idempotent: %s -> %s" % (short(norm), short(again)))
    k = subscription.key(type_, norm, "n")
    if not subscription.is_key(k):
        _fail("key() gave %r" % (k,))
    m = filters.compile_selector(type_, norm)
    for stream, etype, tags, data in events:
        for e in (Ev(stream, etype, tags, data),):
            r = m(e)
            if not isinstance(r, bool):
                _fail("matcher returned %r" % (r,))
            wellformed = (isinstance(stream, str) and stream and isinstance(etype, str) and etype
                          and isinstance(tags, list) and all(isinstance(t, str) for t in tags))
            if wellformed:
                try:
                    want = ref_match(type_, norm, e)
                except RecursionError:
                    continue
                if r != want:
                    _fail("matcher says %s, PROTOCOL §4 says %s: type=%s selector=%s event="
                          "(stream=%s, type=%s, tags=%s, data=%s)"
                          % (r, want, type_, short(norm), short(stream), short(etype),
                             short(tags), short(data)))
                rec = stored_record(stream, etype, tags, data)
                if rec is not None and m(rec) != r:
                    _fail("matcher differs on a stored EventRecord")
        rec = stored_record(stream if isinstance(stream, str) else "s",
                            etype if isinstance(etype, str) else "t",
                            tags if isinstance(tags, list) else [], data, corrupt=True)
        if rec is not None:
            r = m(rec)
            if not isinstance(r, bool):
                _fail("matcher returned %r on a corrupt record" % (r,))


def subscription_from_bytes(data: bytes) -> None:
    src = ByteSource(data)
    k = src.u8() % 8
    if k == 0:
        sub = src.value()
    else:
        sub = mutate(src, template_subscription(src), src.below(4))
    check_subscription(sub)


def publish_from_bytes(data: bytes) -> None:
    src = ByteSource(data)
    k = src.u8() % 8
    if k == 0:
        args = src.value()
        if not isinstance(args, dict):
            args = {"events": args}
    else:
        args = mutate(src, template_publish(src), src.below(4))
    check_publish(args)


def _events(src: ByteSource) -> List[Tuple[Any, Any, Any, Any]]:
    out = []
    for _ in range(1 + src.below(4)):
        r = src.u8() % 8
        stream = src.glob() or "s" if r else src.value()
        etype = src.glob() or "t" if r else src.value()
        tags = [src.glob() for _ in range(src.below(4))] if r else src.value()
        if src.flip(3, 4):
            data: Any = src.payload_map(0)
            for key in list(data):
                v = data[key]
                if isinstance(v, dict) and _is_opmap(v):     # turn operator maps into values
                    data[key] = src.literal(1)
        else:
            data = src.value()
        out.append((stream, etype, tags, data))
    return out


def _fill_glob(src: ByteSource, glob: Any) -> Any:
    if not isinstance(glob, str):
        return "s"
    return "".join(src.text(3) if c == "*" else (src.text(1) or "q") if c == "?" else c
                   for c in glob) or "s"


def _satisfy_value(src: ByteSource, want: Any, depth: int) -> Any:
    """A data value meant to match one selector entry (often it does; sometimes not)."""
    if depth > 70:
        return None
    if isinstance(want, dict) and want and all(isinstance(k, str) and k.startswith("$")
                                               for k in want):
        op, arg = src.choice(sorted(want.items(), key=lambda kv: str(kv[0])))
        if op in ("$in", "$nin") and isinstance(arg, list) and arg:
            return src.choice(arg)
        if op in ("$gt", "$gte", "$lt", "$lte") and _num(arg):
            return arg + src.choice([0, 1, -1, 0.5])
        if op in ("$gt", "$gte", "$lt", "$lte") and isinstance(arg, str):
            return arg + src.text(1) if src.flip() else arg
        if op == "$glob":
            return _fill_glob(src, arg)
        if op == "$ne":
            return src.literal(depth)
        return src.literal(depth)
    if isinstance(want, dict):
        return {k: _satisfy_value(src, v, depth + 1) for k, v in want.items()}
    if _num(want) and src.flip():
        return float(want) if isinstance(want, int) and abs(want) < 2 ** 53 else want
    return want


def satisfying_event(src: ByteSource, type_: str, selector: Any) -> Tuple[Any, Any, Any, Any]:
    """(stream, type, tags, data) built from the selector so that the match path runs."""
    stream, etype, tags, data = "s", "t", [], None
    try:
        if type_ == "stream" and isinstance(selector, str) and selector:
            stream = selector if selector != "$all" else src.text(4) or "s"
        elif type_ == "event_type" and isinstance(selector, str) and selector:
            etype = selector
        elif type_ == "event_pattern":
            if isinstance(selector, str):
                stream = _fill_glob(src, selector)
            elif isinstance(selector, dict):
                stream = _fill_glob(src, selector.get("stream", "*"))
                etype = _fill_glob(src, selector.get("type", "*"))
        elif type_ == "tags":
            pool = selector if isinstance(selector, list) else [
                t for k in ("any", "all") if isinstance(selector, dict)
                and isinstance(selector.get(k), list) for t in selector[k]]
            tags = [t for t in pool if isinstance(t, str) and src.flip(3, 4)]
        elif type_ == "event_payload" and isinstance(selector, dict):
            data = {k: _satisfy_value(src, v, 1) for k, v in selector.items()
                    if src.flip(7, 8)}
    except (TypeError, ValueError, RecursionError):
        pass
    return stream, etype, tags, data


def selector_from_bytes(data: bytes) -> None:
    src = ByteSource(data)
    type_ = src.choice(filters.SELECTOR_TYPES)
    if src.flip(1, 4):
        selector = src.value()
    else:
        selector = src.selector_value()
        if src.flip(1, 4):
            selector = mutate(src, selector, 1 + src.below(2))
    events = _events(src)
    events += [satisfying_event(src, type_, selector) for _ in range(1 + src.below(3))]
    check_selector(type_, selector, events)


BYTE_TARGETS: Dict[str, Callable[[bytes], None]] = {
    "decoder": decoder_from_bytes,
    "subscription": subscription_from_bytes,
    "publish": publish_from_bytes,
    "selector": selector_from_bytes,
}


# =========================================================================== socket fuzzing

KNOWN_CODES = set(E.CODES)
OPS = ("ping", "start", "stop", "update", "list", "status", "publish", "attach", "parked",
       "metrics")
UNKNOWN_KEY = "0123456789abcdef"


class Raw:
    """Already-encoded msgpack bytes inside a request (deep nesting beyond packb's limit, big
    strings encoded once). `proxy` is an equivalent Python value for validity checks;
    `undecodable` marks nesting beyond what msgpack decodes (the frame is a bad_frame)."""
    __slots__ = ("data", "label", "proxy", "undecodable")

    def __init__(self, data: bytes, label: str, proxy: Any = None,
                 undecodable: bool = False) -> None:
        self.data = data
        self.label = label
        self.proxy = proxy
        self.undecodable = undecodable

    def __repr__(self) -> str:
        return "Raw(%s, %d bytes)" % (self.label, len(self.data))


#: msgpack-python refuses to decode nesting deeper than this (its unpack stack)
MSGPACK_MAX_DEPTH = 1024


def deep_raw(depth: int, kind: str = "list") -> Raw:
    undecodable = depth + 1 > MSGPACK_MAX_DEPTH
    proxy = None if undecodable else deep(depth, kind, 1)
    if kind == "list":
        return Raw(b"\x91" * depth + b"\x01", "list nested %d" % depth, proxy, undecodable)
    return Raw(b"\x81\xa1a" * depth + b"\x01", "map nested %d" % depth, proxy, undecodable)


def big_str(n: int) -> Raw:
    """A str of n bytes, encoded once (cheap to repeat)."""
    return Raw(msgpack.packb("x" * n), "str of %d bytes" % n, "x" * n)


def proxy(v: Any) -> Any:
    return v.proxy if isinstance(v, Raw) else v


def is_wrong(f: "Field", v: Any) -> bool:
    """True when `v` must be refused at field `f` (an undecodable value always is)."""
    if isinstance(v, Raw) and v.undecodable:
        return True
    return f.valid(proxy(v)) is False


def pack_value(v: Any) -> bytes:
    """msgpack encoding that also understands Raw pieces."""
    if isinstance(v, Raw):
        return v.data
    if isinstance(v, dict):
        return msgpack.Packer(use_bin_type=True).pack_map_header(len(v)) + b"".join(
            pack_value(k) + pack_value(x) for k, x in v.items())
    if isinstance(v, list):
        return msgpack.Packer(use_bin_type=True).pack_array_header(len(v)) + b"".join(
            pack_value(x) for x in v)
    return msgpack.packb(v, use_bin_type=True)


def frame(obj: Any) -> bytes:
    body = pack_value(obj)
    return HEADER.pack(len(body)) + body


# ---- field specs: what is valid for each field of each op (from PROTOCOL.md) ------------

def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and not isinstance(v, Raw)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


MAYBE = None    # a value whose validity the protocol leaves open: never sent as "must fail"


def v_name(v: Any) -> Optional[bool]:
    return isinstance(v, str) and 1 <= len(v) <= 200


def v_type(v: Any) -> Optional[bool]:
    return isinstance(v, str) and v in filters.SELECTOR_TYPES


def v_selector_str(v: Any) -> Optional[bool]:
    return isinstance(v, str) and len(v) > 0


def v_subscriber(v: Any) -> Optional[bool]:
    if v is None:
        return True
    if not isinstance(v, str) or not v.startswith("unix:/"):
        return False
    p = v[5:]
    return MAYBE if len(p.encode()) >= 100 or "\0" in p else True


def v_pool_size(v: Any, nil_ok: bool = True) -> Optional[bool]:
    if v is None:
        return True if nil_ok else MAYBE
    return _int(v) and 1 <= v <= 64


def v_start_from(v: Any) -> Optional[bool]:
    return v is None or v in ("origin", "now") or (_int(v) and v >= 1)


def v_options(v: Any) -> Optional[bool]:
    return MAYBE if v is None else isinstance(v, dict) and not v


def _finite_pos(v: Any) -> bool:
    return _number(v) and v > 0 and not math.isinf(v) and not math.isnan(v)


OPTION_VALID: Dict[str, Callable[[Any], Optional[bool]]] = {
    "strategy": lambda v: MAYBE if v is None else isinstance(v, str) and v in subscription.STRATEGIES,
    "batch_size": lambda v: MAYBE if v is None else _int(v) and 1 <= v <= 10000,
    "max_in_flight": lambda v: MAYBE if v is None else _int(v) and v >= 1,
    "ack_timeout": lambda v: MAYBE if v is None else _finite_pos(v),
    "max_retries": lambda v: MAYBE if v is None else _int(v) and v >= 0,
    "retry_backoff": lambda v: MAYBE if v is None else (
        isinstance(v, list) and len(v) == 2 and all(_finite_pos(x) for x in v) and v[0] <= v[1]),
    "max_restarts": lambda v: MAYBE if v is None else _int(v) and v >= 0,
    "restart_period": lambda v: MAYBE if v is None else _finite_pos(v),
    "ephemeral": lambda v: MAYBE if v is None else isinstance(v, bool),
}


def v_bool_nil(v: Any) -> Optional[bool]:
    return v is None or isinstance(v, bool)


def v_drain(v: Any) -> Optional[bool]:
    if v is None:
        return True
    if _number(v) and math.isinf(v) and v > 0:
        return MAYBE
    return _number(v) and v >= 0 and not math.isnan(v)


def v_text(limit: int, nil_ok: bool = False) -> Callable[[Any], Optional[bool]]:
    return lambda v: (nil_ok and v is None) or (isinstance(v, str) and 1 <= len(v) <= limit)


def v_map_nil(v: Any) -> Optional[bool]:
    return v is None or isinstance(v, dict)


def v_tags(v: Any) -> Optional[bool]:
    return v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v))


def v_str_item(v: Any) -> Optional[bool]:
    return isinstance(v, str)


def v_action(v: Any) -> Optional[bool]:
    return v is None or (isinstance(v, str) and v in ("list", "replay", "purge"))


def v_limit(v: Any) -> Optional[bool]:
    # the protocol gives no bounds; the daemon documents 1..100000 in its error message
    if v is None:
        return True
    if _int(v):
        return MAYBE if v < 1 or v > 100000 else True
    return False


def v_expected_version(v: Any) -> Optional[bool]:
    return v is None or (_int(v) and v >= -1)


def v_events(v: Any) -> Optional[bool]:
    return MAYBE if isinstance(v, list) and v else False


def v_never(v: Any) -> Optional[bool]:
    return False


class Field:
    """One corruptible place in a request: a path into args, what is valid there, and the
    answer a wrong value must get (codes, details.field prefix)."""

    def __init__(self, path: Tuple[Any, ...], valid: Callable[[Any], Optional[bool]],
                 codes: Sequence[str] = (E.INVALID,), field: Optional[str] = "",
                 code_for: Optional[Callable[[Any], Optional[str]]] = None) -> None:
        self.path = path
        self.valid = valid
        self.codes = tuple(codes)
        self.field = ".".join(str(p) for p in path) if field == "" else field
        self.code_for = code_for

    def __repr__(self) -> str:
        return "Field(%s)" % ".".join(map(str, self.path))


def key_field(path: Tuple[Any, ...] = ("key",)) -> Field:
    # a malformed key is not_found; a nil key may also be "no key given": invalid "key"
    return Field(path, lambda v: False, (E.NOT_FOUND, E.INVALID), None)


class Ctx:
    """What the socket fuzzer knows about its dedicated daemon."""

    def __init__(self, key_sub: str, key_att: str, head: int, sub_triple: dict) -> None:
        self.key_sub = key_sub          # a running pool with a unix: subscriber
        self.key_att = key_att          # a running pool for attached consumers
        self.head = head
        self.sub_triple = sub_triple
        self.nonce = 0

    def fresh(self, prefix: str) -> str:
        # a fixed width: a case's sizes (and so hypothesis's draws over its bytes) must not
        # change when the counter gains a digit, or hypothesis reports a flaky strategy
        self.nonce += 1
        return "%s-%d-%08d" % (prefix, os.getpid(), self.nonce)


def base_request(op: str, ctx: Ctx, keyed: str = "sub") -> Tuple[dict, List[Field]]:
    """A VALID args map for `op` and the fields that may be corrupted in it."""
    key = ctx.key_sub if keyed == "sub" else ctx.key_att
    if op == "start":
        sub = {"name": ctx.fresh("fz-start"), "type": "event_type", "selector": "fz.never",
               "subscriber": None, "pool_size": 1, "start_from": "now",
               "options": {name: val for name, val in (
                   ("strategy", "pinned"), ("batch_size", 8), ("max_in_flight", 16),
                   ("ack_timeout", 5.0), ("max_retries", 3), ("retry_backoff", [0.1, 1.0]),
                   ("max_restarts", 5), ("restart_period", 10.0), ("ephemeral", False))}}
        fields = [Field(("subscription",), lambda v: MAYBE if isinstance(v, dict) else False),
                  Field(("subscription", "name"), v_name),
                  Field(("subscription", "type"), v_type),
                  Field(("subscription", "selector"), v_selector_str),
                  Field(("subscription", "subscriber"), v_subscriber),
                  Field(("subscription", "pool_size"), v_pool_size),
                  Field(("subscription", "start_from"), v_start_from),
                  Field(("subscription", "options"), v_options)]
        fields += [Field(("subscription", "options", n), f) for n, f in OPTION_VALID.items()]
        return {"subscription": sub}, fields
    if op == "stop":
        return ({"key": key, "delete": False, "drain_timeout": 1.0},
                [key_field(), Field(("delete",), v_bool_nil),
                 Field(("drain_timeout",), v_drain)])
    if op == "update":
        args = {"key": key, "pool_size": 1, "options": {"batch_size": 8}}
        fields = [key_field(), Field(("pool_size",), lambda v: v_pool_size(v, nil_ok=False)),
                  Field(("subscriber",), lambda v: MAYBE if v is None else v_subscriber(v)),
                  Field(("options",), lambda v: MAYBE if v is None else isinstance(v, dict)),
                  Field(("checkpoint",), lambda v: MAYBE if v is None else (
                      _int(v) and 0 <= v <= ctx.head))]
        fields += [Field(("options", n), f) for n, f in OPTION_VALID.items()]
        return args, fields
    if op == "status":
        return {"key": key}, [key_field()]
    if op == "list":
        return {}, []
    if op == "publish":
        stream = ctx.fresh("fz-pub")
        ev = {"stream": stream, "type": "fz.t", "data": {"n": 1}, "metadata": {"m": 1},
              "tags": ["t1"], "id": ctx.fresh("fz-id")}
        fields = [Field(("events",), v_events),
                  Field(("events", 0), lambda v: MAYBE if isinstance(v, dict) else False),
                  Field(("events", 0, "stream"), v_text(256)),
                  Field(("events", 0, "type"), v_text(256)),
                  Field(("events", 0, "id"), v_text(128, nil_ok=True)),
                  Field(("events", 0, "metadata"), v_map_nil),
                  Field(("events", 0, "tags"), v_tags),
                  Field(("events", 0, "tags", 0), v_str_item),
                  Field(("expected_version",), v_expected_version,
                        (E.INVALID, E.CONFLICT), "expected_version",
                        lambda v: E.CONFLICT if _int(v) and v >= 0 else E.INVALID)]
        return {"events": [ev]}, fields
    if op == "attach":
        return {"key": ctx.key_att}, [key_field()]
    if op == "parked":
        return ({"key": key, "action": "list", "limit": 10},
                [key_field(), Field(("action",), v_action), Field(("limit",), v_limit)])
    return {}, []       # ping, metrics: no fields


#: ops whose valid form changes the daemon: a case for them must be made to fail
MUTATING = {"start", "stop", "update", "publish", "attach", "parked"}


def set_path(obj: Any, path: Tuple[Any, ...], value: Any) -> None:
    for p in path[:-1]:
        obj = obj[p]
    obj[path[-1]] = value


def wrong_values(include_big: bool = True) -> List[Any]:
    """A fixed list of values of every msgpack type, plus huge and deeply nested ones."""
    vals: List[Any] = [None, True, False, 0, 1, -1, 65, 2 ** 64 - 1, -2 ** 63, 0.0, 1.5, -0.5,
                       float("nan"), float("inf"), float("-inf"), "", "x", "origin", "pinned",
                       "unix:relative", "y" * 300, b"", b"\xff", [], [1], ["a", "b"], {},
                       {"a": 1}, {1: 2}, msgpack.ExtType(5, b"x"), msgpack.Timestamp(1, 0),
                       deep_raw(200), deep_raw(900), deep_raw(200, "map"), deep_raw(1000)]
    if include_big:
        vals += [big_str(2 * 1024 * 1024), deep_raw(3000)]
    return vals


def sweep_cases(ctx: Ctx, include_big: bool = True) -> List[dict]:
    """Every field of every op, with every wrong value of wrong_values() (deterministic)."""
    cases = []
    for op in OPS:
        _, fields = base_request(op, ctx)
        for f in fields:
            for v in wrong_values(include_big):
                if is_wrong(f, v):
                    args, fields2 = base_request(op, ctx)
                    try:
                        set_path(args, f.path, v)
                    except (KeyError, IndexError, TypeError):
                        continue
                    cases.append(request_case(op, args, [(f, v)]))
        # an unknown argument
        args, _ = base_request(op, ctx)
        if op not in ("ping", "metrics"):
            args["fz_unknown"] = 1
            cases.append({"kind": "requests", "reqs": [
                {"id": 7, "op": op, "args": args, "must_fail": True, "codes": (E.INVALID,),
                 "field": "fz_unknown", "why": "unknown argument"}]})
    # request-level
    for v in wrong_values(include_big):
        pv = proxy(v)
        bad = isinstance(v, Raw) and v.undecodable
        if bad or not (_int(pv) and 0 <= pv < 2 ** 64):
            cases.append({"kind": "requests", "reqs": [
                {"raw": {"id": v, "op": "ping"}, "id": 0, "must_fail": True,
                 "codes": (E.INVALID,), "field": "id", "why": "bad id %s" % short(v, 40),
                 "expect_frame_error": bad}]})
        if bad or not isinstance(pv, str):
            cases.append({"kind": "requests", "reqs": [
                {"raw": {"id": 3, "op": v}, "id": 3, "must_fail": True, "codes": (E.INVALID,),
                 "field": "op", "why": "bad op type", "expect_frame_error": bad}]})
        if bad or (pv is not None and not isinstance(pv, dict)):
            cases.append({"kind": "requests", "reqs": [
                {"raw": {"id": 4, "op": "start", "args": v}, "id": 4, "must_fail": True,
                 "codes": (E.INVALID,), "field": "args", "why": "bad args",
                 "expect_frame_error": bad}]})
    for name in ["", "PING", "pings", "start ", "\x00", "x" * 5000, "événement", "$ping"]:
        cases.append({"kind": "requests", "reqs": [
            {"id": 9, "op": name, "args": {}, "must_fail": True, "codes": (E.UNKNOWN_OP,),
             "field": None, "why": "unknown op"}]})
    # attach to a pool with a subscriber is invalid at "key"
    cases.append({"kind": "requests", "reqs": [
        {"id": 5, "op": "attach", "args": {"key": ctx.key_sub}, "must_fail": True,
         "codes": (E.INVALID,), "field": "key", "why": "attach to a subscriber pool"}]})
    # expected_version with events in two streams
    a, _ = base_request("publish", ctx)
    b, _ = base_request("publish", ctx)
    a["events"].append(b["events"][0])
    a["expected_version"] = -1
    cases.append({"kind": "requests", "reqs": [
        {"id": 6, "op": "publish", "args": a, "must_fail": True, "codes": (E.INVALID,),
         "field": "expected_version", "why": "expected_version over two streams"}]})
    # an event over max_event_bytes; a publish of max_publish_events + 1 events
    a, _ = base_request("publish", ctx)
    a["events"][0]["data"] = big_str(1024 * 1024 + 10)
    cases.append({"kind": "requests", "reqs": [
        {"id": 8, "op": "publish", "args": a, "must_fail": True, "codes": (E.INVALID,),
         "field": "events.0", "why": "event over max_event_bytes"}]})
    a, _ = base_request("publish", ctx)
    a["events"] = [{"stream": "s", "type": "t"}] * 10001
    cases.append({"kind": "requests", "reqs": [
        {"id": 10, "op": "publish", "args": a, "must_fail": True, "codes": (E.INVALID,),
         "field": "events", "why": "10001 events"}]})
    # unknown subscription / option / event fields
    for op, path in (("start", ("subscription", "fz_field")),
                     ("start", ("subscription", "options", "fz_option")),
                     ("update", ("options", "fz_option")),
                     ("publish", ("events", 0, "fz_field"))):
        a, _ = base_request(op, ctx)
        set_path(a, path, 1)
        cases.append({"kind": "requests", "reqs": [
            {"id": 11, "op": op, "args": a, "must_fail": True, "codes": (E.INVALID,),
             "field": ".".join(map(str, path)), "why": "unknown field"}]})
    # framing
    cases += [{"kind": "raw", "data": HEADER.pack(0), "expect": "error", "code": E.BAD_FRAME},
              {"kind": "raw", "data": HEADER.pack(MAX_FRAME + 1), "expect": "error",
               "code": E.FRAME_TOO_LARGE},
              {"kind": "raw", "data": HEADER.pack(0xFFFFFFFF) + b"abc", "expect": "error",
               "code": E.FRAME_TOO_LARGE},
              # answered from the header alone: no EOF, no body needed
              {"kind": "raw", "data": HEADER.pack(MAX_FRAME + 1), "expect": "error",
               "code": E.FRAME_TOO_LARGE, "half_close": False},
              {"kind": "raw", "data": HEADER.pack(0) + frame({"id": 1, "op": "ping"}),
               "expect": "error", "code": E.BAD_FRAME, "half_close": False},
              {"kind": "raw", "data": HEADER.pack(1) + b"\xc1", "expect": "error",
               "code": E.BAD_FRAME},
              {"kind": "raw", "data": frame([1, 2]), "expect": "error", "code": E.BAD_FRAME},
              {"kind": "raw", "data": HEADER.pack(2) + b"\x80\x80", "expect": "error",
               "code": E.BAD_FRAME},
              {"kind": "raw", "data": HEADER.pack(4) + b"\x81\xa1\xff\x01", "expect": "error",
               "code": E.BAD_FRAME},
              {"kind": "raw", "data": frame({"id": 1, "op": "ping"})[:7], "expect": "nothing"},
              {"kind": "raw", "data": HEADER.pack(100) + b"\x80" * 50, "expect": "nothing"},
              {"kind": "raw", "data": b"\x00\x00", "expect": "nothing"}]
    deep_frame = HEADER.pack(len(deep_raw(100000).data)) + deep_raw(100000).data
    cases.append({"kind": "raw", "data": deep_frame, "expect": "error", "code": E.BAD_FRAME})
    # a huge unknown name is answered in a response that must still fit in one frame
    big = "k" * (4 * 1024 * 1024 + 512 * 1024)
    for op, path, field in (("list", (big,), None),
                            ("start", ("subscription", big), "subscription"),
                            ("start", ("subscription", "options", big), "subscription.options"),
                            ("publish", ("events", 0, big), "events.0")):
        a, _ = base_request(op, ctx)
        set_path(a, path, 1)
        cases.append({"kind": "requests", "reqs": [
            {"id": 12, "op": op, "args": a, "must_fail": True, "codes": (E.INVALID,),
             "field": field, "why": "4.5 MiB unknown name at %s" % (field or "args")}]})
    a, _ = base_request("start", ctx)
    a["subscription"].update({"type": "event_pattern", "selector": {big: "x"}})
    cases.append({"kind": "requests", "reqs": [
        {"id": 13, "op": "start", "args": a, "must_fail": True, "codes": (E.INVALID,),
         "field": "subscription.selector", "why": "4.5 MiB unknown event_pattern key"}]})
    return cases


def request_case(op: str, args: dict, corrupted: List[Tuple[Field, Any]], rid: int = 1) -> dict:
    codes = set()
    fields = []
    for f, v in corrupted:
        c = f.code_for(proxy(v)) if f.code_for else None
        codes.update([c] if c else f.codes)
        fields.append(f.field)
    undecodable = any(isinstance(v, Raw) and v.undecodable for _, v in corrupted)
    return {"kind": "requests", "reqs": [
        {"id": rid, "op": op, "args": args, "must_fail": True, "codes": tuple(sorted(codes)),
         "expect_frame_error": undecodable,
         "fields": fields, "why": "wrong %s" % ", ".join(
             "%s=%s" % (f.field or ".".join(map(str, f.path)), short(v, 60))
             for f, v in corrupted)}]}


# ---- the fuzzer ------------------------------------------------------------------------

def _is_frame_error(r: Any) -> bool:
    return (isinstance(r, dict) and r.get("id") == 0 and r.get("ok") is False
            and isinstance(r.get("error"), dict) and r["error"].get("code") in FRAME_CODES)


class SocketFuzzer:
    """Runs socket cases against one dedicated daemon and collects findings."""

    def __init__(self, socket_path: str, ctx: Ctx, daemon_alive: Callable[[], bool],
                 io_timeout: float = 10.0) -> None:
        from emitterd.client import Client
        self.path = socket_path
        self.ctx = ctx
        self.daemon_alive = daemon_alive
        self.io_timeout = io_timeout
        self.probe = Client(socket_path, timeout=10.0)
        self.findings: List[dict] = []
        self.cases = 0
        self.by_kind: Dict[str, int] = {}
        self.responses = 0
        self.codes: Dict[str, int] = {}
        self.idle: List[socket.socket] = []

    def open_idle(self, n: int = 8) -> None:
        """Slow clients: connections holding a partial frame open while the fuzzing runs."""
        partial = [HEADER.pack(100) + b"\x82" * 10, b"\x00\x00", frame({"id": 1, "op": "ping"})[:-1],
                   HEADER.pack(MAX_FRAME) + b"\x80" * 1000]
        for i in range(n):
            s = self._connect()
            s.setblocking(True)
            s.sendall(partial[i % len(partial)])
            s.setblocking(False)
            self.idle.append(s)

    def check_idle(self) -> None:
        """Nothing may be answered on a partial frame; the connections stay usable."""
        for s in self.idle:
            try:
                data = s.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                self.finding("a slow client's connection failed: %r" % (e,), "idle connection")
                continue
            what = "closed" if not data else "answered %r" % (data[:80],)
            self.finding("a connection holding a partial frame was %s" % what,
                         "idle connection")

    def close(self) -> None:
        for s in self.idle:
            s.close()
        self.idle = []
        self.probe.close()

    def finding(self, what: str, case: Any, extra: str = "") -> None:
        key = what.split(":")[0]
        self.findings.append({"what": what, "case": short(case, 600), "extra": extra[:2000],
                              "key": key})

    # -- snapshot
    def snapshot(self) -> dict:
        pools = self.probe.list()["subscriptions"]
        head = self.probe.ping()["head"]
        return {"head": head, "pools": sorted(
            (p["key"], p["state"], packed(p["subscription"]),
             tuple(sorted((w["index"], w["pid"], w["state"]) for w in p["workers"])))
            for p in pools)}

    # -- one case
    def run_case(self, case: dict) -> None:
        self.cases += 1
        self.by_kind[case["kind"]] = self.by_kind.get(case["kind"], 0) + 1
        try:
            if case["kind"] == "requests":
                self._run_requests(case)
            else:
                self._run_raw(case)
        except FuzzFailure as e:
            self.finding(str(e), case)
        except Exception:  # noqa: BLE001
            # reported as a finding with its traceback: raised, hypothesis would replay the
            # case with fresh names and report only that the replay drew differently
            self.finding("the case raised: %s" % traceback.format_exc(), case)
        # the daemon still answers ping on another connection
        try:
            self.probe.ping()
        except Exception as e:  # noqa: BLE001
            self.finding("ping failed after the case: %r" % (e,), case,
                         "daemon alive: %s" % self.daemon_alive())
            self.probe.close()
            if not self.daemon_alive():
                raise FuzzFailure("the daemon died; last case: %s" % short(case, 600))

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.io_timeout)
        s.connect(self.path)
        s.setblocking(False)
        return s

    def _exchange(self, data: bytes, want: Optional[int], half_close: bool) -> Tuple[List[Tuple[int, dict]], bool]:
        """Send data (reading meanwhile); collect frames until `want` responses, EOF or a
        framing error + EOF. Returns ([(length, frame)], closed_by_daemon)."""
        s = self._connect()
        dec = framing.Decoder(0xFFFFFFFF)
        frames: List[Tuple[int, dict]] = []
        view = memoryview(data)
        deadline = time.monotonic() + self.io_timeout + len(data) / 20e6
        closed = False
        sent_all = not view
        try:
            if sent_all and half_close:
                s.shutdown(socket.SHUT_WR)
            while True:
                if want is not None and len(frames) >= want and sent_all and not (
                        frames and _is_frame_error(frames[-1][1])):
                    break       # after a framing error, read on until the daemon closes
                now = time.monotonic()
                if now > deadline:
                    raise FuzzFailure("no answer: %d of %s responses within %.0fs (sent %d of "
                                      "%d bytes)" % (len(frames), want, self.io_timeout,
                                                     len(data) - len(view), len(data)))
                r, w, _ = select.select([s], [s] if not sent_all else [], [], deadline - now)
                if w and not sent_all:
                    try:
                        n = s.send(view[:1 << 20])
                        view = view[n:]
                    except (BlockingIOError, InterruptedError):
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        sent_all = True     # the daemon closed; read what it said
                    if not view:
                        sent_all = True
                        if half_close:
                            try:
                                s.shutdown(socket.SHUT_WR)
                            except OSError:
                                pass
                if r:
                    try:
                        chunk = s.recv(1 << 20)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        closed = True
                        break
                    dec.feed(chunk)
                    while True:
                        try:
                            payload = dec.next_payload()
                        except framing.FrameError as e:
                            raise FuzzFailure("undecodable response frame: %s" % e.message)
                        if payload is None:
                            break
                        try:
                            m = framing.decode_payload(payload)
                        except framing.FrameError as e:
                            raise FuzzFailure("undecodable response: %s" % e.message)
                        frames.append((len(payload), m))
        finally:
            s.close()
        return frames, closed

    def _check_response(self, length: int, r: Any, want_id: Optional[int]) -> None:
        self.responses += 1
        if length > MAX_FRAME:
            raise FuzzFailure("response frame of %d bytes exceeds max_frame_bytes %d"
                              % (length, MAX_FRAME))
        if not isinstance(r, dict) or "id" not in r or "ok" not in r:
            raise FuzzFailure("malformed response: %s" % short(r))
        if not isinstance(r["ok"], bool) or not _int(r["id"]) or r["id"] < 0:
            raise FuzzFailure("malformed response id/ok: %s" % short(r))
        if want_id is not None and r["id"] != want_id:
            raise FuzzFailure("response id %r, expected %r" % (r["id"], want_id))
        if r["ok"]:
            if "result" not in r or "error" in r or set(r) != {"id", "ok", "result"}:
                raise FuzzFailure("malformed success response keys %s" % sorted(r))
            self.codes["ok"] = self.codes.get("ok", 0) + 1
            return
        err = r.get("error")
        if "result" in r or set(r) != {"id", "ok", "error"} or not isinstance(err, dict):
            raise FuzzFailure("malformed error response: %s" % short(r))
        if err.get("code") not in KNOWN_CODES:
            raise FuzzFailure("unknown error code %r" % (err.get("code"),))
        if not isinstance(err.get("message"), str) or not set(err) <= {"code", "message",
                                                                        "details"}:
            raise FuzzFailure("malformed error map: %s" % short(err))
        self.codes[err["code"]] = self.codes.get(err["code"], 0) + 1
        if err["code"] == E.INTERNAL:
            raise FuzzFailure("internal error: %s" % err.get("message"))

    def _run_requests(self, case: dict) -> None:
        reqs = case["reqs"]
        data = b"".join(frame(q["raw"] if "raw" in q else
                              {"id": q["id"], "op": q["op"], "args": q["args"]})
                        for q in reqs)
        frames, closed = self._exchange(data, len(reqs), half_close=False)
        for i, q in enumerate(reqs):
            if i >= len(frames):
                # a framing error (id 0) ends the connection early: allowed only for one
                if frames and frames[-1][1].get("id") == 0 and frames[-1][1].get("ok") is False \
                        and (frames[-1][1].get("error") or {}).get("code") in FRAME_CODES:
                    return
                raise FuzzFailure("connection closed after %d of %d responses"
                                  % (len(frames), len(reqs)))
            length, r = frames[i]
            err = r.get("error") if isinstance(r, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            if r.get("id") == 0 and code in FRAME_CODES:
                self._check_response(length, r, 0)
                if q.get("expect_frame_error") and code == E.BAD_FRAME:
                    if len(frames) > i + 1:
                        raise FuzzFailure("responses after a framing error")
                    if not closed:
                        raise FuzzFailure("connection left open after a framing error")
                    return
                raise FuzzFailure("framing error %s for a well-formed request (%s)"
                                  % (code, q.get("why")))
            if q.get("expect_frame_error"):
                raise FuzzFailure("no bad_frame for nesting msgpack cannot decode (%s): %s"
                                  % (q.get("why"), short(r, 200)))
            self._check_response(length, r, q["id"])
            if q.get("must_fail"):
                if r["ok"]:
                    raise FuzzFailure("accepted: %s (op %s) -> %s" % (q.get("why"), q.get("op"),
                                                                    short(r.get("result"), 200)))
                codes = q.get("codes")
                if codes and code not in codes:
                    raise FuzzFailure("wrong code: %s (op %s) answered %s (expected %s): %s"
                                      % (q.get("why"), q.get("op"), code, "/".join(codes),
                                         short(err.get("message"), 200)))
                want_fields = q.get("fields") or ([q["field"]] if q.get("field") else [])
                if code == E.INVALID and want_fields and all(w for w in want_fields):
                    got = (err.get("details") or {}).get("field") if isinstance(
                        err.get("details"), dict) else None
                    if not isinstance(got, str) or not any(
                            got == w or got.startswith(w + ".") for w in want_fields):
                        raise FuzzFailure("wrong field: %s (op %s) answered invalid at %r "
                                          "(expected %s)" % (q.get("why"), q.get("op"),
                                                             short(got, 80),
                                                             " or ".join(want_fields)))

    def _run_raw(self, case: dict) -> None:
        half_close = case.get("half_close", True)
        frames, closed = self._exchange(case["data"], None if half_close else 1, half_close)
        expect = case.get("expect", "any")
        for i, (length, r) in enumerate(frames):
            self._check_response(length, r, None)
            err = r.get("error") or {}
            if r.get("id") == 0 and err.get("code") in FRAME_CODES and i != len(frames) - 1:
                raise FuzzFailure("responses after a framing error")
        if expect == "nothing" and frames:
            raise FuzzFailure("answers to a truncated frame: %s" % short(frames[0][1]))
        if expect == "error":
            if not frames:
                raise FuzzFailure("no %s error for a bad frame" % case.get("code"))
            last = frames[-1][1]
            if last.get("id") != 0 or (last.get("error") or {}).get("code") != case.get("code"):
                raise FuzzFailure("expected %s (id 0), got %s" % (case.get("code"),
                                                                 short(last, 200)))
        if not closed:
            raise FuzzFailure("connection not closed after EOF")

    def summary(self) -> dict:
        return {"cases": self.cases, "by_kind": dict(self.by_kind), "responses": self.responses,
                "codes": dict(self.codes), "findings": len(self.findings)}


def setup_ctx(client: Any, root: str) -> Ctx:
    """Create the fuzzer's fixed pools on a fresh daemon and publish a few events."""
    # no event matches fz-sub, so nothing is ever in flight (a stop need not drain)
    sub = client.start({"name": "fz-sub", "type": "stream", "selector": "fz-none",
                        "subscriber": "unix:" + os.path.join(root, "nobody.sock"),
                        "start_from": "origin"})
    att = client.start({"name": "fz-att", "type": "event_type", "selector": "fz.att",
                        "start_from": "origin"})
    res = client.publish([{"stream": "fz-1", "type": "fz.att", "data": {"i": i}}
                          for i in range(3)])
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pools = client.list()["subscriptions"]
        if all(w["state"] == "ready" for p in pools for w in p["workers"]) and all(
                p["workers"] for p in pools):
            break
        time.sleep(0.05)
    return Ctx(sub["key"], att["key"], res["positions"][-1],
               {"name": "fz-sub", "type": "stream", "selector": "fz-none"})


# ---- hypothesis strategies for socket cases ----------------------------------------------

def hypothesis_strategies(ctx: Ctx) -> Any:
    """A hypothesis strategy of socket cases (imported lazily: hypothesis is a test extra)."""
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(),
                        st.integers(min_value=-2 ** 63, max_value=2 ** 64 - 1),
                        st.floats(allow_nan=True, allow_infinity=True),
                        st.text(max_size=20), st.binary(max_size=20),
                        st.sampled_from(STRINGS), st.sampled_from(INTS),
                        st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)))
    keys = st.one_of(st.text(max_size=8), st.sampled_from(KEYS), st.integers(-5, 5),
                     st.none(), st.booleans())
    values = st.recursive(scalars, lambda ch: st.one_of(
        st.lists(ch, max_size=4), st.dictionaries(keys, ch, max_size=4)), max_leaves=12)
    specials = st.sampled_from([deep_raw(64), deep_raw(500), deep_raw(950), deep_raw(1100),
                                deep_raw(600, "map"), big_str(70_000), big_str(300)])
    wrong = st.one_of(values, values, values, specials)

    @st.composite
    def corrupted(draw: Any) -> dict:
        op = draw(st.sampled_from([o for o in OPS if o not in ("ping", "metrics", "list")]))
        args, fields = base_request(op, ctx, draw(st.sampled_from(["sub", "att"])))
        n = draw(st.integers(1, min(3, len(fields))))
        chosen = draw(st.lists(st.sampled_from(fields), min_size=n, max_size=n, unique_by=repr))
        done = []
        for f in chosen:
            v = draw(wrong.filter(lambda x, f=f: is_wrong(f, x)))
            try:
                set_path(args, f.path, v)
            except (KeyError, IndexError, TypeError):
                continue        # an earlier corruption replaced the parent
            done.append((f, v))
        if not done:
            args["fz_unknown"] = 1
            return {"kind": "requests", "reqs": [
                {"id": 1, "op": op, "args": args, "must_fail": True, "codes": (E.INVALID,),
                 "field": "fz_unknown", "why": "unknown argument"}]}
        # a later corruption may have replaced an earlier one's parent: keep the live ones
        live = []
        for f, v in done:
            try:
                cur: Any = args
                for p in f.path:
                    cur = cur[p]
                if cur is v:
                    live.append((f, v))
            except (KeyError, IndexError, TypeError):
                pass
        return request_case(op, args, live or done, rid=draw(st.integers(1, 2 ** 64 - 1)))

    @st.composite
    def random_args(draw: Any) -> dict:
        op = draw(st.sampled_from(OPS))
        args = draw(st.dictionaries(st.text(min_size=1, max_size=8).filter(
            lambda k: k not in ("key", "subscription", "events", "action", "limit", "delete",
                                "drain_timeout", "pool_size", "subscriber", "options",
                                "checkpoint", "expected_version")), values, max_size=3))
        must_fail = op in MUTATING or (op in ("list", "status") and bool(args)) \
            or op == "status"
        return {"kind": "requests", "reqs": [
            {"id": draw(st.integers(0, 2 ** 64 - 1)), "op": op, "args": args,
             "must_fail": must_fail, "codes": None, "why": "random args"}]}

    @st.composite
    def random_op(draw: Any) -> dict:
        op = draw(st.text(max_size=30).filter(lambda o: o not in OPS))
        return {"kind": "requests", "reqs": [
            {"id": draw(st.integers(0, 2 ** 64 - 1)), "op": op, "args": draw(values),
             "must_fail": True, "codes": None, "why": "random op name"}]}

    @st.composite
    def bad_envelope(draw: Any) -> dict:
        m = draw(st.dictionaries(keys, values, max_size=4))
        rid = m.get("id")
        ok_id = _int(rid) and 0 <= rid < 2 ** 64
        op = m.get("op")
        if ok_id and isinstance(op, str) and op in OPS and (m.get("args") is None or
                                                            isinstance(m.get("args"), dict)):
            m["op"] = draw(st.sampled_from([1, None, b"ping", ["ping"]]))
        return {"kind": "requests", "reqs": [
            {"raw": m, "id": rid if ok_id else 0, "must_fail": True, "codes": None,
             "why": "bad envelope"}]}

    @st.composite
    def pipelined(draw: Any) -> dict:
        cases = draw(st.lists(st.one_of(corrupted(), random_op()), min_size=2, max_size=4))
        reqs = []
        for i, c in enumerate(cases):
            q = dict(c["reqs"][0])
            q["id"] = i + 1
            reqs.append(q)
        return {"kind": "requests", "reqs": reqs}

    @st.composite
    def raw_bytes(draw: Any) -> dict:
        return {"kind": "raw", "data": draw(st.binary(max_size=300)), "expect": "any"}

    @st.composite
    def truncated(draw: Any) -> dict:
        c = draw(st.one_of(corrupted(), random_op()))
        q = c["reqs"][0]
        data = frame(q["raw"] if "raw" in q else {"id": q["id"], "op": q["op"],
                                                   "args": q["args"]})
        cut = draw(st.integers(0, len(data) - 1))
        return {"kind": "raw", "data": data[:cut], "expect": "nothing"}

    @st.composite
    def mangled(draw: Any) -> dict:
        """A valid-looking frame with its header or body bytes changed."""
        c = draw(corrupted())
        q = c["reqs"][0]
        data = bytearray(frame({"id": q["id"], "op": q["op"], "args": q["args"]}))
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        return {"kind": "raw", "data": bytes(data), "expect": "any"}

    return st.one_of(corrupted(), corrupted(), corrupted(), random_args(), random_op(),
                     bad_envelope(), pipelined(), raw_bytes(), truncated(), mangled())


# =========================================================================== atheris runner

def _finding_record(target: str, data: bytes, exc: BaseException) -> dict:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for fr in reversed(frames):
        if "emitterd" in fr.filename or "fuzz_targets" in fr.filename:
            where = "%s:%d" % (os.path.basename(fr.filename), fr.lineno)
            break
    kind = "property" if isinstance(exc, FuzzFailure) else "crash"
    sig = "%s %s %s" % (kind, type(exc).__name__, where if kind == "crash" else
                        str(exc).split(":")[0][:80])
    return {"target": target, "kind": kind, "signature": sig, "error": short(str(exc), 800),
            "input_b64": base64.b64encode(data[:4096]).decode(), "traceback": "".join(tb)[-3000:]}


def atheris_main(argv: List[str]) -> None:
    import atheris  # type: ignore
    target = argv[2]
    fn = BYTE_TARGETS[target]
    out = os.environ.get("FUZZ_FINDINGS")
    seen: set = set()

    def one(data: bytes) -> None:
        try:
            fn(data)
        except Exception as e:  # noqa: BLE001 - every unexpected exception is a finding
            rec = _finding_record(target, data, e)
            if rec["signature"] in seen:
                return
            seen.add(rec["signature"])
            if out:
                with open(out, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            sys.stderr.write("FINDING %s\n%s\n" % (rec["signature"], rec["traceback"]))

    atheris.Setup([argv[0]] + argv[3:], one)
    atheris.Fuzz()


def replay(target: str, b64: str) -> None:
    """Re-run one finding: python tests/fuzz_targets.py replay TARGET BASE64."""
    BYTE_TARGETS[target](base64.b64decode(b64))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "atheris":
        atheris_main(sys.argv)
    elif len(sys.argv) == 4 and sys.argv[1] == "replay":
        replay(sys.argv[2], sys.argv[3])
    else:
        sys.stderr.write(__doc__ or "")
        sys.exit(2)
