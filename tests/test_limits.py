"""Resource limits against a real daemon (DESIGN §4 "Bounded everything", PROTOCOL §1-§3).

* a client that sends half a frame and stalls blocks nobody, and is still served
  when the rest of its frame arrives;
* an attached consumer that stops reading is cut off at output_buffer_bytes and
  its events are delivered to the other consumer;
* a control client that pipelines requests and never reads is cut off at
  output_buffer_bytes;
* a full disk (RLIMIT_FSIZE on the daemon, which ignores SIGXFSZ) turns publishes
  into error answers without losing an acknowledged event; a read-only event log
  (chattr +i) likewise;
* deeply nested and huge values in publish data get proper answers.

max_connections, max_subscriptions, max_publish_events and max_frame_bytes
(frame_too_large) have their tests in test_lifecycle.py, test_control.py and
test_delivery.py.
"""
from __future__ import annotations

import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import msgpack
import psutil
import pytest

from daemon_fixture import Daemon
from emitterd.client import Client, EmitterError, Invalid, Unreachable
from emitterd.framing import Decoder, encode
from service_helpers import wait_log
from subscriber_helper import (consumers, start_pool, sub_spec,  # noqa: F401
                               subscribers, wait_checkpoint, wait_status, wait_until)

HEADER = struct.Struct(">I")


# ---- raw connections -------------------------------------------------------------------------

