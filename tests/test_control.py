"""The control channel against a real daemon (PROTOCOL §1, §2): every op and every
error code where it applies, with exact ``details.field`` paths.

Most tests share one daemon (module scope) and, around every refused request,
check that nothing else moved: a bystander connection opened before keeps
answering on the same socket, a bystander pool keeps running with the same
worker pid and no restart, and ``list`` is the same as before the request.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from typing import Any, Dict, List, Optional

import msgpack
import pytest

from daemon_fixture import Daemon
from emitterd.client import (AlreadyStarted, Client, EmitterError, Invalid, NotFound,
                             Unavailable, UnknownOp)
from emitterd.framing import Decoder, encode
from waits import wait_for  # noqa: E402

UNKNOWN_KEY = "0123456789abcdef"

DEFAULT_OPTIONS = {"strategy": "pinned", "batch_size": 64, "max_in_flight": 256,
                   "ack_timeout": 30.0, "max_retries": 10, "retry_backoff": [0.1, 30.0],
                   "max_restarts": 10, "restart_period": 60.0, "ephemeral": False}
STATUS_KEYS = {"key", "name", "subscription", "state", "checkpoint", "head", "in_flight",
               "delivered", "retried", "parked", "restarts", "workers"}
WORKER_KEYS = {"index", "pid", "state", "rss", "cpu_percent", "in_flight", "delivered",
               "restarts", "consumers"}


# ---- helpers -----------------------------------------------------------------

def wait_ready(c: Client, key: str, n: int = 1, timeout: float = 10.0) -> Dict[str, Any]:
    def ready() -> Optional[Dict[str, Any]]:
        st = c.status(key)
        ws = st["workers"]
        if (st["state"] == "running" and len(ws) == n
                and all(w["state"] == "ready" for w in ws)):
            return st
        return None
    return wait_for(ready, timeout, what="%d ready workers of %s" % (n, key))


class Raw:
    """A raw control connection: bytes out, decoded frames in, EOF detection."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.dec = Decoder(0xFFFFFFFF)
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        """One recv into the decoder; False on EOF/reset."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no frame from the daemon in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no frame from the daemon in time") from None
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.dec.feed(data)
        return True

    def frame(self, timeout: float = 5.0) -> Optional[dict]:
        """The next frame, or None on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.dec.next()
            if f is not None:
                return f
            if self.eof or not self._fill(deadline):
                return None

    def request(self, msg: dict, timeout: float = 5.0) -> Optional[dict]:
        self.send(encode(msg))
        return self.frame(timeout)

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True when the daemon closes the connection (with no further frame) in time."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                f = self.dec.next()
                if f is not None:
                    return False
                if self.eof or not self._fill(deadline):
                    return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def sub(name: str, **kw: Any) -> Dict[str, Any]:
    s = {"name": name, "type": "stream", "selector": "orders"}
    s.update(kw)
    return s


class World:
    """What must not change when a request is refused."""

    def __init__(self, d: Daemon, bystander: Raw, pool_key: str) -> None:
        self.d = d
        self.bystander = bystander
        self.pool_key = pool_key
        self.c = d.client()
        self._rid = 1000
        self.snapshot = self._take()

    def _take(self) -> List[Any]:
        subs = self.c.list()["subscriptions"]
        return [(s["key"], s["subscription"], s["state"],
                 [(w["index"], w["pid"]) for w in s["workers"]], s["restarts"]) for s in subs]

    def check(self) -> None:
        # the bystander connection still answers, on the same socket
        self._rid += 1
        resp = self.bystander.request({"id": self._rid, "op": "ping"})
        assert resp is not None, "the bystander connection was closed"
        assert resp["id"] == self._rid and resp["ok"] is True, resp
        assert resp["result"]["pid"] == self.d.proc.pid
        # the bystander pool runs on, untouched
        st = self.c.status(self.pool_key)
        assert st["state"] == "running" and st["restarts"] == 0, st
        # nothing registered, removed or restarted by the refused request
        assert self._take() == self.snapshot


@pytest.fixture(scope="module")
def shared() -> Any:
    d = Daemon(())
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def bystander(shared: Daemon) -> Any:
    c = Client(shared.socket, timeout=10)
    try:
        pool = c.start(sub("bystander", selector="bystander-stream"))
        st = wait_ready(c, pool["key"])
        for w in st["workers"]:
            shared.track(w["pid"])
        raw = Raw(shared.socket)
        try:
            yield raw, pool["key"]
        finally:
            raw.close()
    finally:
        c.close()


@pytest.fixture
def world(shared: Daemon, bystander: Any) -> World:
    raw, key = bystander
    return World(shared, raw, key)


