"""A worker process holds a batch marked "held" until the parent says "durable".

The parent now writes held batches to a worker together with the durable notice, after its
fdatasync (control/events.py), so end-to-end tests no longer see a worker holding anything.
The worker's side stays as the safety net for a batch that leaves early; this test drives a
real forked worker (emitterd/worker/main.py) over its pipe as the parent would and watches
what reaches a real unix: subscriber socket.
"""
from __future__ import annotations

import os
import signal
import socket
import time
from typing import List

import msgpack
import pytest

from emitterd import framing, procs
from emitterd.worker import main as worker_main


def _events_frame(key: str, positions: List[int]) -> bytes:
    body = msgpack.packb({"op": "events", "key": key,
                          "events": [{"position": p, "data": "e%d" % p} for p in positions]})
    return len(body).to_bytes(4, "big") + body


def _read_frames(sock: socket.socket, decoder: framing.Decoder, seconds: float,
                 want: int = 0) -> List[dict]:
    """The frames that arrive on sock within `seconds` (sooner once `want` have come)."""
    out: List[dict] = []
    deadline = time.monotonic() + seconds
    while not want or len(out) < want:
        left = deadline - time.monotonic()
        if left <= 0:
            return out
        sock.settimeout(left)
        try:
            data = sock.recv(1 << 16)
        except socket.timeout:
            return out
        if not data:
            return out
        decoder.feed(data)
        while True:
            msg = decoder.next()
            if msg is None:
                break
            out.append(msg)
    return out


@pytest.mark.timeout(30)
def test_worker_delivers_a_held_batch_only_after_durable(short_tmp: str) -> None:
    path = os.path.join(short_tmp, "sub.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    spec = {"key": "k1", "name": "hold", "index": 0, "subscriber": "unix:" + path,
            "ack_timeout": 30.0, "heartbeat_interval": 5.0, "max_frame": 1 << 20,
            "out_cap": 1 << 20}
    pid, parent_end = procs.spawn("emitterd-test: hold worker", lambda s: worker_main.main(s, spec))
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        sub = framing.Decoder(1 << 20)
        hello = _read_frames(conn, sub, 5.0, want=1)
        assert hello and hello[0]["op"] == "hello"

        parent_end.setblocking(True)
        parent_end.sendall(framing.encode({"op": "deliver", "positions": [5, 6],
                                           "frame": _events_frame("k1", [5, 6]), "held": 6}))
        assert _read_frames(conn, sub, 0.5) == [], "a held batch reached the subscriber"

        # a durable notice below the batch's last position releases nothing
        parent_end.sendall(framing.encode({"op": "durable", "position": 5}))
        assert _read_frames(conn, sub, 0.3) == []

        parent_end.sendall(framing.encode({"op": "durable", "position": 6}))
        got = _read_frames(conn, sub, 5.0, want=1)
        assert [m["op"] for m in got] == ["events"]
        assert [e["position"] for e in got[0]["events"]] == [5, 6]
        conn.close()
    finally:
        parent_end.close()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        listener.close()