def raw_connect(path: str, timeout: float = 5.0, rcvbuf: Optional[int] = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_frame(s: socket.socket, dec: Decoder, timeout: float = 5.0) -> Optional[Dict[str, Any]]:
    """The next frame on a raw connection; None on EOF/reset; TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        frame = dec.next()
        if frame is not None:
            return frame
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame within %.1fs" % timeout)
        s.settimeout(left)
        try:
            data = s.recv(1 << 16)
        except socket.timeout:
            raise TimeoutError("no frame within %.1fs" % timeout) from None
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not data:
            return None
        dec.feed(data)


def silent(s: socket.socket, seconds: float) -> bool:
    """True when nothing (no byte, no EOF) arrives on `s` for `seconds`."""
    r, _, _ = select.select([s], [], [], seconds)
    return not r


def drain_to_eof(s: socket.socket, timeout: float) -> Tuple[bool, int]:
    """Read and discard until EOF or reset: (reached_eof, bytes_read)."""
    deadline = time.monotonic() + timeout
    got = 0
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(1 << 20)
        except socket.timeout:
            break
        except (ConnectionResetError, BrokenPipeError):
            return True, got
        if not data:
            return True, got
        got += len(data)
    return False, got


def hung_up(s: socket.socket, timeout: float) -> bool:
    """True once the peer has closed its end, seen WITHOUT reading (POLLHUP/POLLRDHUP
    are raised while unread data still waits): False after `timeout`."""
    p = select.poll()
    p.register(s, select.POLLRDHUP)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        for _fd, ev in p.poll(left * 1000):
            if ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                return True
        time.sleep(0.02)    # POLLIN alone (unread data): keep waiting, still without reading


def log_text(d: Daemon) -> str:
    try:
        with open(d.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def timed(fn: Any, limit: float, what: str) -> Any:
    t0 = time.monotonic()
    out = fn()
    took = time.monotonic() - t0
    assert took < limit, "%s took %.2fs (limit %.1fs) beside a stalled client" % (what, took, limit)
    return out


# ---- 1. half a frame, then a stall -----------------------------------------------------------

def padded_publish_payload(rid: int, size: int) -> bytes:
    """A valid publish request whose msgpack payload is exactly `size` bytes."""
    def build(n: int) -> bytes:
        return msgpack.packb({"id": rid, "op": "publish", "args": {"events": [
            {"stream": "stalled", "type": "t", "data": "x" * n}]}}, use_bin_type=True)
    for n in range(size):
        body = build(n)
        if len(body) == size:
            return body
    raise AssertionError("no padding gives a %d-byte publish" % size)


@pytest.mark.timeout(40)
def test_a_half_sent_frame_blocks_nobody_and_is_served_once_complete(daemon: Daemon,
                                                                      subscribers: Any) -> None:
    d = daemon
    c = d.client(timeout=10)
    sub = subscribers()
    key = start_pool(d, c, sub_spec("flowing", subscriber=sub.uri, start_from="now"))["key"]
    sub.wait_hellos(1)

    # A: a 4-byte header announcing 100 bytes, then 10 of them; B: 2 header bytes only
    body_a = padded_publish_payload(9, 100)
    stalled_a = raw_connect(d.socket)
    stalled_b = raw_connect(d.socket)
    ping_b = encode({"id": 7, "op": "ping"})
    try:
        stalled_a.sendall(HEADER.pack(100) + body_a[:10])
        stalled_b.sendall(ping_b[:2])

        published: List[int] = []
        for i in range(5):
            timed(c.ping, 3.0, "ping")
            res = timed(lambda: c.publish([{"stream": "flow-%d" % i, "type": "t", "data": i},
                                           {"stream": "flow-%d" % i, "type": "t", "data": -i}]),
                        3.0, "publish")
            published += res["positions"]
            timed(lambda: c.status(key), 3.0, "status")
            # a new client gets in and is served too
            with Client(d.socket, timeout=3) as other:
                timed(other.ping, 3.0, "ping on a new connection")
            # the pool keeps delivering to its subscriber
            sub.wait_count(len(published), timeout=5)
        assert sorted(sub.positions(key)) == published
        wait_checkpoint(c, key, published[-1], timeout=5)

        # the stalled connections are still open, and were not answered
        assert silent(stalled_a, 0.3), "the half-sent frame was answered or its connection closed"
        assert silent(stalled_b, 0.1), "the 2-byte header was answered or its connection closed"
        # nothing of the half-sent publish is in the log yet
        assert c.ping()["head"] == published[-1]

        # the rest of each frame: both are answered
        stalled_a.sendall(body_a[10:])
        got = read_frame(stalled_a, Decoder(1 << 30), 5)
        assert got is not None, "connection closed instead of answering the completed frame"
        assert got["id"] == 9 and got["ok"] is True, got
        assert got["result"]["positions"] == [published[-1] + 1], got
        stalled_b.sendall(ping_b[2:])
        got = read_frame(stalled_b, Decoder(1 << 30), 5)
        assert got is not None, "connection closed instead of answering the completed ping"
        assert got["id"] == 7 and got["ok"] is True and got["result"]["pid"] == d.proc.pid, got
        # and the event of the once-stalled publish is delivered like any other
        sub.wait_count(len(published) + 1, timeout=5)
        assert sub.positions(key)[-1] == published[-1] + 1
        wait_checkpoint(c, key, published[-1] + 1, timeout=5)
    finally:
        stalled_a.close()
        stalled_b.close()
    assert d.proc.poll() is None


@pytest.mark.timeout(40)
def test_a_frame_left_half_sent_is_closed_after_partial_frame_timeout(make_daemon: Any) -> None:
    """A client that sends the start of a frame and stops holds its buffer for good (up to
    max_frame_bytes per connection, max_connections of them): after partial_frame_timeout
    the connection is closed. One that sends a frame slowly, byte by byte, keeps going
    while the whole frame arrives within the timeout (tests/test_local_users.py: a frame
    trickled for longer is cut off too)."""
    d = make_daemon("--partial-frame-timeout", "3")
    c = d.client(timeout=10)
    stalled = raw_connect(d.socket)
    slow = raw_connect(d.socket)
    ping = encode({"id": 3, "op": "ping"})
    try:
        stalled.sendall(HEADER.pack(100) + padded_publish_payload(9, 100)[:10])
        t0 = time.monotonic()
        for i in range(len(ping)):               # one byte every 0.05 s: ~1 s in all
            slow.sendall(ping[i:i + 1])
            time.sleep(0.05)
        got = read_frame(slow, Decoder(1 << 30), 5)
        assert got is not None and got["id"] == 3 and got["ok"] is True, got
        assert hung_up(stalled, 8), "the half-sent frame's connection is still open"
        assert time.monotonic() - t0 >= 3
        assert "control connection closed: a frame half sent for" in log_text(d), \
            log_text(d)[-1500:]
        assert c.ping()["head"] == 0         # nothing of the half-sent publish stored
    finally:
        stalled.close()
        slow.close()


# ---- 2. an attached consumer that stops reading -----------------------------------------------

@pytest.mark.timeout(60)
def test_a_consumer_that_stops_reading_is_cut_off_and_its_events_go_to_another(
        make_daemon: Any, consumers: Any) -> None:
    out_cap = 65536
    d = make_daemon("--output-buffer-bytes", out_cap, "--max-frame-bytes", out_cap,
                    "--max-event-bytes", 60000)
    c = d.client(timeout=20)
    spec = sub_spec("stuck-and-fine", pool_size=2, start_from="origin", strategy="round_robin",
                    max_in_flight=100000, batch_size=50, ack_timeout=60)
    key = start_pool(d, c, spec)["key"]

    # A: attaches on a raw socket with a small receive buffer, then never reads
    stuck = raw_connect(d.socket, timeout=10, rcvbuf=4096)
    try:
        stuck.sendall(encode({"id": 1, "op": "attach", "args": {"key": key}}))
        dec = Decoder(1 << 30)
        resp = read_frame(stuck, dec, 10)
        assert resp is not None and resp.get("ok") is True, resp
        stuck_worker = resp["result"]["worker"]
        # B: reads and acks everything
        fine = consumers(d, key, name="fine")
        assert fine.worker != stuck_worker, "the two consumers landed on one worker"
        wait_status(c, key, lambda st: sorted(w["consumers"] for w in st["workers"]) == [1, 1],
                    10, "one consumer on each worker")

        n, size = 3000, 2000
        payload = "p" * size
        positions: List[int] = []
        per = 25                      # 25 x 2 KB: a publish frame stays below max_frame_bytes
        for i in range(0, n, per):
            positions += c.publish([{"stream": "s-%d" % (j % 7), "type": "big",
                                     "data": {"i": j, "pad": payload}}
                                    for j in range(i, i + per)])["positions"]
        head = positions[-1]

        # A is cut off by its worker: its connection count drops to 0 ...
        wait_status(c, key, lambda st: [w["consumers"] for w in st["workers"]
                                        if w["index"] == stuck_worker] == [0],
                    20, "the stuck consumer to be disconnected")
        assert hung_up(stuck, 5), "the stuck consumer's connection is still open"
        # B reads everything it is sent: it must not be cut off (DESIGN §4 cuts off "a
        # consumer that stops reading", i.e. the peer that does not take its bytes)
        time.sleep(0.5)
        assert not fine.closed_by_peer, (
            "the consumer that reads and acks everything was disconnected too:\n%s"
            % "\n".join(ln for ln in log_text(d).splitlines()
                        if "consumer connection closed" in ln))
        # ... and every event reaches B, A's unfinished ones again
        st = wait_checkpoint(c, key, head, timeout=30)
        assert st["in_flight"] == 0
        got = set(fine.positions())
        missing = sorted(set(positions) - got)
        assert not missing, "%d events never reached the reading consumer (first %r)" \
            % (len(missing), missing[:10])
        again = [e for e in fine.events if e["attempt"] >= 2]
        assert again, "none of the stuck consumer's events came back with attempt >= 2"
        assert "output buffer over %d bytes" % out_cap in log_text(d), \
            "no log line tells why the consumer was disconnected"

        # A finally reads: whatever was in its socket, then EOF (or a reset)
        eof, nbytes = drain_to_eof(stuck, 10)
        assert eof, "the stuck consumer's connection is still open after %d bytes" % nbytes
        assert nbytes <= 4 * out_cap + (1 << 20), "the daemon wrote %d bytes to a stuck consumer" \
            % nbytes
    finally:
        stuck.close()
    # the daemon, the pool and B are fine
    assert c.ping()["pid"] == d.proc.pid
    more = c.publish([{"stream": "after", "type": "t"}])["positions"]
    fine.wait(lambda: more[0] in fine.positions(), 10, "an event published after the cut-off")
    st = c.status(key)
    assert st["state"] == "running" and st["restarts"] == 0


# ---- 3. a control client that never reads its responses ------------------------------------------

OUT_CAP = 65536


def _daemon_with_20_subscriptions(make_daemon: Any) -> Tuple[Daemon, Client, int]:
    """A daemon with output_buffer_bytes = max_frame_bytes = 64 KiB and 20 (stopped)
    subscriptions; also the size of one `list` response."""
    d = make_daemon("--output-buffer-bytes", OUT_CAP, "--max-frame-bytes", OUT_CAP,
                    "--max-event-bytes", 60000)
    c = d.client(timeout=20)
    keys = []
    for i in range(20):
        keys.append(c.start({"name": "listed-%02d" % i, "type": "event_type",
                             "selector": "type-%02d" % i})["key"])
    for k in keys:    # stopped pools are listed all the same, without 20 idle workers
        c.stop(k, drain_timeout=0)
    one_list = len(encode({"id": 1, "ok": True, "result": c.list()}))
    return d, c, one_list


@pytest.mark.timeout(60)
def test_a_subscriber_that_never_reads_does_not_grow_its_worker(make_daemon: Any,
                                                               short_tmp: str) -> None:
    """A unix: subscriber that accepts and never reads is cut off at output_buffer_bytes,
    reconnected, and cut off again: each round's buffer must go with its connection (they
    stayed until a rare cyclic GC: worker RSS grew by the buffer, ~4 MB here, per round)."""
    d = make_daemon("--output-buffer-bytes", 1 << 20, "--max-frame-bytes", 1 << 20,
                    "--max-event-bytes", 100000)
    path = os.path.join(short_tmp, "mute.sock")
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mute.bind(path)
    mute.listen(64)
    mute.setblocking(False)
    held: List[socket.socket] = []
    c = d.client(timeout=20)
    try:
        key = start_pool(d, c, sub_spec("mute", subscriber="unix:" + path, max_in_flight=200,
                                        batch_size=8))["key"]
        for _ in range(13):           # 200 in flight: about 4 MB queued for it per round
            c.publish([{"stream": "m", "type": "t", "data": "z" * 20000}] * 16)

        def rounds() -> int:
            try:
                while True:
                    held.append(mute.accept()[0])
            except BlockingIOError:
                pass
            return log_text(d).count("output buffer over")

        def worker_rss() -> int:
            (w,) = c.status(key)["workers"]
            return w["rss"]
        wait_until(lambda: rounds() >= 2, 30, "two cut-offs")
        before = worker_rss()
        wait_until(lambda: rounds() >= 8, 40, "six more cut-offs")
        grown = worker_rss() - before
        assert grown < 10 << 20, "worker RSS grew %.1f MiB over six rounds" % (grown / 2**20)
        assert "WARNING emitterd.worker: consumer connection closed" in log_text(d)
    finally:
        for s in held:
            s.close()
        mute.close()


@pytest.mark.timeout(60)
def test_a_control_client_that_never_reads_is_cut_off(make_daemon: Any) -> None:
    out_cap = OUT_CAP
    d, c, one_list = _daemon_with_20_subscriptions(make_daemon)
    assert one_list * 5000 > 20 * out_cap, one_list

    bystander = Client(d.socket, timeout=5)
    greedy = raw_connect(d.socket, timeout=10, rcvbuf=4096)
    try:
        assert bystander.ping()["pid"] == d.proc.pid
        data = b"".join(encode({"id": i, "op": "list"}) for i in range(1, 5001))
        sent = 0
        try:
            greedy.settimeout(10)
            while sent < len(data):
                sent += greedy.send(data[sent:sent + 65536])
        except (BrokenPipeError, ConnectionResetError):
            pass                      # cut off while still sending: fine
        except socket.timeout:
            raise AssertionError("the daemon neither read nor closed a pipelining client "
                                 "(%d of %d bytes sent)" % (sent, len(data))) from None
        # the daemon closes it while it still has not read a byte
        assert hung_up(greedy, 10), "the connection that never reads is still open"
        eof, nbytes = drain_to_eof(greedy, 15)
        assert eof, "EOF never came after the hang-up (%d bytes read)" % nbytes
        assert nbytes < 5000 * one_list, "every response was sent: nothing was bounded"
        # everyone else is unaffected
        assert bystander.ping()["pid"] == d.proc.pid
        assert len(bystander.list()["subscriptions"]) == 20
        with Client(d.socket, timeout=5) as fresh:
            assert fresh.ping()["pid"] == d.proc.pid
            assert fresh.publish([{"stream": "s", "type": "t"}])["positions"] == [1]
    finally:
        greedy.close()
        bystander.close()


@pytest.mark.timeout(30)
def test_a_pipelining_client_that_reads_is_not_cut_off(make_daemon: Any) -> None:
    # The cap is on output the peer does not take. A client that pipelines requests and
    # reads the responses as they come (Client.pipeline reads while it sends) is not that
    # peer, even when its responses add up to many times output_buffer_bytes.
    d, c, one_list = _daemon_with_20_subscriptions(make_daemon)
    n = 40
    assert n * one_list > 4 * OUT_CAP, one_list
    with Client(d.socket, timeout=15) as reader:
        try:
            results = reader.pipeline([("list", None)] * n)
        except Unreachable as e:
            raise AssertionError(
                "a client that reads was cut off after %d of %d responses (each %d bytes, "
                "output_buffer_bytes %d): %s" % (len(e.results), n, one_list, OUT_CAP, e)) from None
        assert len(results) == n
        assert all(isinstance(r, dict) and len(r["subscriptions"]) == 20 for r in results)
        assert reader.ping()["pid"] == d.proc.pid
    assert c.ping()["pid"] == d.proc.pid


@pytest.mark.timeout(60)
def test_a_client_that_reads_slowly_while_pipelining_is_held_back_not_buffered(
        make_daemon: Any) -> None:
    """A client that pipelines pings flat out and reads 64 KiB a second makes progress, so
    the no-progress cut-off never comes: the daemon used to read and answer all it sent,
    buffering the answers (13 MiB/s, unbounded). Over output_buffer_bytes it now reads no
    more requests of that connection until the client has taken half of them."""
    cap = 1 << 20
    d = make_daemon("--output-buffer-bytes", cap, "--max-frame-bytes", cap,
                    "--max-event-bytes", cap - 4096)
    parent = psutil.Process(d.proc.pid)
    rss0 = parent.memory_info().rss
    slow = raw_connect(d.socket, timeout=10, rcvbuf=4096)
    burst = b"".join(encode({"id": i, "op": "ping"}) for i in range(1, 2001))
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            try:
                slow.sendall(burst)
            except OSError:
                return
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    got = 0
    peak = rss0
    try:
        for _ in range(8):
            time.sleep(1.0)
            chunk = slow.recv(65536)
            assert chunk, "a client that reads (%d bytes so far) was cut off" % got
            got += len(chunk)
            peak = max(peak, parent.memory_info().rss)
        with Client(d.socket, timeout=5) as other:       # others are served meanwhile
            assert other.ping()["pid"] == d.proc.pid
    finally:
        stop.set()
        slow.close()
        t.join(5)
    assert peak - rss0 < 32 << 20, "the parent grew %.0f MiB for one slow reader" % (
        (peak - rss0) / 2**20)


# ---- 4. a full disk, a read-only event log ----------------------------------------------------

FSIZE_LIMIT = 2 * 1024 * 1024

_LIMITED_EXEC = """
import os, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def _start_with_fsize_limit(make_daemon: Any, limit: int) -> Daemon:
    """A daemon whose process has RLIMIT_FSIZE = limit (the wrapper execs it: same pid)."""
    d = make_daemon(start=False)
    base = d.argv

    def argv() -> List[str]:
        return [sys.executable, "-c", _LIMITED_EXEC, str(limit)] + base()[1:]
    d.argv = argv  # type: ignore[method-assign]
    d.start()
    with open("/proc/%d/limits" % d.proc.pid) as f:
        line = next(ln for ln in f if ln.startswith("Max file size"))
    assert str(limit) in line, line
    return d


