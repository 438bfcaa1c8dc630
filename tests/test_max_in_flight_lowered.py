"""Lowering options.max_in_flight live, below what a worker
already holds, must not crash the pool's dispatch (PROTOCOL §2 update: "applied live to a
running pool ... nothing in flight is lost"; DESIGN §4: a bug is an `internal` for one
request, never a pool failure)."""
from __future__ import annotations

from typing import Any

import pytest

from daemon_fixture import Daemon
from emitterd.dispatch import stream_slot
from subscriber_helper import (ACK, HOLD, start_pool, sub_spec, subscribers,  # noqa: F401
                               wait_status, wait_until)


def _streams_on(slot: int, n: int, count: int) -> list:
    out = []
    i = 0
    while len(out) < count:
        s = "acct-%d" % i
        if stream_slot(s, n) == slot:
            out.append(s)
        i += 1
    return out


@pytest.mark.timeout(60)
def test_lowering_max_in_flight_below_a_workers_load_keeps_the_pool_running(
        daemon: Daemon, subscribers: Any) -> None:
    s0 = _streams_on(0, 2, 1)[0]
    s1 = _streams_on(1, 2, 1)[0]

    # the subscriber holds (never acks) the events of s0, acks everything else
    def policy(event: Any, conn: Any) -> Any:
        return HOLD if event["stream"] == s0 else ACK
    sub = subscribers(policy)
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("lower-window", subscriber=sub.uri, pool_size=2,
                                         max_in_flight=64, ack_timeout=600))["key"]
    sub.wait_hellos(2)
    c.publish([{"stream": s0, "type": "t", "data": i} for i in range(10)])
    wait_status(c, key, lambda st: st["in_flight"] == 10, what="10 events held on worker 0")
    st = c.update(key, options={"max_in_flight": 2})    # worker 0 now holds 8 over its window
    assert st["state"] == "running"
    # an event for the other worker, which has all its room
    pos = c.publish([{"stream": s1, "type": "t", "data": "x"}])["positions"][0]
    wait_until(lambda: pos in sub.positions(key) or c.status(key)["state"] != "running", 15,
               what="event %d of stream %s delivered (worker 1 has room)" % (pos, s1))
    st = c.status(key)
    assert st["state"] == "running", "pool is %s after lowering max_in_flight:\n%s" % (
        st["state"], daemon.log_tail(30))
    assert pos in sub.positions(key)
    with open(daemon.log_path) as f:
        log = f.read()
    assert "Traceback" not in log, log[log.index("Traceback") - 300:][:2000]
