"""Test-side helpers for the event path (PROTOCOL §3) against a real daemon.

* :class:`Subscriber` plays a ``subscriber: "unix:/path"`` program: a
  thread-based Unix socket server that accepts any number of worker
  connections, records each connection's ``hello`` and every delivered event
  (with the frame it came in and the time it arrived), and answers each event
  per a policy function ``policy(event, conn) -> ACK | HOLD | ("nack", action[, reason])``.
  HOLD sends nothing (the test may ``conn.ack(...)`` later).
* :class:`ConsumerThread` is an attached consumer (``attach``) driven by a
  thread with the same kind of policy; every write happens on that thread.
* :func:`wait_until` / :func:`wait_status` poll with a deadline.

Everything is ended by ``close()``; the fixtures in the test modules call it.
"""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import pytest

from emitterd.client import Client
from emitterd.framing import Decoder, encode
from waits import wait_until  # noqa: E402

ACK = "ack"
HOLD = "hold"

EVENT_KEYS = {"position", "id", "stream", "version", "type", "data", "metadata", "tags",
              "timestamp", "attempt"}

Policy = Callable[[Dict[str, Any], Any], Any]


def ack_all(event: Dict[str, Any], conn: Any) -> Any:
    return ACK


def hold_all(event: Dict[str, Any], conn: Any) -> Any:
    return HOLD


def _short(obj: Any, limit: int = 600) -> str:
    s = repr(obj)
    return s if len(s) <= limit else s[:limit] + "..."


def wait_status(c: Client, key: str, pred: Callable[[Dict[str, Any]], Any], timeout: float = 15.0,
                what: str = "pool status") -> Dict[str, Any]:
    """Poll the pool status of `key` until pred(status) holds; return that status."""
    box: Dict[str, Any] = {}

    def check() -> Any:
        st = c.status(key)
        box["last"] = st
        return st if pred(st) else None
    try:
        return wait_until(check, timeout, what)
    except AssertionError as e:
        st = box.get("last") or {}
        brief = {k: st.get(k) for k in ("state", "checkpoint", "head", "in_flight", "delivered",
                                        "retried", "parked", "restarts")}
        raise AssertionError("%s; last status %r" % (e, brief)) from None


def wait_checkpoint(c: Client, key: str, position: Optional[int] = None,
                    timeout: float = 15.0) -> Dict[str, Any]:
    """Wait until the checkpoint of `key` is `position` (default: the head) and nothing is
    in flight."""
    def ok(st: Dict[str, Any]) -> bool:
        target = st["head"] if position is None else position
        return st["checkpoint"] == target and st["in_flight"] == 0
    return wait_status(c, key, ok, timeout,
                       "checkpoint == %s and in_flight == 0" % ("head" if position is None
                                                                else position))


def wait_workers_ready(c: Client, key: str, n: int, timeout: float = 15.0) -> Dict[str, Any]:
    return wait_status(c, key, lambda st: st["state"] == "running" and len(st["workers"]) == n
                       and all(w["state"] == "ready" for w in st["workers"]), timeout,
                       "%d ready workers" % n)


def sub_spec(name: str, type: str = "stream", selector: Any = "$all", subscriber: Any = None,
             pool_size: Optional[int] = None, start_from: Any = "origin", **options: Any
             ) -> Dict[str, Any]:
    s: Dict[str, Any] = {"name": name, "type": type, "selector": selector,
                         "start_from": start_from}
    if subscriber is not None:
        s["subscriber"] = subscriber
    if pool_size is not None:
        s["pool_size"] = pool_size
    if options:
        s["options"] = options
    return s


def events(n: int, stream: str = "s-1", etype: str = "t", start: int = 0) -> List[Dict[str, Any]]:
    return [{"stream": stream, "type": etype, "data": {"i": start + i}} for i in range(n)]


# ---- unix subscriber ---------------------------------------------------------

