"""The Python client under interrupts, timeouts, full accept queues and busy socket paths."""
from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any, List

import pytest

from emitterd.client import Client, EncodeError, ProtocolViolation
from waits import wait_for  # noqa: E402


class _Interrupt(Exception):
    """What a SIGALRM handler raises (the same path as KeyboardInterrupt on Ctrl-C)."""


def _raise(*_a: Any) -> None:
    raise _Interrupt()


def _next_request_answers(c: Client, daemon: Any, symptom: type) -> None:
    """The request after an interrupted one is answered (`symptom`: what it raised when the
    connection was left out of step)."""
    try:
        pong = c.ping()
    except symptom as e:
        pytest.fail("the request after an interrupted one raised %r" % (e,))
    assert pong["pid"] == daemon.proc.pid


def _fill_backlog(path: str) -> List[socket.socket]:
    """Connections that fill the listen backlog of a listener nobody accepts on (a stopped
    daemon, a busy program), for the caller to close."""
    held = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return held
        held.append(s)


@pytest.fixture
def alarm() -> Any:
    old = signal.signal(signal.SIGALRM, _raise)
    try:
        yield lambda seconds: signal.setitimer(signal.ITIMER_REAL, seconds)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.timeout(90)
def test_a_request_interrupted_while_waiting_does_not_poison_the_next_one(daemon: Any,
                                                                          alarm: Any) -> None:
    """Client docstring: "a request that times out raises TimeoutError and drops the
    connection (a late answer could not be matched any more)". A request interrupted by an
    exception (Ctrl-C's KeyboardInterrupt, a signal handler's exception) leaves its answer
    on the connection: the next request on the same Client reads it and raises
    ProtocolViolation ("The daemon sent something PROTOCOL.md does not allow") although
    the daemon did nothing wrong, and the connection is dropped under it."""
    c = daemon.client(timeout=60)
    key = c.start({"name": "intr", "type": "stream", "selector": "intr"})["key"]
    with c.attach(key) as consumer:
        c.publish([{"stream": "intr", "type": "t"}])
        assert next(consumer.batches(timeout=20))          # held, not acked: stop drains
        alarm(1.0)
        with pytest.raises(_Interrupt):
            c.stop(key, drain_timeout=30)                   # interrupted while draining
        alarm(0)
        _next_request_answers(c, daemon, ProtocolViolation)


@pytest.mark.timeout(120)
def test_a_request_interrupted_while_sending_does_not_swallow_the_next_one(daemon: Any,
                                                                          alarm: Any) -> None:
    """The same when the interrupt comes while the request is being sent (a large publish
    to a daemon that reads slowly; here it is SIGSTOPped for the moment): the half-sent
    frame stays on the connection and the next request's bytes become the rest of it, so
    the next request gets no answer at all (TimeoutError after the full timeout; with
    timeout=None the program hangs for good)."""
    c = daemon.client(timeout=15)
    c.ping()
    events = [{"stream": "big", "type": "t", "data": "x" * 500_000} for _ in range(8)]
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        alarm(1.0)
        with pytest.raises(_Interrupt):
            c.publish(events)                               # blocked in send(): buffer full
        alarm(0)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    _next_request_answers(c, daemon, TimeoutError)


