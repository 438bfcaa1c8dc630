"""emitterd.client: Client, Consumer, serve_subscriber.

The first part plays the daemon with a tiny fake server (protocol edge cases
the real daemon should never produce); the rest runs against a real daemon.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable, Dict, List

import pytest

from emitterd import client as cl
from emitterd.client import (AlreadyStarted, Client, EmitterError, Invalid, NotFound,
                             PermissionDenied, ProtocolViolation, Unreachable, serve_subscriber)
from emitterd.framing import Decoder, encode
from waits import wait_for  # noqa: E402

UNKNOWN_KEY = "0123456789abcdef"


# ---- helpers -----------------------------------------------------------------

class FakeServer:
    """A one-connection-at-a-time fake control socket: `respond(request) -> list of
    frames (dicts) or raw bytes, or None to close the connection`."""

    def __init__(self, path: str, respond: Callable[[dict], Any]) -> None:
        self.path = path
        self.respond = respond
        self.requests: List[dict] = []
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(8)
        self.lsock.settimeout(0.2)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.lsock.accept()
            except (socket.timeout, OSError):
                continue
            with conn:
                dec = Decoder()
                conn.settimeout(0.2)
                open_ = True
                while open_ and not self._stop.is_set():
                    try:
                        data = conn.recv(65536)
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                    if not data:
                        break
                    dec.feed(data)
                    while True:
                        req = dec.next()
                        if req is None:
                            break
                        self.requests.append(req)
                        answer = self.respond(req)
                        if answer is None:
                            open_ = False
                            break
                        if isinstance(answer, bytes):
                            conn.sendall(answer)
                        else:
                            conn.sendall(b"".join(encode(f) for f in answer))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.lsock.close()


@pytest.fixture
def fake(short_tmp: str) -> Any:
    servers: List[FakeServer] = []

    def make(respond: Callable[[dict], Any]) -> FakeServer:
        s = FakeServer(os.path.join(short_tmp, "fake%d.sock" % len(servers)), respond)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def ok(req: dict, result: Any) -> List[dict]:
    return [{"id": req["id"], "ok": True, "result": result}]


def start_sub(c: Client, name: str, **over: Any) -> Dict[str, Any]:
    sub = {"name": name, "type": "stream", "selector": "$all", "start_from": "origin"}
    sub.update(over)
    return c.start(sub)


def wait_ready(c: Client, key: str, n: int = 1, timeout: float = 15.0) -> Dict[str, Any]:
    return wait_for(lambda: (lambda s: s if sum(w["state"] == "ready" for w in s["workers"]) >= n
                             else None)(c.status(key)), timeout, "%d ready workers" % n)


def wait_checkpoint(c: Client, key: str, position: int, timeout: float = 15.0) -> Dict[str, Any]:
    return wait_for(lambda: (lambda s: s if s["checkpoint"] >= position else None)(c.status(key)),
                    timeout, "checkpoint >= %d" % position)


def events(n: int, stream: str = "s-1", etype: str = "t") -> List[Dict[str, Any]]:
    return [{"stream": stream, "type": etype, "data": {"i": i}} for i in range(n)]


# ---- without a daemon --------------------------------------------------------

@pytest.mark.timeout(10)
def test_absent_socket_is_unreachable(short_tmp: str) -> None:
    with pytest.raises(Unreachable) as ei:
        Client(os.path.join(short_tmp, "absent.sock")).ping()
    assert isinstance(ei.value, ConnectionError)


@pytest.mark.timeout(10)
def test_stale_socket_is_unreachable(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    with pytest.raises(Unreachable):
        Client(path).ping()


@pytest.mark.timeout(10)
def test_default_socket_path_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMITTERD_SOCKET", "/tmp/somewhere/x.sock")
    assert Client().socket_path == "/tmp/somewhere/x.sock"
    assert Client("/tmp/y.sock").socket_path == "/tmp/y.sock"


@pytest.mark.timeout(10)
def test_ids_count_from_one_and_args_are_omitted_when_none(fake: Any) -> None:
    srv = fake(lambda req: ok(req, {"echo": req.get("args")}))
    with Client(srv.path, timeout=5) as c:
        assert c.request("ping") == {"echo": None}
        assert c.request("status", {"key": "k"}) == {"echo": {"key": "k"}}
    assert [r["id"] for r in srv.requests] == [1, 2]
    assert "args" not in srv.requests[0]


@pytest.mark.timeout(10)
def test_error_response_raises_its_typed_error(fake: Any) -> None:
    srv = fake(lambda req: [{"id": req["id"], "ok": False,
                             "error": {"code": "invalid", "message": "bad",
                                       "details": {"field": "subscription.pool_size"}}}])
    with Client(srv.path, timeout=5) as c:
        with pytest.raises(Invalid) as ei:
            c.request("start", {"subscription": {}})
        assert ei.value.code == "invalid" and ei.value.message == "bad"
        assert ei.value.details == {"field": "subscription.pool_size"}
        # the connection stays usable after an ordinary error
        with pytest.raises(Invalid):
            c.request("start", {"subscription": {}})
    assert [r["id"] for r in srv.requests] == [1, 2]


@pytest.mark.timeout(10)
def test_unknown_error_code_is_a_plain_emitter_error(fake: Any) -> None:
    srv = fake(lambda req: [{"id": req["id"], "ok": False,
                             "error": {"code": "brand_new", "message": "m"}}])
    with pytest.raises(EmitterError) as ei:
        Client(srv.path, timeout=5).ping()
    assert type(ei.value) is EmitterError and ei.value.code == "brand_new"


@pytest.mark.timeout(10)
def test_connection_level_error_with_id_0(fake: Any) -> None:
    srv = fake(lambda req: [{"id": 0, "ok": False,
                             "error": {"code": "permission_denied", "message": "uid 1000"}}])
    c = Client(srv.path, timeout=5)
    with pytest.raises(PermissionDenied):
        c.ping()
    assert not c.connected


@pytest.mark.timeout(10)
def test_response_with_wrong_id_is_a_protocol_violation(fake: Any) -> None:
    srv = fake(lambda req: ok(dict(req, id=req["id"] + 5), None))
    c = Client(srv.path, timeout=5)
    with pytest.raises(ProtocolViolation):
        c.ping()
    assert not c.connected


@pytest.mark.timeout(10)
def test_eof_before_the_response_is_unreachable(fake: Any) -> None:
    srv = fake(lambda req: None)
    with pytest.raises(Unreachable):
        Client(srv.path, timeout=5).ping()


@pytest.mark.timeout(10)
def test_no_answer_raises_timeout_error_and_reconnects_next_time(fake: Any) -> None:
    answers = iter([[], [], ])

    def respond(req: dict) -> Any:
        if req["op"] == "slow":
            return next(answers, [])
        return ok(req, "fine")

    srv = fake(respond)
    c = Client(srv.path, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        c.request("slow")
    assert time.monotonic() - t0 < 3
    assert not c.connected
    time.sleep(0.3)     # the fake serves one connection at a time; let it see the close
    assert c.request("ping") == "fine"
    assert srv.requests[-1]["id"] == 1, "a new connection counts ids from 1 again"


@pytest.mark.timeout(10)
def test_pipeline_returns_results_and_errors_in_order(fake: Any) -> None:
    def respond(req: dict) -> Any:
        if req["op"] == "bad":
            return [{"id": req["id"], "ok": False, "error": {"code": "not_found", "message": "x"}}]
        return ok(req, req["id"])

    srv = fake(respond)
    with Client(srv.path, timeout=5) as c:
        res = c.pipeline([("a", None), ("bad", {"key": "k"}), ("c", {})])
    assert res[0] == 1 and res[2] == 3
    assert isinstance(res[1], NotFound)
    assert [r["id"] for r in srv.requests] == [1, 2, 3]


@pytest.mark.timeout(10)
def test_error_classes_cover_every_protocol_code() -> None:
    from emitterd.errors import CODES
    assert set(cl.ERROR_CLASSES) == set(CODES)
    for code, cls in cl.ERROR_CLASSES.items():
        e = cl.error_from_wire({"code": code, "message": "m", "details": {"k": 1}}, 7)
        assert type(e) is cls and e.code == code and e.details == {"k": 1} and e.request_id == 7


class FakeWorker:
    """Plays a pool worker connecting to a unix subscriber."""

    def __init__(self, path: str, worker: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.dec = Decoder()
        self.sock.sendall(encode({"op": "hello", "key": "k" * 16, "name": "n", "worker": worker}))

    def send_events(self, evs: List[Dict[str, Any]]) -> None:
        self.sock.sendall(encode({"op": "events", "key": "k" * 16, "events": evs}))

    def recv(self) -> dict:
        while True:
            f = self.dec.next()
            if f is not None:
                return f
            data = self.sock.recv(65536)
            assert data, "subscriber closed the connection"
            self.dec.feed(data)

    def close(self) -> None:
        self.sock.close()


def _ev(pos: int, **data: Any) -> Dict[str, Any]:
    return {"position": pos, "id": "id-%d" % pos, "stream": "s", "version": pos - 1, "type": "t",
            "data": data, "metadata": {}, "tags": [], "timestamp": 0, "attempt": 1}


@pytest.mark.timeout(20)
def test_serve_subscriber_batches_acks_and_maps_handler_results(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "sub.sock")
    # a stale socket file is replaced
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()
    seen: List[int] = []
    hellos: List[dict] = []

    def handler(e: Dict[str, Any]) -> Any:
        seen.append(e["position"])
        how = e["data"].get("how")
        if how == "raise":
            raise ValueError("boom")
        if how == "park":
            return ("nack", "park", "nope")
        if how == "skip":
            return ("nack", "skip")
        return None if e["position"] % 2 else "ack"

    stop, ready = threading.Event(), threading.Event()
    t = threading.Thread(target=serve_subscriber, args=(path, handler),
                         kwargs={"stop": stop, "ready": ready, "on_hello": hellos.append},
                         daemon=True)
    t.start()
    assert ready.wait(5)
    w0, w1 = FakeWorker(path, 0), FakeWorker(path, 1)   # several connections at once
    try:
        w0.send_events([_ev(1), _ev(2), _ev(3, how="raise"), _ev(4, how="park"),
                        _ev(5, how="skip"), _ev(6)])
        frames = [w0.recv() for _ in range(4)]
        by_op: Dict[Any, dict] = {}
        for f in frames:
            by_op[(f["op"], f.get("action"))] = f
        assert by_op[("ack", None)]["positions"] == [1, 2, 6]
        assert by_op[("nack", "retry")]["positions"] == [3]
        assert by_op[("nack", "retry")]["reason"] == "boom"
        assert by_op[("nack", "park")]["positions"] == [4]
        assert by_op[("nack", "park")]["reason"] == "nope"
        assert by_op[("nack", "skip")]["positions"] == [5]
        w1.send_events([_ev(7), _ev(8)])
        assert w1.recv() == {"op": "ack", "positions": [7, 8]}
        assert sorted(h["worker"] for h in hellos) == [0, 1]
    finally:
        w0.close()
        w1.close()
        stop.set()
        t.join(5)
    assert not t.is_alive()
    assert not os.path.exists(path), "serve_subscriber removes its socket file"


# ---- against the real daemon -------------------------------------------------

@pytest.mark.timeout(60)
def test_ping(daemon: Any) -> None:
    r = daemon.client().ping()
    for k in ("version", "pid", "store_id", "uptime", "head"):
        assert k in r, r
    assert r["pid"] == daemon.proc.pid


@pytest.mark.timeout(60)
def test_typed_errors(daemon: Any) -> None:
    c = daemon.client()
    with pytest.raises(NotFound):
        c.status(UNKNOWN_KEY)
    with pytest.raises(NotFound):
        c.status("not-a-key")
    with pytest.raises(Invalid) as ei:
        c.start({"name": "x", "type": "stream", "selector": "s", "pool_size": 0})
    assert ei.value.details["field"] == "subscription.pool_size"
    with pytest.raises(Invalid) as ei:
        c.publish([{"stream": "", "type": "t"}])
    assert ei.value.details["field"] == "events.0.stream"
    pool = start_sub(c, "twice")
    with pytest.raises(AlreadyStarted) as ei:
        start_sub(c, "twice")
    assert ei.value.details["key"] == pool["key"]
    # an error leaves the connection usable
    assert c.ping()["pid"] == daemon.proc.pid


@pytest.mark.timeout(60)
def test_start_status_update_stop(daemon: Any) -> None:
    c = daemon.client()
    pool = start_sub(c, "lifecycle", pool_size=2)
    key = pool["key"]
    assert len(key) == 16 and pool["subscription"]["options"]["batch_size"] == 64
    st = wait_ready(c, key, 2)
    pids = sorted(w["pid"] for w in st["workers"])
    for pid in pids:
        daemon.track(pid)
    up = c.update(key, pool_size=3, options={"batch_size": 5})
    assert up["subscription"]["pool_size"] == 3
    assert up["subscription"]["options"]["batch_size"] == 5
    st = wait_ready(c, key, 3)
    assert set(pids) <= {w["pid"] for w in st["workers"]}
    assert [p["key"] for p in c.list()["subscriptions"]] == [key]
    stopped = c.stop(key)
    assert stopped["state"] == "stopped" and stopped["workers"] == []
    c.stop(key, delete=True)
    with pytest.raises(NotFound):
        c.status(key)


@pytest.mark.timeout(60)
def test_stop_by_triple(daemon: Any) -> None:
    c = daemon.client()
    pool = start_sub(c, "triple")
    st = c.stop(subscription={"name": "triple", "type": "stream", "selector": "$all"})
    assert st["key"] == pool["key"] and st["state"] == "stopped"


@pytest.mark.timeout(60)
def test_pipelining(daemon: Any) -> None:
    c = daemon.client()
    res = c.pipeline([("ping", None),
                      ("publish", {"events": events(3)}),
                      ("status", {"key": UNKNOWN_KEY}),
                      ("publish", {"events": events(2)}),
                      ("no_such_op", None),
                      ("ping", None)])
    assert res[0]["pid"] == daemon.proc.pid
    assert res[1]["positions"] == [1, 2, 3]
    assert isinstance(res[2], NotFound)
    assert res[3]["positions"] == [4, 5]
    assert isinstance(res[4], cl.UnknownOp)
    assert res[5]["head"] == 5


@pytest.mark.timeout(60)
def test_big_pipeline_does_not_deadlock(daemon: Any) -> None:
    c = daemon.client()
    n = 2000
    res = c.pipeline([("publish", {"events": events(5, stream="big-%d" % i)}) for i in range(n)])
    assert all(isinstance(r, dict) for r in res), [r for r in res if not isinstance(r, dict)][:3]
    assert res[-1]["positions"][-1] == 5 * n


@pytest.mark.timeout(60)
def test_publish_expected_version_conflict(daemon: Any) -> None:
    c = daemon.client()
    r = c.publish(events(2, stream="ev"), expected_version=-1)
    assert r["versions"] == [0, 1]
    with pytest.raises(cl.Conflict):
        c.publish(events(1, stream="ev"), expected_version=0)


@pytest.mark.timeout(60)
def test_attach_right_after_start_waits_for_the_first_worker(daemon: Any) -> None:
    """start answers with the pool running; an attach sent at once waits for a worker to be
    ready instead of failing (PROTOCOL §2: unavailable is for a pool that is not running),
    and a request pipelined behind a refused attach is still answered."""
    c = daemon.client()
    for i in range(5):
        key = start_sub(c, "eager-%d" % i, selector="e-%d" % i)["key"]
        c.publish(events(2, stream="e-%d" % i))
        with c.attach(key) as consumer:
            batch = next(consumer.batches(timeout=10))
            consumer.ack([e["position"] for e in batch])
            assert {e["stream"] for e in batch} == {"e-%d" % i}, batch
    stopped = start_sub(c, "stopped")["key"]
    c.stop(stopped)
    res = c.pipeline([("attach", {"key": stopped}), ("ping", None)])
    assert isinstance(res[0], cl.Unavailable) and res[1]["head"] >= 10, res


@pytest.mark.timeout(60)
def test_misuse_gets_a_named_error_not_a_dead_connection(make_daemon: Any) -> None:
    """A frame over max_frame_bytes is FrameTooLarge (in a pipeline, for it and the requests
    after it, with the answers before it kept), not Unreachable (whose advice is to retry);
    ping and metrics refuse unknown arguments like every other op; Consumer.nack refuses an
    action the daemon would close the connection over, and the daemon's log names what was
    wrong with a bad nack."""
    d = make_daemon("--max-frame-bytes", "262144", "--max-event-bytes", "65536")
    c = d.client()
    big = {"events": [{"stream": "big", "type": "t", "data": "x" * 1000}] * 4000}  # 4 MB
    with pytest.raises(cl.FrameTooLarge):
        c.request("publish", big)
    res = c.pipeline([("ping", None), ("publish", big), ("ping", None)])
    assert res[0]["head"] == 0 and isinstance(res[1], cl.FrameTooLarge) \
        and isinstance(res[2], cl.FrameTooLarge), res
    for op in ("ping", "metrics"):
        with pytest.raises(cl.Invalid) as ei:
            c.request(op, {"x": 1})
        assert ei.value.details == {"field": "x"}
    key = start_sub(c, "nacker")["key"]
    c.publish(events(1))
    with c.attach(key) as consumer:
        batch = next(consumer.batches(timeout=10))
        with pytest.raises(ValueError):
            consumer.nack([batch[0]["position"]], action="drop")
        consumer._send({"op": "nack", "positions": [batch[0]["position"]], "action": "drop"})
        assert consumer.recv(timeout=10) is None and consumer.closed_by_peer
    wait_for(lambda: "nack with action 'drop' (retry, park or skip)" in open(d.log_path).read(),
             10, "the log naming the bad nack action")
    assert c.ping()["head"] == 1


@pytest.mark.timeout(60)
def test_consumer_acks_move_the_checkpoint(daemon: Any) -> None:
    c = daemon.client()
    key = start_sub(c, "attached")["key"]
    wait_ready(c, key)
    positions = c.publish(events(10, stream="a-1") + events(10, stream="a-2"))["positions"]
    with c.attach(key) as consumer:
        assert consumer.key == key and isinstance(consumer.worker, int)
        got: List[Dict[str, Any]] = []
        for batch in consumer.batches(timeout=10):
            got.extend(batch)
            consumer.ack([e["position"] for e in batch])
            if len(got) >= len(positions):
                break
        assert sorted(e["position"] for e in got) == positions
        assert all(e["attempt"] == 1 for e in got)
        st = wait_checkpoint(c, key, positions[-1])
        assert st["in_flight"] == 0
        assert sum(w["consumers"] for w in st["workers"]) == 1
    # the control connection of `c` was not turned into a consumer
    assert c.ping()["head"] == positions[-1]


@pytest.mark.timeout(60)
def test_consumer_nack_retry_comes_back(daemon: Any) -> None:
    c = daemon.client()
    key = start_sub(c, "nacker", options={"retry_backoff": [0.05, 0.1]})["key"]
    wait_ready(c, key)
    pos = c.publish(events(1))["positions"][0]
    with c.attach(key) as consumer:
        it = iter(consumer)
        first = next(it)
        assert first["position"] == pos and first["attempt"] == 1
        consumer.nack([pos], "retry", reason="later")
        again = next(it)
        assert again["position"] == pos and again["attempt"] == 2
        consumer.ack([pos])
        wait_checkpoint(c, key, pos)


@pytest.mark.timeout(60)
def test_consumer_acks_take_only_int_positions(daemon: Any) -> None:
    """int() would have acked position 7 for 7.9, an event the program never handled."""
    c = daemon.client()
    key = start_sub(c, "strict")["key"]
    wait_ready(c, key)
    pos = c.publish(events(1))["positions"][0]
    with c.attach(key) as consumer:
        ev = next(iter(consumer))
        assert ev["position"] == pos
        for bad in ([pos + 0.9], [str(pos)], [ev], [True]):
            with pytest.raises(TypeError, match="positions must be ints"):
                consumer.ack(bad)
            with pytest.raises(TypeError, match="positions must be ints"):
                consumer.nack(bad, "skip")
        with pytest.raises(ValueError, match="out of range"):     # not a raw OverflowError
            consumer.ack([2 ** 70])
        st = c.status(key)                 # nothing went out: the event is still in flight
        assert st["in_flight"] == 1 and st["checkpoint"] == pos - 1, st
        consumer.ack([pos])
        wait_checkpoint(c, key, pos)


@pytest.mark.timeout(60)
def test_attach_errors(daemon: Any, short_tmp: str) -> None:
    c = daemon.client()
    with pytest.raises(NotFound):
        c.attach(UNKNOWN_KEY)
    with pytest.raises(Invalid) as missing:        # as every op that takes a key answers
        c.request("attach", {})
    assert missing.value.details == {"field": "key"}
    pushed = start_sub(c, "pushed", subscriber="unix:" + os.path.join(short_tmp, "nobody.sock"))
    with pytest.raises(Invalid):
        c.attach(pushed["key"])
    stopped = start_sub(c, "stopped")
    c.stop(stopped["key"])
    with pytest.raises(cl.Unavailable):
        c.attach(stopped["key"])


@pytest.mark.timeout(90)
def test_serve_subscriber_receives_and_acks(daemon: Any, short_tmp: str) -> None:
    path = os.path.join(short_tmp, "sub.sock")
    got: List[Dict[str, Any]] = []
    hellos: List[dict] = []
    lock = threading.Lock()

    def handler(e: Dict[str, Any]) -> None:
        with lock:
            got.append(e)

    stop, ready = threading.Event(), threading.Event()
    t = threading.Thread(target=serve_subscriber, args=(path, handler),
                         kwargs={"stop": stop, "ready": ready, "on_hello": hellos.append},
                         daemon=True)
    t.start()
    try:
        assert ready.wait(5)
        c = daemon.client()
        key = start_sub(c, "pushed", subscriber="unix:" + path, pool_size=2,
                        options={"batch_size": 7})["key"]
        positions = c.publish([e for i in range(8) for e in events(25, stream="p-%d" % i)])[
            "positions"]
        st = wait_checkpoint(c, key, positions[-1], timeout=30)
        assert st["checkpoint"] == st["head"] == positions[-1]
        with lock:
            assert sorted(e["position"] for e in got) == positions
        assert sorted(h["worker"] for h in hellos) == [0, 1]
        assert all(h["key"] == key for h in hellos)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


@pytest.mark.timeout(60)
def test_a_nack_reason_must_be_a_string_and_is_kept_to_1000_characters(daemon: Any) -> None:
    """PROTOCOL §3: reason is a str; a nack with another one is not a valid frame (the
    connection closes, its events come again), not a Python repr stored as the reason."""
    c = daemon.client()
    key = start_sub(c, "reasons", options={"max_retries": 0})["key"]
    wait_ready(c, key)
    ps = c.publish(events(2))["positions"]
    with c.attach(key) as consumer:
        with pytest.raises(TypeError, match="reason must be a str"):
            consumer.nack(ps[:1], "park", reason=5)     # type: ignore[arg-type]
        got = sorted(e["position"] for e in next(consumer.batches(timeout=10)))
        assert got == ps
        consumer._send({"op": "nack", "positions": ps[:1], "action": "park",
                        "reason": {"a": [1]}})
        assert consumer.recv(timeout=10) is None, "the daemon kept the connection open"
    wait_for(lambda: c.status(key)["in_flight"] == 2 and not any(
        w["consumers"] for w in c.status(key)["workers"]), 10, "the events to be free again")
    assert c.status(key)["parked"] == 0
    with c.attach(key) as consumer:
        again = {e["position"]: e["attempt"] for e in next(consumer.batches(timeout=10))}
        assert again == {p: 2 for p in ps}
        consumer.nack(ps[:1], "park", reason="x" * 5000)
        consumer.ack(ps[1:])
        wait_checkpoint(c, key, ps[-1])
    (parked,) = c.parked(key)["events"]
    assert parked["position"] == ps[0]
    assert parked["reason"] == "x" * 997 + "..."


@pytest.mark.timeout(60)
def test_a_client_reconnects_for_its_first_request_after_a_daemon_restart(
        make_daemon: Any) -> None:
    """The daemon closed the idle connection when it stopped: the next request must go on
    a new connection, not into the dead one and back as Unreachable "lost before a
    response" (for a publish: "may or may not be stored", though nobody got it)."""
    d = make_daemon()
    c = d.client()
    first = c.ping()["pid"]
    assert d.stop() == 0
    d.start()
    assert c.ping()["pid"] == d.proc.pid != first
    assert c.publish([{"stream": "after", "type": "t"}])["positions"] == [1]
    assert d.stop() == 0
    d.start()
    ping, status = c.pipeline([("ping", None), ("status", {"key": "0123456789abcdef"})])
    assert ping["pid"] == d.proc.pid and isinstance(status, NotFound), (ping, status)