class SubConn:
    """One worker connection accepted by a Subscriber."""

    def __init__(self, sub: "Subscriber", cid: int, sock: socket.socket) -> None:
        self.sub = sub
        self.id = cid
        self.sock = sock
        self.hello: Optional[Dict[str, Any]] = None
        self.first_op: Any = None
        self.frames: List[Dict[str, Any]] = []     # every events frame, in order
        self.events: List[Dict[str, Any]] = []     # every delivered event, in order
        self.held: List[int] = []                  # positions the policy answered HOLD
        self.closed = False
        self._lock = threading.Lock()

    @property
    def worker(self) -> Any:
        return None if self.hello is None else self.hello.get("worker")

    @property
    def key(self) -> Any:
        return None if self.hello is None else self.hello.get("key")

    def send(self, obj: Dict[str, Any]) -> bool:
        data = encode(obj)
        with self._lock:
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                return False

    def ack(self, positions: Sequence[int]) -> bool:
        ok = self.send({"op": "ack", "positions": list(positions)})
        if ok:
            with self.sub.cond:
                self.sub.acked.extend(positions)
                self.sub.cond.notify_all()
        return ok

    def nack(self, positions: Sequence[int], action: str = "retry",
             reason: Optional[str] = None) -> bool:
        msg: Dict[str, Any] = {"op": "nack", "positions": list(positions), "action": action}
        if reason is not None:
            msg["reason"] = reason
        return self.send(msg)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class Subscriber:
    """A `unix:` subscriber program for tests (see the module docstring)."""

    def __init__(self, path: str, policy: Optional[Policy] = None, listen: bool = True) -> None:
        self.path = path
        self.uri = "unix:" + path
        self.policy: Policy = policy or ack_all
        self.cond = threading.Condition()
        self.conns: List[SubConn] = []
        self.deliveries: List[Tuple[SubConn, Dict[str, Any], float]] = []   # (conn, event, t)
        self.acked: List[int] = []
        self.errors: List[str] = []
        self._listener: Optional[socket.socket] = None
        self._stop = threading.Event()
        self._threads: List[threading.Thread] = []
        if listen:
            self.listen()

    # -- lifecycle
    def listen(self) -> None:
        """Bind and listen on the path (again, after shutdown())."""
        self._stop.clear()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.path)
        s.listen(64)
        s.settimeout(0.1)
        self._listener = s
        t = threading.Thread(target=self._accept_loop, args=(s,), daemon=True,
                             name="sub-accept")
        t.start()
        self._threads.append(t)

    def shutdown(self) -> None:
        """Close every connection and the listening socket (the records stay)."""
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.close()
            except OSError:
                pass
            self._listener = None
        with self.cond:
            conns = list(self.conns)
        for c in conns:
            c.close()
        for t in self._threads:
            t.join(timeout=3)
        self._threads = []
        try:
            os.unlink(self.path)
        except OSError:
            pass

    close = shutdown

    # -- threads
    def _accept_loop(self, lsock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            sock.settimeout(0.1)
            with self.cond:
                conn = SubConn(self, len(self.conns), sock)
                self.conns.append(conn)
                self.cond.notify_all()
            t = threading.Thread(target=self._conn_loop, args=(conn,), daemon=True,
                                 name="sub-conn-%d" % conn.id)
            t.start()
            self._threads.append(t)

    def _conn_loop(self, conn: SubConn) -> None:
        dec = Decoder(1 << 30)
        try:
            while not self._stop.is_set():
                try:
                    data = conn.sock.recv(1 << 20)
                except socket.timeout:
                    continue
                except OSError:
                    break
                if not data:
                    break
                dec.feed(data)
                while True:
                    try:
                        msg = dec.next()
                    except Exception as e:  # noqa: BLE001 - recorded, connection dropped
                        self._error(conn, "undecodable frame: %r" % (e,))
                        return
                    if msg is None:
                        break
                    self._handle(conn, msg)
        finally:
            with self.cond:
                conn.closed = True
                self.cond.notify_all()
            conn.close()

    def _error(self, conn: SubConn, text: str) -> None:
        with self.cond:
            self.errors.append("conn %d: %s" % (conn.id, text))
            self.cond.notify_all()

    def _handle(self, conn: SubConn, msg: Dict[str, Any]) -> None:
        op = msg.get("op")
        if conn.first_op is None:
            conn.first_op = op
        if op == "hello":
            with self.cond:
                if conn.hello is not None:
                    self.errors.append("conn %d: second hello %r" % (conn.id, msg))
                conn.hello = msg
                self.cond.notify_all()
            return
        if op != "events":
            self._error(conn, "unexpected frame %r" % (_short(msg, 200),))
            return
        if conn.hello is None:
            self._error(conn, "events before hello")
        evs = msg.get("events")
        if not isinstance(evs, list):
            self._error(conn, "events frame without an events list: %r" % (_short(msg, 200),))
            return
        now = time.monotonic()
        with self.cond:
            conn.frames.append(msg)
            for e in evs:
                conn.events.append(e)
                self.deliveries.append((conn, e, now))
            self.cond.notify_all()
        acks: List[int] = []
        nacks: Dict[Tuple[str, Optional[str]], List[int]] = {}
        for e in evs:
            try:
                verdict = self.policy(e, conn)
            except Exception as exc:  # noqa: BLE001 - a policy bug must show in the test
                self._error(conn, "policy raised %r" % (exc,))
                verdict = HOLD
            pos = e.get("position")
            if verdict == ACK or verdict is None:
                acks.append(pos)
            elif verdict == HOLD:
                conn.held.append(pos)
            else:
                action = verdict[1] if len(verdict) > 1 else "retry"
                reason = verdict[2] if len(verdict) > 2 else None
                nacks.setdefault((action, reason), []).append(pos)
        for (action, reason), ps in nacks.items():
            conn.nack(ps, action, reason)
        if acks:
            conn.ack(acks)

    # -- queries (thread-safe snapshots)
    def wait(self, pred: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = pred()
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("subscriber: timed out after %.1fs waiting for %s "
                                         "(%d deliveries on %d connections, errors %r)"
                                         % (timeout, what, len(self.deliveries),
                                            len(self.conns), self.errors[:5]))
                self.cond.wait(min(left, 0.1))

    def wait_hellos(self, n: int, timeout: float = 10.0,
                    key: Optional[str] = None) -> List[SubConn]:
        def ok() -> Any:
            got = [c for c in self.conns if c.hello is not None and not c.closed
                   and (key is None or c.key == key)]
            return got if len(got) >= n else None
        return self.wait(ok, timeout, "%d open connections with hello" % n)

    def wait_count(self, n: int, timeout: float = 10.0, key: Optional[str] = None,
                   pred: Optional[Callable[[Dict[str, Any]], bool]] = None) -> None:
        def ok() -> bool:
            return len(self._select(key, pred)) >= n
        self.wait(ok, timeout, "%d deliveries" % n)

    def _select(self, key: Optional[str] = None,
                pred: Optional[Callable[[Dict[str, Any]], bool]] = None) -> List[Dict[str, Any]]:
        return [e for c, e, _ in self.deliveries
                if (key is None or c.key == key) and (pred is None or pred(e))]

    def delivered(self, key: Optional[str] = None) -> List[Dict[str, Any]]:
        with self.cond:
            return self._select(key)

    def positions(self, key: Optional[str] = None) -> List[int]:
        return [e["position"] for e in self.delivered(key)]

    def by_position(self, key: Optional[str] = None) -> Dict[int, List[Dict[str, Any]]]:
        out: Dict[int, List[Dict[str, Any]]] = {}
        for e in self.delivered(key):
            out.setdefault(e["position"], []).append(e)
        return out

    def snapshot_conns(self) -> List[SubConn]:
        with self.cond:
            return list(self.conns)


# ---- attached consumer ---------------------------------------------------------

class ConsumerThread:
    """An attached consumer on its own thread: records frames and events, answers per policy.

    Commands from the test thread (ack, nack, raw frames, close) are queued and
    sent by the consumer thread, so the connection is only used by one thread.
    """

    def __init__(self, socket_path: str, key: str, policy: Optional[Policy] = None,
                 name: str = "consumer") -> None:
        self.policy: Policy = policy or ack_all
        self.consumer = Client(socket_path, timeout=10.0).attach(key)
        self.worker = self.consumer.worker
        self.name = name
        self.cond = threading.Condition()
        self.frames: List[List[Dict[str, Any]]] = []
        self.events: List[Dict[str, Any]] = []
        self.held: List[int] = []
        self.acked: List[int] = []
        self.errors: List[str] = []
        self.closed_by_peer = False
        self.done = threading.Event()
        self._cmds: "queue.Queue[Tuple[str, Any]]" = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        c = self.consumer
        try:
            while not self._stop.is_set():
                self._drain_cmds()
                if c.closed:
                    break
                try:
                    frame = c.recv(timeout=0.05)
                except TimeoutError:
                    continue
                except Exception as e:  # noqa: BLE001 - an error frame from the daemon
                    with self.cond:
                        self.errors.append(repr(e))
                        self.closed_by_peer = True
                        self.cond.notify_all()
                    break
                if frame is None:
                    with self.cond:
                        self.closed_by_peer = True
                        self.cond.notify_all()
                    break
                if frame.get("op") != "events" or not isinstance(frame.get("events"), list):
                    with self.cond:
                        self.errors.append("unexpected frame %r" % (_short(frame, 200),))
                    continue
                evs = frame["events"]
                with self.cond:
                    self.frames.append(evs)
                    self.events.extend(evs)
                    self.cond.notify_all()
                acks: List[int] = []
                for e in evs:
                    v = self.policy(e, self)
                    if v == ACK or v is None:
                        acks.append(e["position"])
                    elif v == HOLD:
                        with self.cond:
                            self.held.append(e["position"])
                    else:
                        self._send_nack([e["position"]], v[1] if len(v) > 1 else "retry",
                                        v[2] if len(v) > 2 else None)
                if acks:
                    self._send_ack(acks)
        finally:
            self.done.set()
            with self.cond:
                self.cond.notify_all()

    def _drain_cmds(self) -> None:
        while True:
            try:
                cmd, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            try:
                if cmd == "ack":
                    self._send_ack(arg)
                elif cmd == "nack":
                    self._send_nack(*arg)
                elif cmd == "raw":
                    self.consumer._send(arg)   # noqa: SLF001 - a frame that is not ack/nack
                elif cmd == "close":
                    self.consumer.close()
                    self._stop.set()
            except Exception as e:  # noqa: BLE001 - connection gone
                with self.cond:
                    self.errors.append("%s failed: %r" % (cmd, e))

    def _send_ack(self, positions: List[int]) -> None:
        self.consumer.ack(positions)
        with self.cond:
            self.acked.extend(positions)
            self.cond.notify_all()

    def _send_nack(self, positions: List[int], action: str, reason: Optional[str]) -> None:
        self.consumer.nack(positions, action, reason)

    # -- from the test thread
    def ack(self, positions: Sequence[int]) -> None:
        self._cmds.put(("ack", list(positions)))

    def ack_held(self) -> List[int]:
        with self.cond:
            held, self.held = self.held, []
        self.ack(held)
        return held

    def send_raw(self, msg: Dict[str, Any]) -> None:
        self._cmds.put(("raw", msg))

    def wait(self, pred: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                v = pred()
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("%s: timed out after %.1fs waiting for %s (%d events, "
                                         "errors %r)" % (self.name, timeout, what,
                                                         len(self.events), self.errors[:5]))
                self.cond.wait(min(left, 0.1))

    def positions(self) -> List[int]:
        with self.cond:
            return [e["position"] for e in self.events]

    def close(self) -> None:
        """Close the connection (from the consumer thread) and end the thread."""
        if not self.done.is_set():
            self._cmds.put(("close", None))
            self._thread.join(timeout=3)
        self._stop.set()
        self._thread.join(timeout=3)
        self.consumer.close()


# ---- fixtures (imported by the test modules) -----------------------------------


@pytest.fixture
def subscribers(short_tmp: str) -> Any:
    """Factory: subscribers(policy=None, name="sub", listen=True) -> Subscriber on a fresh
    socket path under short_tmp; all closed at teardown."""
    made: List[Subscriber] = []

    def factory(policy: Optional[Policy] = None, name: str = "sub",
                listen: bool = True) -> Subscriber:
        s = Subscriber(os.path.join(short_tmp, "%s.sock" % name), policy, listen)
        made.append(s)
        return s
    try:
        yield factory
    finally:
        for s in made:
            s.close()


@pytest.fixture
def consumers() -> Any:
    """Factory: consumers(daemon, key, policy=None, name=...) -> ConsumerThread; all
    closed at teardown."""
    made: List[ConsumerThread] = []

    def factory(d: Any, key: str, policy: Optional[Policy] = None,
                name: str = "consumer") -> ConsumerThread:
        ct = ConsumerThread(d.socket, key, policy, name)
        made.append(ct)
        return ct
    try:
        yield factory
    finally:
        for ct in made:
            ct.close()


def start_pool(d: Any, c: Client, spec: Dict[str, Any], ready: bool = True) -> Dict[str, Any]:
    """Start a subscription, wait for its workers to be ready (tracked for teardown)."""
    st = c.start(spec)
    if ready:
        st = wait_workers_ready(c, st["key"], spec.get("pool_size", 1))
    d.collect_children()
    return st