def expect_error(c: Client, op: str, args: Optional[dict], code: str) -> EmitterError:
    with pytest.raises(EmitterError) as ei:
        c.request(op, args)
    assert ei.value.code == code, (op, args, ei.value.code, ei.value.message, ei.value.details)
    assert isinstance(ei.value.message, str) and ei.value.message
    return ei.value


# ---- ping, start, already_started ---------------------------------------------

@pytest.mark.timeout(30)
def test_ping_fields(shared: Daemon) -> None:
    r = shared.client().ping()
    assert set(r) >= {"version", "pid", "store_id", "uptime", "head"}
    assert isinstance(r["version"], str) and r["version"]
    assert r["pid"] == shared.proc.pid
    assert r["store_id"] == "default"
    assert isinstance(r["uptime"], (int, float)) and r["uptime"] >= 0
    assert isinstance(r["head"], int) and r["head"] >= 0
    time.sleep(0.05)
    assert shared.client().ping()["uptime"] > r["uptime"]


@pytest.mark.timeout(30)
def test_start_result_has_every_default(shared: Daemon, world: World) -> None:
    c = shared.client()
    head = c.ping()["head"]
    st = c.start(sub("defaults"))
    assert set(st) == STATUS_KEYS
    key = st["key"]
    assert len(key) == 16 and all(ch in "0123456789abcdef" for ch in key)
    assert isinstance(st["name"], str) and st["name"]
    assert st["subscription"] == {"name": "defaults", "type": "stream", "selector": "orders",
                                  "subscriber": None, "pool_size": 1, "start_from": "now",
                                  "options": DEFAULT_OPTIONS}
    assert st["state"] == "running"
    assert st["checkpoint"] == head and st["head"] == head    # start_from "now"
    for k in ("in_flight", "delivered", "retried", "parked", "restarts"):
        assert st[k] == 0, k
    assert len(st["workers"]) == 1
    w = st["workers"][0]
    shared.track(w["pid"])
    assert set(w) == WORKER_KEYS
    assert w["index"] == 0 and isinstance(w["pid"], int) and w["pid"] > 0
    assert w["state"] in ("starting", "ready")
    assert isinstance(w["cpu_percent"], float)
    assert w["restarts"] == 0 and w["consumers"] == 0 and w["in_flight"] == 0
    # the same triple always has the same key: status by triple, list
    assert c.status({"name": "defaults", "type": "stream", "selector": "orders"})["key"] == key
    assert key in [s["key"] for s in c.list()["subscriptions"]]
    # partial options: the others keep their defaults
    st2 = c.start(sub("partial", options={"batch_size": 5, "strategy": "round_robin"},
                      start_from="origin", pool_size=2))
    shared.collect_children()
    opts = dict(DEFAULT_OPTIONS, batch_size=5, strategy="round_robin")
    assert st2["subscription"]["options"] == opts
    assert st2["subscription"]["pool_size"] == 2 and st2["subscription"]["start_from"] == "origin"
    assert st2["checkpoint"] == 0
    assert [w["index"] for w in st2["workers"]] == [0, 1]
    wait_ready(c, st2["key"], 2)
    shared.collect_children()
    c.stop(key, delete=True)
    c.stop(st2["key"], delete=True)
    world.check()


@pytest.mark.timeout(30)
def test_tags_list_and_any_map_have_one_key(shared: Daemon, world: World) -> None:
    c = shared.client()
    st = c.start({"name": "tagged", "type": "tags", "selector": ["b", "a"]})
    shared.collect_children()
    same = c.status({"name": "tagged", "type": "tags", "selector": {"any": ["b", "a"]}})
    assert same["key"] == st["key"]
    e = expect_error(c, "start", {"subscription": {"name": "tagged", "type": "tags",
                                                   "selector": {"any": ["b", "a"]}}},
                     "already_started")
    assert e.details == {"key": st["key"]}
    # another name, type or selector is another key
    other = c.start({"name": "tagged", "type": "tags", "selector": {"all": ["b", "a"]}})
    shared.collect_children()
    assert other["key"] != st["key"]
    c.stop(st["key"], delete=True)
    c.stop(other["key"], delete=True)
    world.check()


@pytest.mark.timeout(30)
def test_already_started_names_the_key(shared: Daemon, world: World) -> None:
    c = shared.client()
    st = c.start(sub("twice"))
    shared.collect_children()
    world.snapshot = world._take()
    with pytest.raises(AlreadyStarted) as ei:
        c.start(sub("twice", pool_size=3, options={"batch_size": 9}))
    assert ei.value.code == "already_started"
    assert ei.value.details == {"key": st["key"]}
    # the refused start changed nothing: same spec, same worker
    after = c.status(st["key"])
    assert after["subscription"] == st["subscription"]
    assert [w["pid"] for w in after["workers"]] == [w["pid"] for w in st["workers"]]
    world.check()
    c.stop(st["key"], delete=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op,extra,field", [
    ("status", {}, "bogus"), ("stop", {}, "bogus"), ("stop", {}, "delete"),
    ("update", {"options": {"batch_size": 5}}, "bogus"),
    # beside the target it resizes; inside the triple it used to answer ok, resizing nothing
    ("update", {}, "pool_size"), ("parked", {}, "limit")])