# ---- against a real daemon: serve_subscriber, Consumer threads, a full accept queue ------

def _serve(path: str, handler: Any, **kw: Any) -> Any:
    """serve_subscriber in a thread; returns (thread, stop, outcome dict)."""
    stop, ready = threading.Event(), threading.Event()
    outcome: Dict[str, Any] = {}

    def run() -> None:
        try:
            serve_subscriber(path, handler, stop=stop, ready=ready, **kw)
            outcome["returned"] = True
        except BaseException as e:  # noqa: BLE001 - what the test looks at
            outcome["raised"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(5)
    return t, stop, outcome


@pytest.mark.timeout(60)
def test_serve_subscriber_survives_a_handler_exception_whose_message_is_not_utf8(
        daemon: Any, short_tmp: str) -> None:
    """serve_subscriber's docstring: "an exception nacks it with retry and reason str(exc)".
    An exception message holding a surrogate escape (os.fsdecode of a non-UTF-8 file name,
    a very common source of messages) makes encode() of the nack frame raise
    UnicodeEncodeError out of serve_subscriber: the whole subscriber server dies, every
    worker's connection drops, and the event comes back and kills it again."""
    path = os.path.join(short_tmp, "sub.sock")
    seen: List[int] = []

    def handler(e: Dict[str, Any]) -> None:
        seen.append(e["position"])
        if e["data"] == "bad-name" and e["attempt"] == 1:
            raise FileNotFoundError("no such file: " + os.fsdecode(b"report-\xff.csv"))

    t, stop, outcome = _serve(path, handler)
    try:
        c = daemon.client()
        key = c.start({"name": "fsdecode", "type": "stream", "selector": "fs",
                       "subscriber": "unix:" + path,
                       "options": {"retry_backoff": [0.1, 0.1]}})["key"]
        pos = c.publish([{"stream": "fs", "type": "t", "data": "bad-name"},
                         {"stream": "fs", "type": "t", "data": "fine"}])["positions"]
        wait_for(lambda: len(seen) >= 2 or "raised" in outcome, 15, "the events to be handled")
        time.sleep(0.3)
        assert "raised" not in outcome, (
            "serve_subscriber died on a handler exception: %r" % (outcome.get("raised"),))
        wait_for(lambda: c.status(key)["checkpoint"] == pos[-1], 15,
                 "the retried event to be handled and acked")
    finally:
        stop.set()
        t.join(5)


@pytest.mark.timeout(60)
def test_serve_subscriber_does_not_let_events_it_handled_in_time_be_parked(
        daemon: Any, short_tmp: str) -> None:
    """serve_subscriber: a handler returning None "acks" the event. It sends that ack only
    after the handler has run for every event of the frame, so with a handler that takes
    0.3 s and ack_timeout 1 s, the FIRST event of a 10-event frame (handled 0.3 s after it
    arrived) times out and is parked as "max_retries" (max_retries 0), though the handler
    accepted it well within ack_timeout. Every event of the frame ends parked, delivered 0."""
    path = os.path.join(short_tmp, "sub.sock")
    handled_at: Dict[int, float] = {}

    def handler(e: Dict[str, Any]) -> None:
        time.sleep(0.3)
        handled_at.setdefault(e["position"], time.monotonic())

    t, stop, outcome = _serve(path, handler)
    try:
        c = daemon.client()
        key = c.start({"name": "slow", "type": "stream", "selector": "slow",
                       "subscriber": "unix:" + path,
                       "options": {"ack_timeout": 1.0, "max_retries": 0}})["key"]
        wait_for(lambda: c.status(key)["workers"][0]["consumers"] == 1, 10, "the connection")
        pos = c.publish([{"stream": "slow", "type": "t", "data": i} for i in range(10)])[
            "positions"]
        wait_for(lambda: c.status(key)["checkpoint"] == pos[-1], 30, "every event handled")
        parked = {e["position"]: e["reason"] for e in c.parked(key)["events"]}
        assert pos[0] in handled_at
        assert pos[0] not in parked, (
            "event %d was accepted by the handler 0.3 s after delivery (ack_timeout 1 s) but "
            "parked with reason %r; parked: %s" % (pos[0], parked.get(pos[0]), sorted(parked)))
    finally:
        stop.set()
        t.join(15)


@pytest.mark.timeout(60)
def test_consumer_close_from_another_thread_ends_a_blocked_iteration(daemon: Any) -> None:
    """Consumer.close(): "Close the connection"; iterating "ends when ... the connection"
    closes. The usual way to stop a consumer loop running in a thread is close() from
    another thread; the loop blocked in recv() (epoll_wait, no idle limit) never wakes: it
    hangs for good, even after the pool is deleted (its fd and selector are already
    closed, so the daemon's close cannot reach it)."""
    c = daemon.client()
    key = c.start({"name": "thr", "type": "stream", "selector": "thr"})["key"]
    wait_for(lambda: c.status(key)["workers"] and
             c.status(key)["workers"][0]["state"] == "ready", 10, "a ready worker")
    cons = c.attach(key)
    out: List[Any] = []

    def consume() -> None:
        try:
            for ev in cons:
                out.append(ev["position"])
                cons.ack([ev["position"]])
            out.append("ended")
        except BaseException as e:  # noqa: BLE001
            out.append(e)
    th = threading.Thread(target=consume, daemon=True)
    th.start()
    (p,) = c.publish([{"stream": "thr", "type": "t"}])["positions"]
    wait_for(lambda: p in out, 10, "the event")
    cons.close()
    th.join(5)
    alive = th.is_alive()
    c.stop(key, delete=True)
    assert not alive, "the consumer loop still blocks 5 s after close(): %r" % (out,)


@pytest.mark.timeout(60)
def test_client_timeout_holds_while_the_daemons_accept_queue_is_full(daemon: Any) -> None:
    """Client: `timeout` "bounds each request"; Unreachable means no socket file, nobody
    listening, no permission, or a lost connection. A live daemon whose listen backlog is
    momentarily full (a burst of connections from one process) makes connect() fail with
    EAGAIN, which the client turns at once (0 s of a 10 s timeout) into
    Unreachable("cannot connect ...: Resource temporarily unavailable"), so emitterctl
    would say the daemon could not be reached while it runs fine."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    opened: List[Client] = []
    failures: List[BaseException] = []
    try:
        for _ in range(600):
            cl = Client(daemon.socket, timeout=10)
            try:
                cl.connect()
                opened.append(cl)
            except (Unreachable, TimeoutError) as e:
                failures.append(e)
                break
    finally:
        for cl in opened:
            cl.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert daemon.proc.poll() is None                          # it was alive throughout
    assert not failures, ("connect %d failed on a live daemon with timeout 10: %r"
                          % (len(opened) + 1, failures[0]))


@pytest.mark.timeout(30)
def test_encode_error_is_public_and_documented_by_help() -> None:
    """emitterd.client documents itself through help() and its docstrings; EncodeError is
    what every request with an un-encodable value raises ("nothing was sent"), yet it is
    missing from __all__: `from emitterd.client import *` does not bring it, and
    help(emitterd.client) (pydoc lists only __all__) never shows the class."""
    import pydoc

    import emitterd.client as cl
    own = sorted(n for n in dir(cl) if not n.startswith("_") and isinstance(getattr(cl, n), type)
                 and getattr(cl, n).__module__ == cl.__name__)
    missing = sorted(set(own) - set(cl.__all__))
    assert not missing, "public classes missing from __all__: %s" % missing
    text = pydoc.render_doc(cl, renderer=pydoc.plaintext)
    assert "class EncodeError" in text, "help(emitterd.client) does not document EncodeError"


@pytest.mark.timeout(60)
def test_a_map_with_a_tuple_key_is_refused_with_a_true_reason(daemon: Any) -> None:
    """A tuple map key encodes (msgpack allows any key type: the payload is one valid
    msgpack map), the daemon refuses it (README: a publish is checked for "hashable map
    keys"), but what the user gets is BadFrame "payload is not valid msgpack (TypeError)"
    and a dropped connection: neither the EncodeError that the client raises, before
    sending, for other values the daemon cannot take, nor a message naming the map key."""
    from emitterd.client import BadFrame, EncodeError
    c = daemon.client()
    with pytest.raises((EncodeError, BadFrame)) as info:
        c.publish([{"stream": "k", "type": "t", "data": {(1, 2): "point"}}])
    msg = str(info.value)
    assert "not valid msgpack" not in msg, (
        "a valid msgpack payload is reported as invalid msgpack: %r" % msg)
    assert "key" in msg, "the error does not say the map key is the problem: %r" % msg
