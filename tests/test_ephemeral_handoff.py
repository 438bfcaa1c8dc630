"""An ephemeral subscription whose last attached consumer leaves while another client's attach
is being handed over (pending), and that handoff then fails (the client went away before its
answer was sent), is deleted: it was never deleted (no consumer, no timer)."""
from __future__ import annotations

import socket
import time

import pytest

from daemon_fixture import Daemon
from emitterd import framing
from subscriber_helper import start_pool, sub_spec, wait_status, wait_until


@pytest.mark.timeout(180)
def test_ephemeral_deleted_after_failed_handoff_of_the_consumer_that_was_pending(
        daemon: Daemon) -> None:
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("eph-pend", ephemeral=True))["key"]
    a = c.attach(key)
    wait_status(c, key, lambda s: s["workers"][0]["consumers"] == 1, what="a attached")
    # B: many pipelined pings whose answers it never reads (they fill the socket buffer
    # and stay in the daemon's output), then attach: its answer, and so its handoff, wait
    b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    b.connect(daemon.socket)
    n = 20000
    data = b"".join(framing.encode({"id": i, "op": "ping"}) for i in range(1, n + 1))
    data += framing.encode({"id": n + 1, "op": "attach", "args": {"key": key}})
    b.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 30
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += b.send(data[sent:])
        except BlockingIOError:
            time.sleep(0.01)
    assert sent == len(data)
    # the attach is counted as a consumer being handed over
    wait_status(c, key, lambda s: s["workers"][0]["consumers"] == 2, timeout=30,
                what="b's attach pending")
    a.close()        # the last attached consumer leaves by itself (b only pending)
    time.sleep(1.0)
    b.close()        # b goes before its answer went out: its handoff fails
    wait_status(c, key, lambda s: s["workers"][0]["consumers"] == 0, timeout=30,
                what="no consumer at all")
    # §3 / README: with no consumer it is deleted within 60 s (the client left; at the
    # latest, 60 s as after a cut). It must not stay forever.
    wait_until(lambda: key not in [p["key"] for p in c.list()["subscriptions"]], 90,
               "the ephemeral subscription without any consumer to be deleted")