def test_a_field_beyond_the_triple_is_invalid(shared: Daemon, world: World, op: str,
                                              extra: dict, field: str) -> None:
    c = shared.client()
    st = c.start(sub("triple-extra"))
    shared.collect_children()
    world.snapshot = world._take()
    triple = {"name": "triple-extra", "type": "stream", "selector": "orders"}
    value = {"bogus": 1, "delete": True, "pool_size": 3, "limit": 1}[field]
    e = expect_error(c, op, dict(extra, subscription=dict(triple, **{field: value})), "invalid")
    assert e.details == {"field": "subscription." + field}
    assert "name, type and selector" in e.message
    after = c.status(st["key"])          # nothing changed: not stopped, deleted or resized
    assert after["state"] == "running" and after["subscription"] == st["subscription"]
    world.check()
    c.stop(st["key"], delete=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op,extra", [("status", {}), ("stop", {"delete": True}),
                                      ("update", {"pool_size": 2})])
def test_a_key_and_a_triple_of_different_subscriptions_are_invalid(
        shared: Daemon, world: World, op: str, extra: dict) -> None:
    c = shared.client()
    one, two = c.start(sub("one-of-two", selector="o1")), c.start(sub("two-of-two", selector="o2"))
    shared.collect_children()
    world.snapshot = world._take()
    triple = {"name": "two-of-two", "type": "stream", "selector": "o2"}
    e = expect_error(c, op, dict(extra, key=one["key"], subscription=triple), "invalid")
    assert e.details == {"field": "subscription"} and one["key"] in e.message
    for st in (one, two):                # neither was stopped, deleted or resized
        after = c.status(st["key"])
        assert after["state"] == "running" and after["subscription"] == st["subscription"]
    world.check()
    # the same pair naming one subscription is its target
    assert c.request("status", {"key": two["key"], "subscription": triple})["key"] == two["key"]
    c.stop(one["key"], delete=True)
    c.stop(two["key"], delete=True)


# ---- not_found -----------------------------------------------------------------

TARGETS = [
    pytest.param({"key": UNKNOWN_KEY}, id="unknown-key"),
    pytest.param({"key": "XYZ"}, id="malformed-key"),
    pytest.param({"key": UNKNOWN_KEY.upper()}, id="uppercase-key"),
    pytest.param({"key": UNKNOWN_KEY + "0"}, id="17-char-key"),
    pytest.param({"key": 12345}, id="int-key"),
    pytest.param({"subscription": {"name": "nobody", "type": "stream", "selector": "x"}},
                 id="unknown-triple"),
]


NOT_FOUND_OPS = [("status", {}), ("stop", {}), ("stop", {"delete": True}),
                 ("update", {"pool_size": 2}), ("parked", {}), ("parked", {"action": "purge"}),
                 ("attach", {})]