def _restart_on(make_daemon: Any, old: Daemon) -> Daemon:
    d2 = make_daemon(start=False)
    d2.data_dir = old.data_dir
    return d2.start()


def _collect_all(d: Daemon, c: Client, name: str, want: int, timeout: float = 20
                 ) -> Dict[int, Dict[str, Any]]:
    """Every event from the origin on, by a fresh subscription and an attached consumer."""
    key = start_pool(d, c, sub_spec(name, start_from="origin", batch_size=500))["key"]
    got: Dict[int, Dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with Client(d.socket, timeout=10).attach(key) as cons:
        while len(got) < want and time.monotonic() < deadline:
            try:
                frame = cons.recv(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
            assert frame is not None, "the daemon closed the consumer"
            evs = frame.get("events") or []
            for e in evs:
                got[e["position"]] = e
            cons.ack([e["position"] for e in evs])
    return got


@pytest.mark.timeout(60)
def test_a_full_disk_fails_publishes_with_an_error_and_loses_no_acked_event(
        make_daemon: Any, subscribers: Any) -> None:
    d = _start_with_fsize_limit(make_daemon, FSIZE_LIMIT)
    c = d.client(timeout=20)
    sub = subscribers()
    live = start_pool(d, c, sub_spec("live", subscriber=sub.uri, start_from="origin"))["key"]
    sub.wait_hellos(1)

    acked: List[int] = []
    ids: Dict[int, str] = {}
    failure: Optional[EmitterError] = None
    pad = "f" * 8000
    for i in range(400):            # 400 x 10 x 8 KB = 32 MB >> the 2 MiB limit
        evs = [{"stream": "fill-%d" % (i % 5), "type": "fill", "id": "fill-%d-%d" % (i, j),
                "data": {"i": i, "j": j, "pad": pad}} for j in range(10)]
        try:
            res = c.publish(evs)
        except EmitterError as e:
            failure = e
            break
        except Unreachable as e:
            raise AssertionError("the daemon dropped the connection instead of answering a "
                                 "publish on a full disk: %s" % e) from None
        acked += res["positions"]
        for e, p in zip(evs, res["positions"]):
            ids[p] = e["id"]
    assert failure is not None, "every publish succeeded: the file size limit was not hit"
    assert failure.code in ("unavailable", "internal"), failure
    assert failure.request_id not in (0, None), "a connection-level error: %r" % failure
    assert acked, "not a single publish succeeded before the disk was full"
    # the daemon is alive and still answers, on the same connection and on new ones
    pong = c.ping()
    assert pong["pid"] == d.proc.pid
    assert pong["head"] == acked[-1], "the failed publish appended events (atomicity)"
    with Client(d.socket, timeout=5) as other:
        assert other.ping()["pid"] == d.proc.pid
    # a further publish is answered too (error or ok), never with a dropped connection
    try:
        res = c.publish([{"stream": "again", "type": "t", "id": "again-1", "data": pad}])
        acked += res["positions"]
        ids[res["positions"][0]] = "again-1"
    except EmitterError as e:
        assert e.code in ("unavailable", "internal"), e
    except Unreachable as e:
        raise AssertionError("connection dropped after a full disk: %s" % e) from None
    # every acknowledged event is delivered
    sub.wait(lambda: set(acked) <= set(sub.positions(live)), 20,
             "every acknowledged position at the subscriber")
    assert d.proc.poll() is None

    # a restart without the limit has every acknowledged event and takes new ones
    assert d.stop(15) == 0, "the daemon did not exit 0 on SIGTERM after a full disk"
    d2 = _restart_on(make_daemon, d)
    c2 = d2.client(timeout=20)
    c2.stop(live, delete=True, drain_timeout=0)     # its subscriber goes away at teardown
    head = c2.ping()["head"]
    assert head >= acked[-1], "head %d after the restart, %d was acknowledged" % (head, acked[-1])
    got = _collect_all(d2, c2, "after-restart", head)
    missing = [p for p in acked if p not in got]
    assert not missing, "acknowledged events lost: %r" % missing[:10]
    assert all(got[p]["id"] == ids[p] for p in acked)
    new = c2.publish([{"stream": "after", "type": "t", "data": "ok"}])["positions"]
    assert new[0] > head


def _chattr_works(path: str) -> Optional[str]:
    """None when `chattr +i` works on files at `path` (root, a supporting file system)."""
    if os.geteuid() != 0:
        return "chattr +i needs root (CAP_LINUX_IMMUTABLE)"
    if not shutil.which("chattr"):
        return "chattr is not installed"
    probe = os.path.join(path, "chattr-probe")
    with open(probe, "w") as f:
        f.write("x")
    try:
        r = subprocess.run(["chattr", "+i", probe], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            return "chattr +i is not supported here: %s" % r.stderr.strip()
        subprocess.run(["chattr", "-i", probe], capture_output=True, timeout=10)
        return None
    finally:
        os.unlink(probe)


@pytest.mark.timeout(60)
def test_an_immutable_event_log_fails_publishes_with_an_error_then_recovers(
        make_daemon: Any) -> None:
    # chmod does not stop root: make the database files immutable instead
    d = make_daemon()
    why = _chattr_works(d.root)
    if why:
        pytest.skip(why)
    c = d.client(timeout=20)
    acked = c.publish([{"stream": "ro", "type": "t", "data": i} for i in range(5)])["positions"]
    # the database and its WAL; not the -shm index: SQLite maps it into memory, and a
    # write fault on an immutable mapping is SIGBUS in any process (not an I/O error)
    files = [os.path.join(d.data_dir, n) for n in ("emitterd.db", "emitterd.db-wal")]
    assert all(os.path.exists(f) for f in files), os.listdir(d.data_dir)
    locked: List[str] = []
    try:
        for f in files:
            r = subprocess.run(["chattr", "+i", f], capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, r.stderr
            locked.append(f)
        try:
            c.publish([{"stream": "ro", "type": "t", "data": "x" * 5000} for _ in range(50)])
            pytest.fail("a publish was acknowledged while the event log is immutable")
        except EmitterError as e:
            assert e.code in ("unavailable", "internal"), e
            assert e.request_id not in (0, None), e
        except Unreachable as e:
            raise AssertionError("connection dropped instead of an error answer: %s" % e) from None
        assert c.ping()["pid"] == d.proc.pid
        assert c.ping()["head"] == acked[-1]
    finally:
        for f in locked:
            subprocess.run(["chattr", "-i", f], capture_output=True, timeout=10)
    # writable again: publishes work, on the same daemon
    more = wait_until(lambda: c.publish([{"stream": "ro", "type": "t", "data": "back"}]),
                      10, "a publish to succeed once the log is writable")["positions"]
    assert more[0] > acked[-1]
    got = _collect_all(d, c, "ro-check", more[0])
    assert all(p in got for p in acked + more), sorted(got)


def _chattr(flag: str, files: List[str]) -> None:
    for f in files:
        r = subprocess.run(["chattr", flag, f], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stderr


@pytest.mark.timeout(90)
def test_subscription_changes_that_cannot_be_saved_are_refused_or_saved_later(
        make_daemon: Any) -> None:
    """A log that cannot be written (a full disk; here immutable files): a new subscription
    is refused, not half made; a stop still stops (and its answer says the state is not
    saved yet, which the daemon retries); SIGTERM still exits (it hung: the failed save
    skipped the stop's completion); and once writable the stop is saved."""
    d = make_daemon("--drain-timeout", "2")
    why = _chattr_works(d.root)
    if why:
        pytest.skip(why)
    c = d.client(timeout=20)
    a = start_pool(d, c, sub_spec("keep-a"))["key"]
    b = start_pool(d, c, sub_spec("keep-b"))["key"]
    files = [os.path.join(d.data_dir, n) for n in ("emitterd.db", "emitterd.db-wal")]
    locked = list(files)
    _chattr("+i", files)
    try:
        with pytest.raises(EmitterError) as stop_err:
            c.stop(a)
        assert stop_err.value.code == "unavailable", stop_err.value
        assert "could not be saved" in str(stop_err.value), stop_err.value
        assert c.status(a)["state"] == "stopped"
        with pytest.raises(EmitterError) as start_err:
            c.start(sub_spec("new-c"))
        assert start_err.value.code == "unavailable", start_err.value
        assert "could not be stored" in str(start_err.value), start_err.value
        assert [p["subscription"]["name"] for p in c.list()["subscriptions"]] == [
            "keep-a", "keep-b"]
        _chattr("-i", files)
        locked = []
        # the daemon saves the stop at its next checkpoint flush; stop again then answers
        wait_until(lambda: c.stop(a)["state"] == "stopped", 10, "the stop to be saved")
        _chattr("+i", files)
        locked = list(files)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(20)
        assert time.monotonic() - t0 < 15, "the shutdown took %.1f s" % (time.monotonic() - t0)
    finally:
        if locked:
            _chattr("-i", locked)
    d.start()
    c = d.client(timeout=20)
    states = {p["key"]: p["state"] for p in c.list()["subscriptions"]}
    assert states == {a: "stopped", b: "running"}, states


@pytest.mark.timeout(60)
def test_an_event_that_cannot_be_parked_stays_in_the_flow(make_daemon: Any) -> None:
    """A nack park whose row cannot be written must not drop the event (it had left the
    flow, and the checkpoint passed it, with no parked row to show for it): it comes
    back after the longest retry backoff, and parks once the log is writable."""
    d = make_daemon()
    why = _chattr_works(d.root)
    if why:
        pytest.skip(why)
    c = d.client(timeout=20)
    key = start_pool(d, c, sub_spec("parkfail", max_retries=0, retry_backoff=[0.05, 0.3]))["key"]
    (pos,) = c.publish([{"stream": "pf", "type": "t"}])["positions"]
    files = [os.path.join(d.data_dir, n) for n in ("emitterd.db", "emitterd.db-wal")]
    with c.attach(key) as consumer:
        (ev,) = next(consumer.batches(timeout=10))
        _chattr("+i", files)
        try:
            consumer.nack([pos], "park", reason="cannot")
            (again,) = next(consumer.batches(timeout=10))
            assert again["position"] == pos and again["attempt"] == 2, again
            assert c.status(key)["parked"] == 0
        finally:
            _chattr("-i", files)
        consumer.nack([pos], "park", reason="now")
        wait_status(c, key, lambda s: s["parked"] == 1 and s["in_flight"] == 0,
                    what="the event parked")
    assert [(e["position"], e["reason"]) for e in c.parked(key)["events"]] == [(pos, "now")]


# ---- 5. deep and huge values -------------------------------------------------------------------

def _publish_frame_with_raw_data(rid: int, data_msgpack: bytes) -> bytes:
    marker = "\x00DATA-PLACEHOLDER\x00"
    body = msgpack.packb({"id": rid, "op": "publish", "args": {"events": [
        {"stream": "deep", "type": "t", "data": marker}]}}, use_bin_type=True)
    packed_marker = msgpack.packb(marker, use_bin_type=True)
    assert body.count(packed_marker) == 1
    body = body.replace(packed_marker, data_msgpack)
    return HEADER.pack(len(body)) + body


def _nested_lists(depth: int) -> bytes:
    return b"\x91" * depth + b"\xc0"     # [[[...[nil]...]]] as msgpack


def _depth(v: Any) -> int:
    """Depth of [[...[nil]...]] without recursion (== on it would hit the recursion limit)."""
    n = 0
    while isinstance(v, list):
        assert len(v) == 1, v
        v = v[0]
        n += 1
    assert v is None
    return n


@pytest.mark.timeout(40)
def test_deeply_nested_and_huge_values_get_proper_answers(daemon: Daemon) -> None:
    d = daemon
    c = d.client(timeout=20)
    head = 0

    # 10,000 nested lists: an error answer (the request's invalid, or bad_frame and a close)
    s = raw_connect(d.socket)
    try:
        s.sendall(_publish_frame_with_raw_data(5, _nested_lists(10000)))
        got = read_frame(s, Decoder(1 << 30), 10)
        assert got is not None, "connection closed without an answer"
        assert got["ok"] is False, "10,000 nested lists were accepted: %r" % (str(got)[:300],)
        if got["id"] == 5:
            assert got["error"]["code"] == "invalid", got
            assert got["error"]["details"]["field"].startswith("events.0"), got
            s.sendall(encode({"id": 6, "op": "ping"}))        # the connection stays usable
            pong = read_frame(s, Decoder(1 << 30), 5)
            assert pong is not None and pong["id"] == 6 and pong["ok"] is True, pong
        else:
            assert got["id"] == 0 and got["error"]["code"] == "bad_frame", got
            assert read_frame(s, Decoder(1 << 30), 5) is None, "not closed after bad_frame"
    finally:
        s.close()
    assert c.ping()["head"] == head

    # moderately deep data is stored and delivered intact
    nested: Any = None
    for _ in range(100):
        nested = [nested]
    res = c.publish([{"stream": "deep", "type": "t", "data": nested}])
    head = res["positions"][0]
    # 1000 nested lists (still decodable by msgpack): accepted, or refused as invalid
    s = raw_connect(d.socket)
    try:
        s.sendall(_publish_frame_with_raw_data(8, _nested_lists(1000)))
        got = read_frame(s, Decoder(1 << 30), 10)
        assert got is not None and got["id"] == 8, got
        if got["ok"]:
            assert got["result"]["positions"] == [head + 1], got
            deep_pos: Optional[int] = head + 1
            head += 1
        else:
            assert got["error"]["code"] == "invalid", got
            assert got["error"]["details"]["field"] in ("events.0", "events.0.data"), got
            deep_pos = None
    finally:
        s.close()

    # a 900 KB string fits max_event_bytes (default 1 MiB)
    big = "b" * 900_000
    res = c.publish([{"stream": "huge", "type": "t", "data": big}])
    assert res["positions"] == [head + 1]
    head += 1
    # a 1.1 MB string does not: invalid at events.0, nothing appended
    with pytest.raises(Invalid) as ei:
        c.publish([{"stream": "huge", "type": "t", "data": "h" * 1_100_000}])
    assert ei.value.details == {"field": "events.0"}, ei.value.details
    with pytest.raises(Invalid) as ei:
        c.publish([{"stream": "huge", "type": "t"},
                   {"stream": "huge", "type": "t", "metadata": {"m": b"\x00" * 1_100_000}}])
    assert ei.value.details == {"field": "events.1"}, ei.value.details
    assert c.ping()["head"] == head

    got = _collect_all(d, c, "deep-and-huge", head)
    assert sorted(got) == list(range(1, head + 1))
    assert got[1]["data"] == nested
    assert got[head]["data"] == big
    if deep_pos is not None:           # an accepted event must be deliverable as it was sent
        assert _depth(got[deep_pos]["data"]) == 1000
    assert d.proc.poll() is None


@pytest.mark.timeout(60)
def test_an_attach_whose_first_consumer_frame_is_invalid_leaves_no_phantom_consumer(
        make_daemon: Any) -> None:
    """The worker closed such a connection as it took it, without telling the parent, which
    went on counting it as a consumer being handed over: toward max_connections (enough of
    them refused every new client) and as a consumer to route to (events bounced between
    the parent and the worker, none delivered, the parent spinning)."""
    d = make_daemon("--max-connections", "8")
    c = d.client()
    key = start_pool(d, c, sub_spec("phantom"))["key"]
    for _ in range(10):
        s = raw_connect(d.socket, timeout=10)
        try:
            s.sendall(encode({"id": 1, "op": "attach", "args": {"key": key}})
                      + encode({"op": "bogus"}))
            dec = Decoder(1 << 20)
            assert read_frame(s, dec, 10)["ok"] is True
            assert hung_up(s, 10), "the invalid consumer was not closed"
        finally:
            s.close()
    wait_until(lambda: sum(w["consumers"] for w in c.status(key)["workers"]) == 0, 10,
               "no consumer counted")
    with Client(d.socket, timeout=10) as fresh:       # not refused: max_connections 8
        fresh.ping()
    ps = c.publish([{"stream": "ph", "type": "t"}] * 5)["positions"]
    with c.attach(key) as consumer:
        got = [e["position"] for e in next(consumer.batches(timeout=10))]
        consumer.ack(got)
    assert got == ps


@pytest.mark.timeout(60)
def test_a_subscriber_that_closes_at_once_is_reconnected_with_a_growing_backoff(
        make_daemon: Any, short_tmp: str) -> None:
    """§3's backoff (0.1 s doubling to 5 s) also holds for a subscriber that accepts and
    closes at once (or that a worker closes for a bad frame): the backoff used to start over
    on every connect, 10 connections (and log lines) a second per worker, forever."""
    d = make_daemon()
    path = os.path.join(short_tmp, "slam.sock")
    slam = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slam.bind(path)
    slam.listen(64)
    slam.settimeout(0.2)
    accepted = 0
    try:
        c = d.client(timeout=10)
        start_pool(d, c, sub_spec("slammed", subscriber="unix:" + path))
        t_end = time.monotonic() + 6.0
        while time.monotonic() < t_end:
            try:
                conn, _ = slam.accept()
            except socket.timeout:
                continue
            accepted += 1
            conn.close()
    finally:
        slam.close()
    # 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s: about 6 connections in 6 s (60 before)
    assert 3 <= accepted <= 12, accepted


# ---- reloaded frame limits reach what was open before the reload ---------------------------

def _write_config(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _send_frame(sock, msg):
    body = msgpack.packb(msg, use_bin_type=True)
    sock.sendall(struct.pack(">I", len(body)) + body)


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def _recv_frame(sock):
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    return n, msgpack.unpackb(_recv_exact(sock, n), raw=False)


def _reload(d, cfg, text, count):
    _write_config(cfg, text)
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d.log_path, r"configuration reloaded", count=count, timeout=20)


@pytest.mark.timeout(90)
def test_raised_max_frame_bytes_applies_to_an_open_control_connection(make_daemon, short_tmp):
    """§7: max_frame_bytes is reloadable ('setting reloaded'); after it is raised, a
    publish frame within the new limit must not be refused as frame_too_large on a
    connection opened before the reload."""
    cfg = os.path.join(short_tmp, "emitterd.toml")
    _write_config(cfg, "max_frame_bytes = 65536\nmax_event_bytes = 32768\noutput_buffer_bytes = 16777216\n")
    d = make_daemon("--config", cfg)
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.settimeout(20)
    old.connect(d.socket)
    _send_frame(old, {"id": 1, "op": "ping"})
    assert _recv_frame(old)[1]["ok"] is True

    _reload(d, cfg, "max_frame_bytes = 1048576\nmax_event_bytes = 524288\n"
                    "output_buffer_bytes = 16777216\n", 1)
    log = open(d.log_path).read()
    assert "setting=max_frame_bytes old=65536 new=1048576" in log

    event = {"stream": "big", "type": "t", "data": "x" * 200_000}   # ~200 KB: within both new limits
    # a new connection takes it
    with Client(d.socket, timeout=20) as c:
        assert c.publish([dict(event, id="new-conn")])["positions"]
    # the connection opened before the reload must take it too
    _send_frame(old, {"id": 2, "op": "publish", "args": {"events": [dict(event, id="old-conn")]}})
    n, resp = _recv_frame(old)
    assert resp.get("ok") is True, resp
    # and a lowered limit holds on it too: the frame over it is refused from its header
    _reload(d, cfg, "max_frame_bytes = 65536\nmax_event_bytes = 32768\n"
                    "output_buffer_bytes = 16777216\n", 2)
    _send_frame(old, {"id": 3, "op": "publish", "args": {"events": [dict(event, id="lowered")]}})
    n, resp = _recv_frame(old)
    old.close()
    assert resp["ok"] is False and resp["error"]["code"] == "frame_too_large", resp
    assert "65536" in resp["error"]["message"], resp


@pytest.mark.timeout(90)
def test_lowered_max_frame_bytes_bounds_delivery_frames_of_running_pool(make_daemon, short_tmp):
    """§2: 'a delivery frame never exceeds max_frame_bytes (batches are split)'. After a
    reload lowers max_frame_bytes, events published after it (each within the new
    max_event_bytes) must reach a consumer of an already running pool in frames within the
    new limit."""
    cfg = os.path.join(short_tmp, "emitterd.toml")
    _write_config(cfg, "default_batch_size = 100\n")
    d = make_daemon("--config", cfg)
    c = d.client()
    key = c.start({"name": "big", "type": "stream", "selector": "s"})["key"]

    _reload(d, cfg, "default_batch_size = 100\nmax_frame_bytes = 65536\nmax_event_bytes = 16384\n"
                    "output_buffer_bytes = 1048576\n", 1)
    log = open(d.log_path).read()
    assert "setting=max_frame_bytes old=8388608 new=65536" in log

    # attach a raw consumer (frames measured on the wire)
    cons = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cons.settimeout(30)
    cons.connect(d.socket)
    deadline = time.monotonic() + 30
    while True:
        _send_frame(cons, {"id": 1, "op": "attach", "args": {"key": key}})
        _, resp = _recv_frame(cons)
        if resp.get("ok") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert resp.get("ok") is True, resp

    events = [{"stream": "s", "type": "t", "data": "y" * 10_000} for _ in range(40)]  # ~400 KB
    first = None
    for i in range(0, 40, 4):        # publish frames within the new limit too
        positions = c.publish(events[i:i + 4])["positions"]
        first = positions[0] if first is None else first

    def take_all():
        got, sizes = 0, []
        while got < 40:
            n, frame = _recv_frame(cons)
            assert frame.get("op") == "events", frame
            sizes.append(n)
            got += len(frame["events"])
            _send_frame(cons, {"op": "ack", "positions": [e["position"] for e in frame["events"]]})
        return sizes
    take_all()
    # delivered again from the log: 40 events in batches of up to 100, split by the limit
    c.update(key, checkpoint=first - 1)
    sizes = take_all()
    cons.close()
    assert max(sizes) <= 65536, "delivery frame sizes %s exceed max_frame_bytes 65536" % sizes


# ---- out of file descriptors -----------------------------------------------------------------

FD_LIMIT = 96

_FD_LIMITED_EXEC = """
import os, resource, sys
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def _nfds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


@pytest.mark.timeout(90)
def test_a_publish_when_out_of_file_descriptors_is_made_durable_and_answered(make_daemon: Any) -> None:
    """The fd every fdatasync uses is opened at start: opened at the first publish, a daemon
    out of descriptors could not make it durable (and the failure path hung the publish
    instead of exiting 74: see test_eventlog for that path)."""
    d = make_daemon(start=False)
    base = d.argv
    d.argv = lambda: [sys.executable, "-c", _FD_LIMITED_EXEC, str(FD_LIMIT)] + base()[1:]  # type: ignore
    d.start()
    c = d.client(timeout=5)
    c.ping()
    held: List[socket.socket] = []
    try:
        # take every descriptor the daemon has left with idle control connections
        deadline = time.monotonic() + 30
        while _nfds(d.proc.pid) < FD_LIMIT and time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(d.socket)
            except OSError:
                s.close()
                time.sleep(0.1)
                continue
            held.append(s)
            time.sleep(0.005)
        assert _nfds(d.proc.pid) >= FD_LIMIT, "could not exhaust the daemon's descriptors"
        answered = c.publish([{"stream": "s", "type": "t", "id": "e-1"}])
        assert answered == {"positions": [1], "versions": [0]}, answered
        assert d.proc.poll() is None
    finally:
        for s in held:
            s.close()


# ---- a purge on a full disk ------------------------------------------------------------------

def _park_all(d: Any, c: Client, key: str, n: int) -> None:
    with Client(d.socket, timeout=30).attach(key) as cons:
        got = 0
        while got < n:
            f = cons.recv(30)
            assert f is not None, "consumer closed"
            ps = [e["position"] for e in f["events"]]
            got += len(ps)
            cons.nack(ps, "park", reason="x")
        wait_status(c, key, lambda s: s["parked"] == n and s["in_flight"] == 0, 60,
                    what="every event parked")


@pytest.mark.timeout(120)
def test_a_purge_on_a_full_disk_is_all_or_nothing(make_daemon: Any, short_tmp: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = os.path.join(short_tmp, "fs")
    os.makedirs(mnt)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("cannot mount tmpfs: %s" % r.stderr.strip())
    try:
        d = make_daemon(start=False)
        d.data_dir = os.path.join(mnt, "data")
        d.start()
        c = d.client(timeout=30)
        key = c.start({"name": "pk", "type": "event_type", "selector": "park",
                       "start_from": "origin"})["key"]
        n = 200
        c.publish([{"stream": "p", "type": "park", "data": i} for i in range(n)])
        _park_all(d, c, key, n)
        filler = os.path.join(mnt, "filler")
        with open(filler, "wb") as f:
            f.write(b"x" * 256 * 1024)
        # fill the rest of the disk with events until a publish is refused
        for i in range(1000):
            try:
                c.publish([{"stream": "fill", "type": "fill", "data": "f" * 8000}
                           for _ in range(10)])
            except EmitterError as e:
                assert e.code == "unavailable", e
                break
        else:
            pytest.fail("the disk never filled")
        os.unlink(filler)        # a little room: a few commits' worth, not 200
        err = None
        try:
            c.parked(key, "purge", limit=1000)
        except EmitterError as e:
            err = e
        listed = len(c.parked(key, limit=1000)["events"])
        counted = c.status(key)["parked"]
        if err is None:
            assert listed == 0 and counted == 0, (listed, counted)
        else:
            assert (listed, counted) == (n, n), (
                "the purge answered %r, yet %d of %d parked events are gone from the listing "
                "(status.parked says %d): a failed purge took part effect"
                % (str(err), n - listed, n, counted))
            assert err.code == "unavailable", err
    finally:
        try:
            d.cleanup()
        except Exception:  # noqa: BLE001
            pass
        subprocess.run(["umount", mnt], capture_output=True)


@pytest.mark.timeout(60)
def test_the_low_fd_limit_warning_names_a_true_connection_count(make_daemon: Any) -> None:
    """The start-up warning's figure is one an operator can size the limit by (it said
    "past about 0 connections" under a limit of 160, and served 60 at once)."""
    d = make_daemon(start=False)
    base = d.argv
    d.argv = lambda: [sys.executable, "-c", _FD_LIMITED_EXEC, "160"] + base()[1:]  # type: ignore
    d.start()
    log = open(d.log_path, encoding="utf-8", errors="replace").read()
    m = re.search(r"past about (\d+) connections", log)
    assert m, log[-1500:]
    said = int(m.group(1))
    clients: List[Client] = []
    try:
        for _ in range(60):
            c = Client(d.socket, timeout=5)
            c.ping()
            clients.append(c)
    finally:
        for c in clients:
            c.close()
    assert said >= len(clients), (
        "the warning says new connections wait past about %d, but %d were served at once"
        % (said, len(clients)))