@pytest.mark.timeout(120)
def test_a_request_timeout_bounds_the_connect_too(daemon: Any) -> None:
    """Client.request: "`timeout` overrides the client's timeout for this request"; README:
    a daemon whose accept queue is full "is waited for within the timeout (TimeoutError)".
    request(..., timeout=1) on a Client(timeout=60) whose daemon's accept queue is full
    waits the client's 60 s in connect() and then says "no answer ... within 1s"."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    held: List[socket.socket] = []
    try:
        held += _fill_backlog(daemon.socket)
        c = Client(daemon.socket, timeout=60)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            c.request("ping", timeout=1)
        took = time.monotonic() - t0
        assert took < 20, ("request(timeout=1) raised after %.0f s (the client's timeout, 60 s, "
                           "bounded its connect): %s" % (took, info.value))
    finally:
        for s in held:
            s.close()
        os.kill(daemon.proc.pid, signal.SIGCONT)


@pytest.mark.timeout(60)
def test_consumer_nack_reason_that_utf8_cannot_carry_is_an_encode_error(daemon: Any) -> None:
    """README: "a value msgpack cannot carry raises EncodeError before anything is sent".
    Consumer.nack(reason=str(exc)) where the message came from os.fsdecode (a file name that
    is not UTF-8; the very case serve_subscriber was fixed for) raises a bare
    UnicodeEncodeError from msgpack instead (Consumer._send uses encode(), not
    _encode_request()); so does Client.attach() for such a key."""
    c = daemon.client()
    key = c.start({"name": "enc", "type": "stream", "selector": "enc"})["key"]
    reason = "cannot open " + os.fsdecode(b"report-\xff.csv")
    with c.attach(key) as consumer:
        c.publish([{"stream": "enc", "type": "t"}])
        (event,) = next(consumer.batches(timeout=20))
        try:
            consumer.nack([event["position"]], "park", reason=reason)
        except EncodeError:
            pass                     # documented; nothing was sent
        except Exception as e:  # noqa: BLE001
            pytest.fail("Consumer.nack raised %s, not EncodeError: %s" % (type(e).__name__, e))
        consumer.ack([event["position"]])
    with pytest.raises(EncodeError):
        c.attach("\udc80" * 16)


@pytest.mark.timeout(60)
def test_pipeline_timeout_while_sending_counts_the_requests(daemon: Any) -> None:
    """Client.pipeline: a timeout while the requests are still being sent says
    "(0 of 0 answered)": the count of requests is lost (ids are assigned only after the
    send returns), so the message reads as if nothing had been asked."""
    c = daemon.client(timeout=2)
    c.ping()
    events = [{"stream": "s", "type": "t", "data": "x" * 500_000} for _ in range(8)]
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(TimeoutError) as info:
            c.pipeline([("publish", {"events": events}), ("publish", {"events": events})])
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert "of 2 answered" in str(info.value), str(info.value)


@pytest.mark.timeout(90)
def test_a_consumer_ack_that_timed_out_half_sent_does_not_swallow_later_acks(daemon: Any) -> None:
    """Consumer._send: an ack whose send times out (the worker did not read for the
    consumer's timeout) leaves its half-sent frame on the connection and the Consumer open.
    Every later ack then becomes bytes inside that frame: ack() returns normally, but the
    worker never sees it, so an event acked in time is delivered again (attempt 2, 3, ...)
    and, after max_retries, parked as "max_retries", though the program acked it each time.
    Expected: the consumer is closed after such a timeout (its events come again on a new
    attach, as §3 says for a closed connection), or later acks take effect."""
    c = daemon.client()
    key = c.start({"name": "halfack", "type": "stream", "selector": "halfack",
                   "options": {"ack_timeout": 3}})["key"]
    consumer = c.attach(key, timeout=1)
    try:
        (worker,) = c.status(key)["workers"]
        os.kill(worker["pid"], signal.SIGSTOP)
        try:
            with pytest.raises(TimeoutError):
                # unknown positions are ignored by the worker (§3); the frame is ~1.5 MB
                consumer.ack(list(range(10 ** 9, 10 ** 9 + 300_000)))
        finally:
            os.kill(worker["pid"], signal.SIGCONT)
        if consumer.closed:
            return                    # a clean end: nothing half-sent stays behind
        (pos,) = c.publish([{"stream": "halfack", "type": "t"}])["positions"]
        (event,) = next(consumer.batches(timeout=20))
        assert event["position"] == pos
        consumer.ack([pos])           # returns normally
        wait_for(lambda: c.status(key)["checkpoint"] >= pos, 20,
                 "the acked event to move the checkpoint (it is delivered again instead: "
                 "the ack went into the half-sent frame)")
    finally:
        consumer.close()


@pytest.mark.timeout(60)
def test_serve_subscriber_does_not_remove_a_live_but_busy_socket(short_tmp: str) -> None:
    """serve_subscriber docstring: "a stale socket file there is removed first; a live one
    or a non-socket raises OSError". _prepare_socket_path takes every OSError of its probe
    connect for "nobody listens": a live subscriber whose accept queue is full (busy, or
    momentarily stopped) makes connect() fail with EAGAIN, and its socket file is unlinked
    and taken over (the other program keeps running, unreachable; the daemon's workers now
    reach the new one). The daemon's own bind (control/server.py:_bind) unlinks only on
    ECONNREFUSED."""
    from emitterd.client import serve_subscriber
    path = os.path.join(short_tmp, "sub.sock")
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(0)
    ino = os.stat(path).st_ino
    held: List[socket.socket] = []
    stop = threading.Event()
    ready = threading.Event()
    outcome: dict = {}

    def run() -> None:
        try:
            serve_subscriber(path, lambda e: None, stop=stop, ready=ready)
            outcome["returned"] = True
        except BaseException as e:  # noqa: BLE001 - what the test looks at
            outcome["raised"] = e
    try:
        held += _fill_backlog(path)                     # the other program is busy
        t = threading.Thread(target=run, daemon=True)
        t.start()
        wait_for(lambda: ready.is_set() or outcome, 10, "serve_subscriber to start or refuse")
        assert os.path.exists(path) and os.stat(path).st_ino == ino, (
            "serve_subscriber removed the live socket of another program and listens in its "
            "place (outcome %r)" % (outcome,))
        assert isinstance(outcome.get("raised"), OSError), outcome
    finally:
        stop.set()
        for s in held:
            s.close()
        other.close()


@pytest.mark.timeout(90)
def test_timeout_none_waits_for_a_full_accept_queue(daemon: Any, alarm: Any) -> None:
    """Client(timeout=None) is documented as "None = wait forever", yet connect() gave a full
    accept queue 10 s and request() then said "no answer to 'ping' from ... within Nones"
    (wrong: nothing was sent; and garbled). It waits now: still waiting at 11 s, when the
    test interrupts it."""
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    held: List[socket.socket] = []
    try:
        held += _fill_backlog(daemon.socket)
        c = Client(daemon.socket, timeout=None)
        alarm(11.0)
        try:
            c.ping()
        except _Interrupt:
            pass                         # still waiting, as documented
        except TimeoutError as e:
            pytest.fail("Client(timeout=None) gave up: %s" % e)
        else:
            pytest.fail("ping answered by a stopped daemon")
        alarm(0)
    finally:
        for s in held:
            s.close()
        os.kill(daemon.proc.pid, signal.SIGCONT)
    assert c.ping()["pid"] == daemon.proc.pid
