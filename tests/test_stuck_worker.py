"""A pinned pool with one stuck worker: its sibling still gets every event of its own streams,
the checkpoint waits for the stuck worker's events, and they go out in order once it moves.

PROTOCOL §3: each worker has its own window (`max_in_flight`); DESIGN §4: a slow worker must
not hold the pool. Before the per-slot read position (nineteenth session) the parent held back
at most 2 x max_in_flight x workers events for the stuck worker and then stopped reading for
every worker: the healthy one got 50 of its 150 events."""
from __future__ import annotations

import time
from typing import Any, Dict, List

import pytest

from daemon_fixture import Daemon
from emitterd.dispatch import stream_slot
from subscriber_helper import (ACK, HOLD, start_pool, sub_spec, subscribers,  # noqa: F401
                               wait_checkpoint, wait_until)


def _stream_on(slot: int) -> str:
    return next(s for s in ("s-%d" % i for i in range(64)) if stream_slot(s, 2) == slot)


@pytest.mark.timeout(60)
def test_a_stuck_worker_does_not_stall_its_sibling_and_catches_up_in_order(
        daemon: Daemon, subscribers: Any) -> None:
    stuck_stream, free_stream = _stream_on(0), _stream_on(1)
    moving = [False]

    def policy(ev: Dict[str, Any], conn: Any) -> Any:
        return ACK if moving[0] or conn.worker == 1 else HOLD
    sub = subscribers(policy, name="stuck")
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("stuck", subscriber=sub.uri, pool_size=2,
                                         strategy="pinned", batch_size=5, max_in_flight=10,
                                         ack_timeout=600))["key"]
    sub.wait_hellos(2)
    want: Dict[str, List[int]] = {stuck_stream: [], free_stream: []}
    for _ in range(3):        # three publishes, so the later ones meet a full stuck worker
        evs = [{"stream": (stuck_stream, free_stream)[i % 2], "type": "t", "data": i}
               for i in range(100)]
        for e, p in zip(evs, c.publish(evs)["positions"]):
            want[e["stream"]].append(p)
        time.sleep(0.2)

    def got(stream: str) -> List[int]:
        return [e["position"] for x in sub.snapshot_conns() for e in x.events
                if e["stream"] == stream]
    wait_until(lambda: len(got(free_stream)) == 150, 15,
               what="the healthy worker's 150 events")
    assert got(free_stream) == want[free_stream]
    assert len(got(stuck_stream)) == 10          # its window, and not one more
    st = c.status(key)
    assert st["checkpoint"] == want[stuck_stream][0] - 1, st
    # the stuck worker moves again: the rest of its events follow, in order, once each
    moving[0] = True
    for x in sub.snapshot_conns():
        if x.held:
            x.ack(list(x.held))
    head = c.ping()["head"]
    wait_checkpoint(c, key, head, timeout=20)
    assert got(stuck_stream) == want[stuck_stream]
    assert got(free_stream) == want[free_stream]
    assert all(e["attempt"] == 1 for e in sub.delivered(key))
