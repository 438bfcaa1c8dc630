"""What the log says, and how often: every line names its pool, a client's own business is
no warning, and a cause that lasts is said seldom (first, then at growing counts), not once
per loop turn, reconnect or redelivery; late nacks are ignored quietly; HEAD gets no body."""
from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from typing import Any, List

import msgpack
import pytest

from daemon_fixture import Daemon
from emitterd import framing
from emitterd.client import Client
from waits import wait_for
from subscriber_helper import (HOLD, events, start_pool, sub_spec, subscribers,  # noqa: F401
                               wait_until)


@pytest.mark.timeout(90)
def test_late_nack_park_after_checkpoint_move_logs_no_error_traceback(daemon: Daemon,
                                                                     subscribers: Any) -> None:
    """§3: "Positions not in flight on that connection are ignored." A nack park that
    reaches the parent after `update --checkpoint` dropped the in-flight bookkeeping
    (README: "late acks for earlier deliveries are ignored") must be ignored quietly,
    not logged as an ERROR with an IndexError traceback claiming events could not be
    parked."""
    sub = subscribers(lambda ev, conn: HOLD)
    c = daemon.client()
    st = start_pool(daemon, c, sub_spec("latepark", subscriber=sub.uri, pool_size=1,
                                        start_from="origin"))
    key = st["key"]
    conn = sub.wait_hellos(1)[0]
    c.publish(events(3))
    sub.wait_count(3, timeout=20)
    parent = daemon.proc.pid
    c2 = daemon.client()
    c2.ping()          # connected and accepted before the parent stops
    box = {}
    os.kill(parent, signal.SIGSTOP)
    try:
        # while the parent is stopped: the update request is queued first, then the
        # consumer's nack park (which the worker forwards to the parent's pipe)
        t = threading.Thread(target=lambda: box.update(r=c2.update(key, checkpoint=0)))
        t.start()
        time.sleep(0.3)
        assert conn.nack([1, 2, 3], "park", "late")
        time.sleep(0.3)
    finally:
        os.kill(parent, signal.SIGCONT)
    t.join(30)
    assert "r" in box
    # after the move, 1..3 are delivered again (§2 update checkpoint)
    sub.wait_count(6, timeout=30)
    time.sleep(1.0)
    with open(daemon.log_path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    assert "Traceback" not in text and "could not park events" not in text, \
        "a late nack park (positions no longer in flight) logged an error:\n%s" % text[-3000:]


@pytest.mark.timeout(90)
def test_worker_warnings_name_their_pool(daemon: Daemon, short_tmp: str) -> None:
    """PROTOCOL §2: a pool's name is "used in logs". Two pools delivering to the same
    unreachable subscriber each log "subscriber not reachable" from their worker; an
    operator must be able to tell which pool each warning is about (its name or key),
    not only `path=... worker=0`."""
    c = daemon.client()
    path = os.path.join(short_tmp, "nobody.sock")
    keys = []
    for name in ("orders", "billing"):
        st = c.start({"name": name, "type": "stream", "selector": "$all",
                      "subscriber": "unix:" + path})
        keys.append(st["key"])

    def warnings() -> list:
        with open(daemon.log_path, encoding="utf-8", errors="replace") as f:
            return [ln for ln in f if "WARNING" in ln and "subscriber not reachable" in ln]
    lines = wait_until(lambda: (lambda w: w if len(w) >= 2 else None)(warnings()), 30,
                       "two 'subscriber not reachable' warnings")
    for key in keys:
        assert any(key in ln for ln in lines), \
            "no 'subscriber not reachable' warning names pool %s:\n%s" % (key, "".join(lines))


@pytest.mark.timeout(120)
def test_a_subscriber_that_never_reads_is_not_warned_about_on_every_reconnect(
        make_daemon: Any, short_tmp: str) -> None:
    """One cause, one warning stream that does not grow without bound: a subscriber that
    accepts and never reads is cut off at output_buffer_bytes, reconnected, cut off again,
    forever (README "Limits"). The daemon warns on every round (~10 lines a minute, for
    as long as it lasts), where the analogous unreachable subscriber is warned about once
    and an event redelivered again and again at its 20th, 100th, 1,000th... attempt.
    Here: after 4 rounds, at most 2 warnings are expected (say, the first and a reminder)."""
    import socket
    d = make_daemon("--max-frame-bytes", "1048576", "--output-buffer-bytes", "1048576",
                    "--max-event-bytes", "65536")
    path = os.path.join(short_tmp, "deaf.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    lsock.settimeout(0.5)
    held = []
    try:
        c = d.client()
        c.start({"name": "deaf", "type": "stream", "selector": "$all",
                 "subscriber": "unix:" + path, "start_from": "origin"})
        for _ in range(30):
            c.publish([{"stream": "s", "type": "t", "data": "x" * 30000} for _ in range(10)])
        deadline = time.monotonic() + 90
        while len(held) < 5 and time.monotonic() < deadline:   # 4 cut-offs, 5th connect
            try:
                conn, _ = lsock.accept()
                held.append(conn)          # accepted, never read
            except socket.timeout:
                pass
        assert len(held) >= 5, "the worker reconnected only %d times" % len(held)
        with open(d.log_path, encoding="utf-8", errors="replace") as f:
            warn = [ln for ln in f if "WARNING" in ln and "output buffer" in ln]
        assert len(warn) <= 2, "%d warnings for one subscriber that does not read:\n%s" % (
            len(warn), "".join(warn))
    finally:
        for s in held:
            s.close()
        lsock.close()


@pytest.mark.timeout(60)
def test_clients_leaving_before_their_answer_do_not_flood_the_log(daemon: Daemon) -> None:
    """A client that sends a request and closes without reading the answer (a killed
    script, `timeout 1 emitterctl list`) gets one unthrottled WARNING line
    ("control connection closed reason=send failed: Broken pipe") per connection: any
    local client can write the log full at warning level, while the other lines a client
    can cause per connection (framing errors, refused peers, max_connections) are
    throttled (logs.Throttle: 5 a minute). Nothing in it is for the operator to act on."""
    import socket
    import struct

    import msgpack
    payload = msgpack.packb({"id": 1, "op": "list"}, use_bin_type=True)
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(daemon.socket)
        s.sendall(struct.pack(">I", len(payload)) + payload)
        s.close()
    daemon.client().ping()              # every one of them was handled before this answer

    def lines() -> list:
        with open(daemon.log_path, encoding="utf-8", errors="replace") as f:
            return [ln for ln in f if "control connection closed" in ln
                    and (" WARNING " in ln or " ERROR " in ln)]
    time.sleep(0.5)
    got = lines()
    assert len(got) <= 10, "%d log lines for 100 clients that left early, e.g.:\n%s" % (
        len(got), "".join(got[:3]))


@pytest.mark.timeout(90)
def test_unwritable_log_does_not_repeat_the_checkpoint_error_every_second(
        daemon: Daemon, subscribers: Any) -> None:
    """README "Limits": an immutable log file answers `unavailable` and the daemon goes
    on. While the checkpoints cannot be written, registry.flush_checkpoints logs
    "ERROR could not persist checkpoints" on every flush (once a second, forever, and
    without naming a pool), where the checkpointer says "keeps failing" at its 10th,
    120th... failure and registry.persist logs once per subscription."""
    import subprocess

    from test_limits import _chattr_works
    why = _chattr_works(daemon.root)
    if why:
        pytest.skip(why)
    sub = subscribers(lambda ev, conn: HOLD)
    c = daemon.client()
    start_pool(daemon, c, sub_spec("unwritable", subscriber=sub.uri, start_from="origin"))
    conn = sub.wait_hellos(1)[0]
    c.publish(events(20))
    sub.wait_count(20, timeout=20)
    files = [os.path.join(daemon.data_dir, n) for n in ("emitterd.db", "emitterd.db-wal")]
    for f in files:
        subprocess.run(["chattr", "+i", f], check=True, timeout=10)
    try:
        conn.ack([1, 2, 3])          # the checkpoint moves; it cannot be written
        time.sleep(8)                # 8 flushes at checkpoint_interval 1 s
        with open(daemon.log_path, encoding="utf-8", errors="replace") as f:
            lines = [ln for ln in f if "could not persist checkpoints" in ln]
    finally:
        for f in files:
            subprocess.run(["chattr", "-i", f], timeout=10)
    assert len(lines) <= 2, "%d lines for one cause in 8 s, e.g.:\n%s" % (
        len(lines), "".join(lines[:3]))


def _metrics_port(d: Daemon) -> int:
    import re

    def port() -> Any:
        with open(d.log_path, encoding="utf-8", errors="replace") as f:
            m = re.search(r"metrics exporter listening address=\S+:(\d+)", f.read())
        return int(m.group(1)) if m else None
    return wait_until(port, 20, "the metrics exporter's address in the log")


def _http(port: int, request: bytes) -> bytes:
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(request)
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                return out
            out += b
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_head_of_an_unknown_path_has_no_body(make_daemon: Any) -> None:
    """RFC 9110 §9.3.2: the server MUST NOT send content in the response to HEAD. The
    exporter answers HEAD /metrics without a body (right) but HEAD of any other path with
    a 404 *and* its 24-byte body."""
    d = make_daemon("--metrics-listen", "127.0.0.1:0")
    port = _metrics_port(d)
    ok = _http(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
    assert ok.startswith(b"HTTP/1.0 200") and ok.endswith(b"\r\n\r\n"), ok
    nf = _http(port, b"HEAD /nothing-here HTTP/1.0\r\n\r\n")
    head, _, body = nf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 404"), nf
    assert body == b"", "a HEAD request got a body: %r" % body


@pytest.mark.timeout(90)
def test_unwritable_log_does_not_log_a_traceback_per_park_attempt(
        daemon: Daemon, subscribers: Any) -> None:
    """The same cause (an event log that cannot be written, README "Limits": "an event
    whose park cannot be written stays in the flow and comes again after the longest
    retry backoff"): every failed park attempt is an ERROR line with a full traceback,
    again on each redelivery, for as long as the disk stays full."""
    import subprocess

    from test_limits import _chattr_works
    why = _chattr_works(daemon.root)
    if why:
        pytest.skip(why)
    sub = subscribers(lambda ev, conn: ("nack", "park", "refused"), listen=False)
    c = daemon.client()
    c.start(sub_spec("parkfail", subscriber=sub.uri, start_from="origin",
                     retry_backoff=[0.1, 0.5]))
    c.publish([{"stream": "s-%d" % i, "type": "t"} for i in range(20)])
    files = [os.path.join(daemon.data_dir, n) for n in ("emitterd.db", "emitterd.db-wal")]
    for f in files:
        subprocess.run(["chattr", "+i", f], check=True, timeout=10)
    try:
        sub.listen()
        sub.wait_count(100, timeout=60)      # each event offered (and refused) 5 times
        with open(daemon.log_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    finally:
        for f in files:
            subprocess.run(["chattr", "-i", f], timeout=10)
    errors = text.count("could not park events")
    tracebacks = text.count("Traceback")
    assert errors <= 2 and tracebacks <= 1, \
        "%d 'could not park events' errors and %d tracebacks for one unwritable log" % (
            errors, tracebacks)


def log_text(d: Daemon) -> str:
    with open(d.log_path, encoding="utf-8", errors="replace") as f:
        return f.read()


@pytest.mark.timeout(60)
def test_full_stderr_pipe_does_not_block_the_daemon(short_tmp: str) -> None:
    """A daemon whose stderr is a pipe that nobody reads (a stalled log collector, a paused
    `emitterd run 2>&1 | less`, journald busy) must not stop serving: a log line that cannot be
    written now must not block the loop (it stops answering, pinging the watchdog, delivering)."""
    d = Daemon([])
    r, w = os.pipe()
    try:
        # the smallest pipe the kernel gives (one page): a few log lines fill it
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
        d.proc = subprocess.Popen(d.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=w, env=d.env, cwd=d.root, start_new_session=True)
        os.close(w)
        w = -1
        d.track(d.proc.pid)
        d.wait_ping(20)
        d.collect_children()
        # each start/stop writes two info lines (~150 bytes each): 100 of them are ~30 KB,
        # several times what the pipe holds; nobody reads r
        with Client(d.socket, timeout=5.0) as c:
            for i in range(100):
                st = c.request("start", {"subscription": {"name": "p%d" % i, "type": "stream",
                                                           "selector": "s"}}, timeout=5.0)
                c.request("stop", {"key": st["key"], "delete": True}, timeout=5.0)
            assert c.ping()["head"] == 0
    finally:
        if w >= 0:
            os.close(w)
        os.close(r)          # a blocked write gets EPIPE now: the daemon can stop
        d.cleanup()


def _attach_and_send_garbage(d: Daemon, key: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(d.socket)
        s.sendall(framing.encode({"id": 1, "op": "attach", "args": {"key": key}}))
        ln = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
        assert msgpack.unpackb(s.recv(ln, socket.MSG_WAITALL), raw=False)["ok"]
        s.sendall(struct.pack(">I", 3) + b"\xc1\xc1\xc1")     # 0xc1: never valid msgpack
        ln = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))[0]
        err = msgpack.unpackb(s.recv(ln, socket.MSG_WAITALL), raw=False)
        assert err["error"]["code"] == "bad_frame"
        assert s.recv(1) == b""          # closed by the worker
    finally:
        s.close()


@pytest.mark.timeout(30)
def test_consumer_bad_frame_is_named_in_the_log(daemon: Daemon) -> None:
    """A consumer that sends a frame the daemon cannot decode: the log must say so, and a client
    that does it over and over must not write a line per connection (the control socket's bad
    frames go through logs.Throttle; a consumer connection's do not)."""
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("garbage", pool_size=1))["key"]
    _attach_and_send_garbage(daemon, key)
    line = wait_for(lambda: [ln for ln in log_text(daemon).splitlines()
                             if "consumer connection closed" in ln], 10,
                    "the worker's line about the closed connection")[0]
    # it says reason="closed after final response": nothing tells the operator that the
    # consumer broke the protocol (a wrong op says "not a valid ack or nack: op ...")
    assert "bad_frame" in line or "msgpack" in line, line


@pytest.mark.timeout(60)
def test_consumer_bad_frame_flood_is_throttled(daemon: Daemon) -> None:
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("garbage", pool_size=1))["key"]
    before = len(log_text(daemon).splitlines())
    for _ in range(100):
        _attach_and_send_garbage(daemon, key)
    c.ping()
    wait_for(lambda: c.status(key)["workers"][0]["consumers"] == 0, 10)
    lines = [ln for ln in log_text(daemon).splitlines()[before:]
             if "consumer connection closed" in ln]
    # control-socket bad frames: at most 5 lines a minute (logs.Throttle, "a line any client
    # can cause once per connection (a refused peer, a bad frame)"); here each of the 100
    # connections writes its own info line (with "consumer attached": ~4,000 lines/s from a
    # tight loop)
    assert len(lines) <= 20, "%d log lines for 100 bad consumer frames:\n%s" % (
        len(lines), "\n".join(lines[:4]))


@pytest.mark.timeout(60)
def test_half_sent_frames_do_not_write_a_warning_per_connection(make_daemon: Any) -> None:
    """A client that opens connections and sends each a frame's start, never its end, gets a
    warning line per connection: the other lines a client can cause once per connection (a
    refused peer, a bad frame, max_connections) go through logs.Throttle (5 a minute, then one
    with suppressed=N); this one does not."""
    d = make_daemon("--partial-frame-timeout", "0.5")
    socks: List[socket.socket] = []
    try:
        for _ in range(30):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            s.sendall(struct.pack(">I", 100) + b"\x81")      # 1 byte of a 100-byte frame
            socks.append(s)
        for s in socks:
            s.settimeout(10)
            assert s.recv(1) == b""                           # closed by the daemon
    finally:
        for s in socks:
            s.close()
    c = d.client()
    c.ping()
    lines = wait_for(lambda: [ln for ln in log_text(d).splitlines() if "half sent" in ln], 5,
                     "the half-sent-frame lines")
    assert len(lines) <= 6, "%d warnings for 30 connections of one client:\n%s" % (
        len(lines), "\n".join(lines[:3]))
