"""max_frame_bytes may be set up to 2**32-1 (settings), and PROTOCOL §1/§2 promise that
"a delivery frame never exceeds max_frame_bytes (batches are split)". The parent->worker
pipe reads at most PIPE_MAX_FRAME = 64 MiB (worker/main.py), so a delivery batch the
dispatcher builds up to max_frame_bytes (> 64 MiB) never reaches the worker: the worker
rejects its own parent's frame and the events are never delivered."""
import os
import select
import socket
import struct
import time

import msgpack
import pytest

from waits import ready_status, wait_for


def _enc(obj):
    b = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(b)) + b


def _recv_frame(s, buf, timeout):
    deadline = time.monotonic() + timeout
    while True:
        if len(buf) >= 4:
            n = struct.unpack(">I", bytes(buf[:4]))[0]
            if len(buf) >= 4 + n:
                p = bytes(buf[4:4 + n])
                del buf[:4 + n]
                return msgpack.unpackb(p, raw=False)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        r, _, _ = select.select([s], [], [], left)
        if not r:
            return None
        d = s.recv(1 << 22)
        if not d:
            raise EOFError("closed")
        buf += d


@pytest.mark.timeout(180)
def test_delivery_batches_over_64mib_frame_limit(make_daemon):
    d = make_daemon(env={"EMITTERD_MAX_FRAME_BYTES": str(96 << 20),
                         "EMITTERD_OUTPUT_BUFFER_BYTES": str(192 << 20)})
    c = d.client(timeout=120)
    big = "x" * 1_000_000
    for _ in range(10):
        c.publish([{"stream": "big", "type": "t", "data": big} for _ in range(8)])
    st = c.start({"name": "p", "type": "stream", "selector": "big", "start_from": "origin",
                  "options": {"batch_size": 100, "ack_timeout": 120}})
    key = st["key"]
    ready_status(d, c, key, 1, timeout=30)
    got = set()
    closes = 0
    deadline = time.monotonic() + 40
    while len(got) < 80 and time.monotonic() < deadline:
        if c.status(key)["state"] != "running":
            break
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d.socket)
        s.sendall(_enc({"id": 1, "op": "attach", "args": {"key": key}}))
        buf = bytearray()
        try:
            r = _recv_frame(s, buf, 30)
            if not (r and r.get("ok")):
                s.close()
                time.sleep(0.5)
                continue
            while len(got) < 80 and time.monotonic() < deadline:
                f = _recv_frame(s, buf, 5)
                if f is None:
                    continue
                ps = [e["position"] for e in f["events"]]
                got.update(ps)
                s.sendall(_enc({"op": "ack", "positions": ps}))
        except (EOFError, ConnectionError):
            closes += 1
        finally:
            s.close()
    st = c.status(key)
    assert len(got) == 80, ("delivered %d of 80 events with max_frame_bytes 96 MiB; pool %s, "
                            "restarts %d, consumer connections closed by the daemon %d, workers %r" % (
                                len(got), st["state"], st["restarts"], closes,
                                                         [(w["index"], w["state"]) for w in st["workers"]]))