NOT_FOUND_CASES = [
    pytest.param(op, extra, t.values[0], id="%s%s-%s" % (op, "-" + "-".join(extra) if extra else "",
                                                         t.id))
    for op, extra in NOT_FOUND_OPS for t in TARGETS
    if not (op == "attach" and "subscription" in t.values[0])   # attach takes only a key
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op,extra,target", NOT_FOUND_CASES)
def test_not_found(shared: Daemon, world: World, op: str, extra: dict, target: dict) -> None:
    c = shared.client()
    args = dict(target, **extra)
    if op == "attach":
        raw = Raw(shared.socket)
        try:
            resp = raw.request({"id": 3, "op": "attach", "args": args})
            assert resp is not None and resp["id"] == 3 and resp["ok"] is False, resp
            assert resp["error"]["code"] == "not_found", resp
            # a refused attach leaves a normal control connection
            resp = raw.request({"id": 4, "op": "ping"})
            assert resp is not None and resp["id"] == 4 and resp["ok"] is True, resp
        finally:
            raw.close()
    else:
        expect_error(c, op, args, "not_found")
        assert c.ping()["pid"] == shared.proc.pid      # same connection still usable
    world.check()


# ---- invalid subscriptions -------------------------------------------------------

LONG = "n" * 201
BAD_SUBSCRIPTIONS = [
    # options
    ({"options": {"strategy": "fastest"}}, "subscription.options.strategy"),
    ({"options": {"strategy": 1}}, "subscription.options.strategy"),
    ({"options": {"batch_size": 0}}, "subscription.options.batch_size"),
    ({"options": {"batch_size": 10001}}, "subscription.options.batch_size"),
    ({"options": {"batch_size": "5"}}, "subscription.options.batch_size"),
    ({"options": {"batch_size": 5.0}}, "subscription.options.batch_size"),
    ({"options": {"max_in_flight": 0}}, "subscription.options.max_in_flight"),
    ({"options": {"ack_timeout": 0}}, "subscription.options.ack_timeout"),
    ({"options": {"ack_timeout": -1}}, "subscription.options.ack_timeout"),
    ({"options": {"ack_timeout": "x"}}, "subscription.options.ack_timeout"),
    ({"options": {"ack_timeout": True}}, "subscription.options.ack_timeout"),
    ({"options": {"max_retries": -1}}, "subscription.options.max_retries"),
    ({"options": {"retry_backoff": [1]}}, "subscription.options.retry_backoff"),
    ({"options": {"retry_backoff": [2, 1]}}, "subscription.options.retry_backoff"),
    ({"options": {"retry_backoff": [0, 1]}}, "subscription.options.retry_backoff"),
    ({"options": {"retry_backoff": 1}}, "subscription.options.retry_backoff"),
    ({"options": {"max_restarts": -1}}, "subscription.options.max_restarts"),
    ({"options": {"max_restarts": "ten"}}, "subscription.options.max_restarts"),
    ({"options": {"restart_period": 0}}, "subscription.options.restart_period"),
    ({"options": {"restart_period": -5}}, "subscription.options.restart_period"),
    ({"options": {"ephemeral": True}, "subscriber": "unix:/tmp/emd-nobody.sock"},
     "subscription.options.ephemeral"),
    ({"options": {"ephemeral": "yes"}}, "subscription.options.ephemeral"),
    ({"options": {"colour": "red"}}, "subscription.options.colour"),
    ({"options": [1]}, "subscription.options"),
    # subscriber, pool_size, name, type, start_from
    ({"subscriber": "tcp:x"}, "subscription.subscriber"),
    ({"subscriber": "unix:relative.sock"}, "subscription.subscriber"),
    ({"subscriber": 5}, "subscription.subscriber"),
    ({"pool_size": 0}, "subscription.pool_size"),
    ({"pool_size": 65}, "subscription.pool_size"),
    ({"pool_size": "2"}, "subscription.pool_size"),
    ({"pool_size": True}, "subscription.pool_size"),
    ({"pool_size": 2.0}, "subscription.pool_size"),
    ({"name": ""}, "subscription.name"),
    ({"name": LONG}, "subscription.name"),
    ({"name": None}, "subscription.name"),
    ({"name": 7}, "subscription.name"),
    ({"type": "nope"}, "subscription.type"),
    ({"type": None}, "subscription.type"),
    ({"start_from": 0}, "subscription.start_from"),
    ({"start_from": -3}, "subscription.start_from"),
    ({"start_from": "later"}, "subscription.start_from"),
    ({"start_from": True}, "subscription.start_from"),
    ({"start_from": 2 ** 63 + 1}, "subscription.start_from"),   # start_from - 1 is stored
    ({"start_from": 2 ** 64 - 1}, "subscription.start_from"),
    # selectors of the wrong shape, per type
    ({"type": "stream", "selector": ""}, "subscription.selector"),
    ({"type": "stream", "selector": 5}, "subscription.selector"),
    ({"type": "stream", "selector": None}, "subscription.selector"),
    ({"type": "event_type", "selector": ""}, "subscription.selector"),
    ({"type": "event_type", "selector": ["a"]}, "subscription.selector"),
    ({"type": "tags", "selector": []}, "subscription.selector"),
    ({"type": "tags", "selector": "a"}, "subscription.selector"),
    ({"type": "tags", "selector": ["a", 1]}, "subscription.selector.1"),
    ({"type": "tags", "selector": {}}, "subscription.selector"),
    ({"type": "tags", "selector": {"any": []}}, "subscription.selector.any"),
    ({"type": "tags", "selector": {"all": []}}, "subscription.selector.all"),
    ({"type": "tags", "selector": {"none": ["a"]}}, "subscription.selector.none"),
    ({"type": "tags", "selector": {"any": ["a"], "none": ["b"]}}, "subscription.selector.none"),
    ({"type": "event_pattern", "selector": ""}, "subscription.selector"),
    ({"type": "event_pattern", "selector": {}}, "subscription.selector"),
    ({"type": "event_pattern", "selector": {"x": "*"}}, "subscription.selector.x"),
    ({"type": "event_pattern", "selector": {"stream": ""}}, "subscription.selector.stream"),
    ({"type": "event_pattern", "selector": {"type": 3}}, "subscription.selector.type"),
    ({"type": "event_pattern", "selector": 5}, "subscription.selector"),
    ({"type": "event_payload", "selector": {}}, "subscription.selector"),
    ({"type": "event_payload", "selector": "a"}, "subscription.selector"),
    ({"type": "event_payload", "selector": {"a": {"$gt": [1]}}}, "subscription.selector.a.$gt"),
    ({"type": "event_payload", "selector": {"a": {"$gt": None}}}, "subscription.selector.a.$gt"),
    ({"type": "event_payload", "selector": {"a": {"$bogus": 1}}}, "subscription.selector.a.$bogus"),
    ({"type": "event_payload", "selector": {"a": {"$gt": 1, "b": 2}}}, "subscription.selector.a"),
    ({"type": "event_payload", "selector": {"a": {"$in": 1}}}, "subscription.selector.a.$in"),
    ({"type": "event_payload", "selector": {"a": {"$exists": 1}}},
     "subscription.selector.a.$exists"),
    ({"type": "event_payload", "selector": {"a": {"$glob": 1}}}, "subscription.selector.a.$glob"),
    ({"type": "event_payload", "selector": {"a": {"b": {"$lt": {}}}}},
     "subscription.selector.a.b.$lt"),
]


def _bad_id(case: Any) -> str:
    override, field = case
    return "%s=%s" % (field.replace("subscription.", ""), repr(override)[:60])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("override,field", BAD_SUBSCRIPTIONS,
                         ids=[_bad_id(c) for c in BAD_SUBSCRIPTIONS])
def test_invalid_subscription_names_the_field(shared: Daemon, world: World, override: dict,
                                              field: str) -> None:
    s = sub("bad-%d" % (abs(hash(field + repr(override))) % 10 ** 8))
    s.update(override)
    s = {k: v for k, v in s.items() if not (k == "name" and v is None)}  # name None = missing
    e = expect_error(shared.client(), "start", {"subscription": s}, "invalid")
    assert e.details == {"field": field}, e.message
    world.check()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path,says", [("/tmp/x\0y", "NUL"), ("/" + "p" * 200, "longer than 107")])
def test_a_refused_subscriber_path_says_why(shared: Daemon, world: World, path: str,
                                            says: str) -> None:
    e = expect_error(shared.client(), "start",
                     {"subscription": sub("bad-path", subscriber="unix:" + path)}, "invalid")
    assert e.details == {"field": "subscription.subscriber"} and says in e.message, e.message
    world.check()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("args,field", [
    ({}, "subscription"),
    ({"subscription": None}, "subscription"),
    ({"subscription": "orders"}, "subscription"),
    ({"subscription": {"type": "stream", "selector": "x"}}, "subscription.name"),
    ({"subscription": {"name": "n", "selector": "x"}}, "subscription.type"),
    ({"subscription": {"name": "n", "type": "stream"}}, "subscription.selector"),
])
def test_invalid_start_args(shared: Daemon, world: World, args: dict, field: str) -> None:
    e = expect_error(shared.client(), "start", args, "invalid")
    assert e.details == {"field": field}, e.message
    world.check()


# ---- invalid requests, unknown_op ---------------------------------------------------

@pytest.mark.timeout(30)
@pytest.mark.parametrize("msg,rid,field", [
    ({"op": "ping"}, 0, "id"),
    ({"id": -1, "op": "ping"}, 0, "id"),
    ({"id": "3", "op": "ping"}, 0, "id"),
    ({"id": True, "op": "ping"}, 0, "id"),
    ({"id": 1.5, "op": "ping"}, 0, "id"),
    ({"id": None, "op": "ping"}, 0, "id"),
    ({"id": 5}, 5, "op"),
    ({"id": 5, "op": 3}, 5, "op"),
    ({"id": 5, "op": None}, 5, "op"),
    ({"id": 6, "op": b"ping"}, 6, "op"),
    ({"id": 7, "op": "ping", "args": [1]}, 7, "args"),
    ({"id": 7, "op": "ping", "args": "x"}, 7, "args"),
    ({"id": 7, "op": "status", "args": 1}, 7, "args"),
])
def test_invalid_request_map_keeps_the_connection(shared: Daemon, world: World, msg: dict,
                                                  rid: int, field: str) -> None:
    raw = Raw(shared.socket)
    try:
        resp = raw.request(msg)
        assert resp is not None, "connection closed after an invalid request"
        assert resp["id"] == rid and resp["ok"] is False, resp
        assert resp["error"]["code"] == "invalid", resp
        assert resp["error"]["details"] == {"field": field}, resp
        # not a framing error: the connection stays open
        resp = raw.request({"id": 99, "op": "ping"})
        assert resp is not None and resp["id"] == 99 and resp["ok"] is True, resp
    finally:
        raw.close()
    world.check()


@pytest.mark.timeout(30)
def test_valid_request_edge_forms(shared: Daemon, world: World) -> None:
    raw = Raw(shared.socket)
    try:
        big = 2 ** 64 - 1
        for msg in ({"id": 0, "op": "ping"}, {"id": big, "op": "ping"},
                    {"id": 8, "op": "ping", "args": None}, {"id": 9, "op": "ping", "args": {}},
                    {"id": 10, "op": "list", "args": None}):
            resp = raw.request(msg)
            assert resp is not None and resp["id"] == msg["id"] and resp["ok"] is True, (msg, resp)
        # pipelined: answers in request order, errors in their place
        raw.send(encode({"id": 21, "op": "ping"}) + encode({"id": 22, "op": "nope"})
                 + encode({"id": 23, "op": "status", "args": {"key": UNKNOWN_KEY}})
                 + encode({"id": 24, "op": "list"}))
        got = [raw.frame() for _ in range(4)]
        assert [g["id"] for g in got] == [21, 22, 23, 24], got
        assert [g["ok"] for g in got] == [True, False, False, True]
        assert got[1]["error"]["code"] == "unknown_op"
        assert got[2]["error"]["code"] == "not_found"
    finally:
        raw.close()
    world.check()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["frobnicate", "", "PING", "ping ", "hello"])
