"""Pool bookkeeping from outside (raw sockets + msgpack), PROTOCOL §2 pool status and §3:

* `start` of a pool in backoff gives its surviving workers the new options;
* attach picks the worker with the fewest consumers, a starting one included;
* `in_flight` counts only events handed to workers, `retried` only deliveries made again;
* a draining worker that dies is not "restarted" over the slot's new worker."""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
import zlib
from typing import Any, Dict, List, Optional

import msgpack
import pytest

import waits
from daemon_fixture import Daemon


def _enc(obj: Any) -> bytes:
    b = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(b)) + b


class Raw:
    """One framed connection (control client, attached consumer or accepted subscriber conn)."""

    def __init__(self, sock: socket.socket) -> None:
        self.s = sock
        self.buf = b""
        self.nid = 0
        self.hello: Optional[Dict[str, Any]] = None

    @classmethod
    def connect(cls, path: str) -> "Raw":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        return cls(s)

    def send(self, obj: Any) -> None:
        self.s.sendall(_enc(obj))

    def recv(self, timeout: float) -> Optional[Dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    p, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgpack.unpackb(p, raw=False)
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([self.s], [], [], left)
            if not r:
                return None
            d = self.s.recv(1 << 20)
            if not d:
                raise EOFError("connection closed")
            self.buf += d

    def call(self, op: str, args: Any = None, timeout: float = 30.0) -> Any:
        self.nid += 1
        m: Dict[str, Any] = {"id": self.nid, "op": op}
        if args is not None:
            m["args"] = args
        self.send(m)
        r = self.recv(timeout)
        assert r is not None, "no answer to %s" % op
        assert r.get("ok"), "%s failed: %r" % (op, r)
        return r["result"]

    def close(self) -> None:
        self.s.close()


def wait_for(pred: Any, timeout: float = 20.0, what: str = "condition") -> Any:
    return waits.wait_for(pred, timeout, what, interval=0.05)


def stream_on_slot(slot: int, n: int) -> str:
    return next("k%d" % i for i in range(1000) if zlib.crc32(("k%d" % i).encode()) % n == slot)


class Listener:
    def __init__(self, path: str) -> None:
        self.path = path
        self.l = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.l.bind(path)
        self.l.listen(16)
        self.conns: List[Raw] = []

    def accept(self, n: int, timeout: float = 20.0) -> List[Raw]:
        deadline = time.monotonic() + timeout
        while len(self.conns) < n and time.monotonic() < deadline:
            r, _, _ = select.select([self.l], [], [], max(0.0, deadline - time.monotonic()))
            if r:
                s, _ = self.l.accept()
                c = Raw(s)
                c.hello = c.recv(10)
                self.conns.append(c)
        assert len(self.conns) >= n, "only %d subscriber connections" % len(self.conns)
        return self.conns

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.l.close()


def events_of(frame: Optional[Dict[str, Any]]) -> List[tuple]:
    return [(e["position"], e["attempt"]) for e in frame["events"]] if frame else []


# ---- defect: start of a backoff pool does not give its surviving workers the new ack_timeout


@pytest.mark.timeout(90)
def test_start_of_backoff_pool_applies_new_ack_timeout_to_surviving_workers(daemon: Daemon) -> None:
    """PROTOCOL §2 start: "a stopped, backoff or failed pool starts again from its checkpoint,
    taking the given pool_size, subscriber and options". The worker that survived the backoff
    keeps the ack_timeout it was spawned with: an unacked event is not redelivered."""
    c = Raw.connect(daemon.socket)
    sub_path = os.path.join(daemon.root, "sub.sock")
    lst = Listener(sub_path)
    try:
        sub = {"name": "bo", "type": "stream", "selector": "$all", "subscriber": "unix:" + sub_path,
               "pool_size": 2, "options": {"max_restarts": 0, "ack_timeout": 3600}}
        key = c.call("start", {"subscription": sub})["key"]
        lst.accept(2)
        daemon.collect_children()
        st = wait_for(lambda: (lambda s: s if len(s["workers"]) == 2 and all(
            w["state"] == "ready" for w in s["workers"]) else None)(c.call("status", {"key": key})),
            what="two ready workers")
        pids = {w["index"]: w["pid"] for w in st["workers"]}
        os.kill(pids[1], signal.SIGKILL)          # max_restarts 0: the pool goes to backoff
        wait_for(lambda: c.call("status", {"key": key})["state"] == "backoff", what="backoff")
        sub["options"] = {"max_restarts": 10, "ack_timeout": 0.5}
        st = c.call("start", {"subscription": sub})
        assert st["subscription"]["options"]["ack_timeout"] == 0.5
        survivor = [x for x in lst.conns if x.hello["worker"] == 0][0]
        assert pids[0] in [w["pid"] for w in c.call("status", {"key": key})["workers"]]
        pos = c.call("publish", {"events": [{"stream": stream_on_slot(0, 2), "type": "t"}]})
        p = pos["positions"][0]
        got: List[tuple] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(a > 1 for _, a in got):
            got += events_of(survivor.recv(0.5))
        assert (p, 1) in got, "event never reached worker 0's subscriber: %r" % got
        assert (p, 2) in got, ("event %d not redelivered within 20 s although the pool was "
                               "started with ack_timeout 0.5 (worker 0 kept the old 3600 s): %r"
                               % (p, got))
    finally:
        lst.close()
        c.close()


# ---- defect: attach right after start puts every consumer on worker 0


@pytest.mark.timeout(120)
def test_attach_goes_to_worker_with_fewest_consumers_right_after_start(daemon: Daemon) -> None:
    """PROTOCOL §3: "The daemon hands the connection to the worker with the fewest consumers
    (lowest index on a tie)." Two consumers attached right after `start` of a pool of 2 both
    land on worker 0 (worker 1 is still starting and is passed over), and worker 1 then gets
    no events at all (attach mode routes only to workers with a consumer)."""
    c = Raw.connect(daemon.socket)
    placements = []
    try:
        for trial in range(6):
            st = c.call("start", {"subscription": {"name": "fewest-%d" % trial, "type": "stream",
                                                   "selector": "$all", "pool_size": 2}})
            key = st["key"]
            a, b = Raw.connect(daemon.socket), Raw.connect(daemon.socket)
            wa = a.call("attach", {"key": key})["worker"]
            wb = b.call("attach", {"key": key})["worker"]
            st = wait_for(lambda: (lambda s: s if sum(w["consumers"] for w in s["workers"]) == 2
                                   else None)(c.call("status", {"key": key})), what="2 consumers")
            placements.append((wa, wb, sorted((w["index"], w["consumers"]) for w in st["workers"])))
            a.close()
            b.close()
            c.call("stop", {"key": key, "delete": True})
        bad = [p for p in placements if p[0] == p[1]]
        assert not bad, ("second consumer attached to the same worker while the other worker "
                         "had none (attach, attach, workers' consumers): %r" % placements)
    finally:
        c.close()


# ---- defect: pool status in_flight counts events never handed to a worker


@pytest.mark.timeout(60)
def test_pool_in_flight_counts_only_events_handed_to_workers(daemon: Daemon) -> None:
    """PROTOCOL §2 pool status: "in_flight: handed to workers, not yet acked/skipped/parked
    (retries waiting included)". Pinned events held back in the parent because their worker's
    max_in_flight window is full are counted too: in_flight 10 while the workers hold 2."""
    c = Raw.connect(daemon.socket)
    try:
        key = c.call("start", {"subscription": {"name": "infl", "type": "stream", "selector": "$all",
                                                "pool_size": 2,
                                                "options": {"max_in_flight": 2}}})["key"]
        # both workers ready first (see the attach test above), then one consumer each
        wait_for(lambda: [w["state"] for w in c.call("status", {"key": key})["workers"]]
                 == ["ready", "ready"], what="two ready workers")
        a, b = Raw.connect(daemon.socket), Raw.connect(daemon.socket)
        a.call("attach", {"key": key})
        b.call("attach", {"key": key})
        wait_for(lambda: all(w["consumers"] == 1 for w in c.call("status", {"key": key})["workers"])
                 and len(c.call("status", {"key": key})["workers"]) == 2, what="one consumer each")
        streams = [s for s in ("k%d" % i for i in range(200)) if zlib.crc32(s.encode()) % 2 == 0][:3]
        c.call("publish", {"events": [{"stream": streams[i % 3], "type": "t"} for i in range(12)]})
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            for x in (a, b):
                got += events_of(x.recv(0.1))
        assert len(got) == 2, got
        time.sleep(0.5)
        st = c.call("status", {"key": key})
        handed = sum(w["in_flight"] for w in st["workers"])
        assert st["retried"] == 0 and handed == 2, st
        assert st["in_flight"] == handed, (
            "pool in_flight %d, but only %d events were handed to workers (none retried; %d "
            "delivered to consumers)" % (st["in_flight"], handed, len(got)))
    finally:
        c.close()


# ---- defect: `retried` counts redeliveries that were not made


@pytest.mark.timeout(60)
def test_retried_counts_only_deliveries_made_again(daemon: Daemon) -> None:
    """PROTOCOL §3: "The pool's retried counts deliveries made again after a nack retry or a
    timeout." A nacked event that waits for room in the window (max_in_flight 1, the window
    taken by the next event) has not been delivered again, yet retried is already 1."""
    c = Raw.connect(daemon.socket)
    try:
        key = c.call("start", {"subscription": {"name": "rt", "type": "stream", "selector": "$all",
                                                "options": {"max_in_flight": 1,
                                                            "retry_backoff": [0.05, 0.05]}}})["key"]
        a = Raw.connect(daemon.socket)
        a.call("attach", {"key": key})
        wait_for(lambda: c.call("status", {"key": key})["workers"][0]["consumers"] == 1,
                 what="consumer")
        p1, p2 = c.call("publish", {"events": [{"stream": "x", "type": "t"},
                                               {"stream": "y", "type": "t"}]})["positions"]
        assert events_of(a.recv(10)) == [(p1, 1)]
        a.send({"op": "nack", "positions": [p1], "action": "retry"})
        assert events_of(a.recv(10)) == [(p2, 1)]      # the window went to p2; p1 waits for room
        seen = []
        deadline = time.monotonic() + 1.5              # well past p1's 0.05 s backoff
        while time.monotonic() < deadline:
            seen += events_of(a.recv(0.1))
        assert seen == [], seen                        # p1 was not delivered again (p2 holds it)
        st = c.call("status", {"key": key})
        assert st["retried"] == 0, ("retried is %d although no event was delivered again "
                                    "(p%d still waits for room in the window)" % (st["retried"], p1))
    finally:
        c.close()


# ---- defect: a draining worker's unplanned death spawns a second worker for an occupied slot


@pytest.mark.timeout(90)
def test_death_of_draining_worker_does_not_leak_a_worker(daemon: Daemon) -> None:
    """Shrink 2 -> 1 while worker 1 holds an unacked event (it drains), grow back to 2 (a new
    worker 1 starts), then the draining old worker 1 dies (SIGKILL). The parent "replaces" it
    by spawning another #1 over the slot the new worker 1 holds: that worker is orphaned —
    missing from status, never stopped: it outlives `stop` (PROTOCOL §2 stop: "stops every
    worker"; status after stopping has `workers` empty)."""
    c = Raw.connect(daemon.socket)
    sub_path = os.path.join(daemon.root, "sub.sock")
    lst = Listener(sub_path)
    try:
        sub = {"name": "leak", "type": "stream", "selector": "$all", "subscriber": "unix:" + sub_path,
               "pool_size": 2}
        key = c.call("start", {"subscription": sub})["key"]
        lst.accept(2)
        c.call("publish", {"events": [{"stream": stream_on_slot(1, 2), "type": "t"}]})
        w1 = [x for x in lst.conns if x.hello["worker"] == 1][0]
        assert events_of(w1.recv(10)), "worker 1 delivered nothing"     # held: never acked
        st = c.call("status", {"key": key})
        old1 = [w["pid"] for w in st["workers"] if w["index"] == 1][0]
        c.call("update", {"key": key, "pool_size": 1})      # worker 1 drains (its event unacked)
        c.call("update", {"key": key, "pool_size": 2})      # a new worker 1
        wait_for(lambda: len([w for w in c.call("status", {"key": key})["workers"]
                              if w["state"] == "ready"]) == 2, what="new worker 1 ready")
        daemon.collect_children()
        os.kill(old1, signal.SIGKILL)
        time.sleep(2.0)                  # let the parent reap it and do what it does
        daemon.collect_children()
        st = c.call("status", {"key": key})
        listed = sorted(w["pid"] for w in st["workers"])
        running = sorted(p.pid for p in daemon.pool_workers())
        assert running == listed, ("pool workers running %r, status lists %r (pool_size 2)"
                                   % (running, listed))
        st = c.call("stop", {"key": key, "drain_timeout": 1})
        assert st["workers"] == []
        time.sleep(1.0)
        left = [(p.pid, " ".join(p.cmdline())) for p in daemon.pool_workers()]
        assert left == [], "workers still running after stop: %r" % left
    finally:
        lst.close()
        c.close()


@pytest.mark.timeout(90)
def test_death_of_draining_worker_is_not_a_restart(daemon):
    """§2: restarts counts unplanned worker *restarts*; a retired worker that dies is not
    restarted (and restart intensity never counted it)."""
    c = daemon.client()
    key = c.start({"name": "a", "type": "stream", "selector": "$all", "pool_size": 3,
                   "options": {"strategy": "round_robin"}})["key"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = c.status(key)
        if len(st["workers"]) == 3 and all(w["state"] == "ready" for w in st["workers"]):
            break
        time.sleep(0.05)
    consumers = [c.attach(key) for _ in range(3)]
    assert sorted(x.worker for x in consumers) == [0, 1, 2]
    c.publish([{"stream": "s%d" % i, "type": "T", "data": i} for i in range(9)])
    for x in consumers:            # every worker now holds unacked events: a shrink drains
        assert x.recv(20) is not None
    st = c.update(key, pool_size=1)
    draining = [w["pid"] for w in st["workers"] if w["state"] == "draining"]
    assert len(draining) == 2, st["workers"]
    for pid in draining:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = c.status(key)
        if [w["index"] for w in st["workers"]] == [0]:
            break
        time.sleep(0.05)
    assert [w["index"] for w in st["workers"]] == [0], st["workers"]   # nobody was respawned
    assert st["state"] == "running"
    assert st["restarts"] == 0, (
        "status.restarts is %d although no worker was restarted (the two draining workers "
        "that died were retired, not respawned)" % st["restarts"])
    for x in consumers:
        x.close()