def test_unknown_op(shared: Daemon, world: World, op: str) -> None:
    raw = Raw(shared.socket)
    try:
        resp = raw.request({"id": 17, "op": op, "args": {"x": 1}})
        assert resp is not None and resp["id"] == 17 and resp["ok"] is False, resp
        assert resp["error"]["code"] == "unknown_op", resp
        assert isinstance(resp["error"]["message"], str)
        resp = raw.request({"id": 18, "op": "ping"})
        assert resp is not None and resp["id"] == 18 and resp["ok"] is True, resp
    finally:
        raw.close()
    c = shared.client()
    with pytest.raises(UnknownOp):
        c.request(op)
    world.check()


# ---- framing errors ------------------------------------------------------------------

def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


PING = msgpack.packb({"id": 1, "op": "ping"}, use_bin_type=True)
BAD_FRAMES = [
    pytest.param(_frame(b"\xc1"), id="never-used-byte"),
    pytest.param(_frame(b"\x82\xa2id"), id="truncated-msgpack"),
    pytest.param(_frame(PING + b"\x00"), id="trailing-bytes"),
    pytest.param(_frame(PING + PING), id="two-values"),
    pytest.param(_frame(b"\x82\xa2id\x01\xa2op\xa2\xff\xfe"), id="invalid-utf8-value"),
    pytest.param(_frame(b"\x82\xa2id\x01\xa2\xff\xfe\xa4ping"), id="invalid-utf8-key"),
    pytest.param(_frame(msgpack.packb([1, 2])), id="array"),
    pytest.param(_frame(msgpack.packb(5)), id="int"),
    pytest.param(_frame(msgpack.packb("ping")), id="str"),
    pytest.param(_frame(msgpack.packb(None)), id="nil"),
    pytest.param(b"\x00\x00\x00\x00", id="length-0"),
    pytest.param(b"\x00\x00\x00\x00" + _frame(PING), id="length-0-then-ping"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("data", BAD_FRAMES)
def test_bad_frame_answered_with_id_0_then_closed(shared: Daemon, world: World,
                                                   data: bytes) -> None:
    raw = Raw(shared.socket)
    try:
        raw.send(data)
        resp = raw.frame()
        assert resp is not None, "closed without the bad_frame answer"
        assert resp["id"] == 0 and resp["ok"] is False, resp
        assert resp["error"]["code"] == "bad_frame", resp
        assert isinstance(resp["error"]["message"], str)
        assert raw.closed_by_peer(), "the connection stays open after bad_frame"
    finally:
        raw.close()
    world.check()


@pytest.mark.timeout(30)
def test_a_frame_nested_too_deep_is_named_so(shared: Daemon, world: World) -> None:
    """valid msgpack deeper than the decoder's stack is not "not valid msgpack"."""
    raw = Raw(shared.socket)
    try:
        raw.send(_frame(b"\x83\xa2id\x01\xa2op\xa4ping\xa4args" + b"\x91" * 1100 + b"\xc0"))
        resp = raw.frame()
        assert resp is not None and resp["error"]["code"] == "bad_frame", resp
        assert resp["error"]["message"] == "payload nests arrays and maps more than 1024 deep"
    finally:
        raw.close()
    world.check()


@pytest.mark.timeout(30)
def test_bad_frame_after_good_requests_answers_them_first(shared: Daemon, world: World) -> None:
    raw = Raw(shared.socket)
    try:
        raw.send(encode({"id": 1, "op": "ping"}) + encode({"id": 2, "op": "list"})
                 + _frame(b"\xc1"))
        first, second, third = raw.frame(), raw.frame(), raw.frame()
        assert first and first["id"] == 1 and first["ok"] is True, first
        assert second and second["id"] == 2 and second["ok"] is True, second
        assert third and third["id"] == 0 and third["error"]["code"] == "bad_frame", third
        assert raw.closed_by_peer()
    finally:
        raw.close()
    world.check()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("length", [8 * 1024 * 1024 + 1, 0xFFFFFFFF])
def test_frame_too_large_answered_from_the_header_alone(shared: Daemon, world: World,
                                                        length: int) -> None:
    raw = Raw(shared.socket)
    try:
        raw.send(struct.pack(">I", length))      # the header only: no body ever comes
        resp = raw.frame(timeout=5)
        assert resp is not None, "closed without the frame_too_large answer"
        assert resp["id"] == 0 and resp["ok"] is False, resp
        assert resp["error"]["code"] == "frame_too_large", resp
        assert raw.closed_by_peer()
    finally:
        raw.close()
    world.check()


@pytest.mark.timeout(30)
def test_frame_of_exactly_max_frame_bytes_is_not_too_large(make_daemon: Any) -> None:
    limit = 65536
    d = make_daemon("--max-frame-bytes", str(limit), "--max-event-bytes", "4096")
    body = b""
    for n in range(limit - 64, limit):      # a valid request padded to exactly `limit` bytes
        body = msgpack.packb({"id": 4, "op": "ping", "args": {"pad": "x" * n}})
        if len(body) == limit:
            break
    assert len(body) == limit
    raw = Raw(d.socket)
    try:
        raw.send(_frame(body))
        resp = raw.frame()
        # read and decoded: the request's own answer (ping takes no arguments: invalid for
        # the padding), not frame_too_large with id 0
        assert resp is not None and resp["id"] == 4, resp
        assert resp["ok"] is False and resp["error"]["code"] == "invalid" \
            and resp["error"]["details"] == {"field": "pad"}, resp
        raw.send(struct.pack(">I", limit + 1))
        resp = raw.frame()
        assert resp is not None and resp["id"] == 0, resp
        assert resp["error"]["code"] == "frame_too_large", resp
        assert raw.closed_by_peer()
    finally:
        raw.close()
    assert d.client().ping()["pid"] == d.proc.pid


@pytest.mark.timeout(30)
def test_eof_mid_frame_just_closes(shared: Daemon, world: World) -> None:
    for partial in (b"\x00\x00", encode({"id": 1, "op": "ping"})[:-3]):
        raw = Raw(shared.socket)
        raw.send(partial)
        raw.close()
    world.check()


# ---- unavailable ------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_max_subscriptions_is_unavailable(make_daemon: Any) -> None:
    d = make_daemon("--max-subscriptions", "2")
    c = d.client()
    a = c.start(sub("a"))
    b = c.start(sub("b"))
    d.collect_children()
    before = [(s["key"], s["state"]) for s in c.list()["subscriptions"]]
    with pytest.raises(Unavailable) as ei:
        c.start(sub("c"))
    assert ei.value.code == "unavailable"
    assert [(s["key"], s["state"]) for s in c.list()["subscriptions"]] == before
    # a known subscription is still "already started", not "unavailable"
    with pytest.raises(AlreadyStarted):
        c.start(sub("a"))
    # a stopped subscription still counts, and may start again at the limit
    c.stop(b["key"])
    with pytest.raises(Unavailable):
        c.start(sub("c"))
    assert c.start(sub("b"))["state"] == "running"
    d.collect_children()
    # deleting one frees a place
    c.stop(b["key"], delete=True)
    st = c.start(sub("c"))
    d.collect_children()
    assert st["state"] == "running"
    assert sorted(s["key"] for s in c.list()["subscriptions"]) == sorted([a["key"], st["key"]])
    with pytest.raises(Unavailable):
        c.start(sub("d"))
    # a restart with a lower limit keeps what is stored, says so, and refuses new ones
    c.close()
    assert d.stop() == 0
    d.extra_args = ["--max-subscriptions", "1"]
    d.start()
    c = d.client()
    assert len(c.list()["subscriptions"]) == 2
    assert "more subscriptions are stored than max_subscriptions allows" in d.log_tail(30)
    with pytest.raises(Unavailable):
        c.start(sub("d"))


@pytest.mark.timeout(30)
def test_attach_unavailable_on_a_stopped_pool(shared: Daemon, world: World, short_tmp: str) -> None:
    c = shared.client()
    st = c.start(sub("to-stop"))
    wait_ready(c, st["key"])
    shared.collect_children()
    c.stop(st["key"])
    world.snapshot = world._take()
    raw = Raw(shared.socket)
    try:
        resp = raw.request({"id": 2, "op": "attach", "args": {"key": st["key"]}})
        assert resp is not None and resp["id"] == 2 and resp["ok"] is False, resp
        assert resp["error"]["code"] == "unavailable", resp
        resp = raw.request({"id": 3, "op": "ping"})
        assert resp is not None and resp["ok"] is True, resp
    finally:
        raw.close()
    assert c.status(st["key"])["state"] == "stopped"
    # attach to a subscription with a subscriber: invalid
    pushed = c.start(sub("pushed", subscriber="unix:" + os.path.join(short_tmp, "none.sock")))
    shared.collect_children()
    world.snapshot = world._take()
    with pytest.raises(Invalid):
        c.attach(pushed["key"])
    world.check()
    c.stop(st["key"], delete=True)
    c.stop(pushed["key"], delete=True)


@pytest.mark.timeout(60)
def test_unavailable_during_a_drain_says_the_pool_is_stopping(daemon: Daemon) -> None:
    """While a stop waits for an in-flight ack the pool still reads running (README), but
    attach and parked replay are refused: the message says why (it said "is running")."""
    c = daemon.client()
    key = c.start(sub("draining", selector="drn"))["key"]
    wait_ready(c, key)
    consumer, stopper, other = (Raw(daemon.socket, timeout=20) for _ in range(3))
    try:
        assert consumer.request({"id": 1, "op": "attach", "args": {"key": key}})["ok"]
        c.publish([{"stream": "drn", "type": "t"}])
        delivery = consumer.frame(20)
        assert delivery is not None and delivery["op"] == "events", delivery
        stopper.send(encode({"id": 1, "op": "stop", "args": {"key": key, "drain_timeout": 60}}))
        deadline = time.monotonic() + 20
        while True:     # the stop is served once attach answers unavailable
            attach = other.request({"id": 2, "op": "attach", "args": {"key": key}}, 20)
            if not attach["ok"] or time.monotonic() > deadline:
                break
            other.close()
            other = Raw(daemon.socket, timeout=20)
        replay = other.request({"id": 3, "op": "parked", "args": {"key": key, "action": "replay"}})
        for resp in (attach, replay):
            assert resp["ok"] is False and resp["error"]["code"] == "unavailable", resp
            assert "is stopping" in resp["error"]["message"], resp
        assert c.status(key)["state"] == "running"
        consumer.send(encode({"op": "ack", "positions": [e["position"] for e in delivery["events"]]}))
        done = stopper.frame(20)
        assert done is not None and done["ok"] and done["result"]["state"] == "stopped", done
    finally:
        for r in (consumer, stopper, other):
            r.close()


# ---- update: invalid checkpoint and fields ----------------------------------------------

@pytest.mark.timeout(30)
def test_update_invalid_fields(shared: Daemon, world: World) -> None:
    c = shared.client()
    st = c.start(sub("updatable", selector="upd", start_from="origin"))
    key = st["key"]
    wait_ready(c, key)
    shared.collect_children()
    head = c.publish([{"stream": "elsewhere", "type": "t"}] * 3)["positions"][-1]
    world.snapshot = world._take()
    before = c.status(key)
    cases = [
        ({"checkpoint": -1}, "checkpoint"),
        ({"checkpoint": head + 1}, "checkpoint"),
        ({"checkpoint": "1"}, "checkpoint"),
        ({"checkpoint": True}, "checkpoint"),
        ({"checkpoint": 1.0}, "checkpoint"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": 65}, "pool_size"),
        ({"pool_size": "2"}, "pool_size"),
        ({"options": {"batch_size": 0}}, "options.batch_size"),
        ({"options": {"batch_size": 10001}}, "options.batch_size"),
        ({"options": {"ack_timeout": 0}}, "options.ack_timeout"),
        ({"options": {"retry_backoff": [2, 1]}}, "options.retry_backoff"),
        ({"options": {"colour": 1}}, "options.colour"),
        ({"subscriber": "tcp:x"}, "subscriber"),
        ({"subscriber": "unix:relative"}, "subscriber"),
        # one bad field refuses the whole update (pool_size must not be applied)
        ({"pool_size": 3, "checkpoint": -1}, "checkpoint"),
        ({"pool_size": 3, "options": {"batch_size": 0}}, "options.batch_size"),
    ]
    for fields, field in cases:
        e = expect_error(c, "update", dict({"key": key}, **fields), "invalid")
        assert e.details == {"field": field}, (fields, e.details, e.message)
        now = c.status(key)
        assert now["subscription"] == before["subscription"], fields
        assert [w["pid"] for w in now["workers"]] == [w["pid"] for w in before["workers"]], fields
        assert now["checkpoint"] == before["checkpoint"], fields
    world.check()
    # the bounds themselves are valid
    assert c.update(key, checkpoint=head)["checkpoint"] == head
    assert c.update(key, checkpoint=0)["checkpoint"] == 0
    up = c.update(key, options={"batch_size": 10000})
    assert up["subscription"]["options"] == dict(DEFAULT_OPTIONS, batch_size=10000)
    c.stop(key, delete=True)
