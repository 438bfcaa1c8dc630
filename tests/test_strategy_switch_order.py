"""Switching a pool to `pinned` live must keep a stream's new
events behind its events still in flight on another worker -- the same way whether or not
the pool was pinned before.

PROTOCOL §3: "`pinned` maps each stream to one worker ..., so a stream's events go out in
position order"; DESIGN §4: "the stream's new events wait until its in-flight events on the
old worker are finished". emitterd does wait after a first switch round_robin -> pinned, but
not after pinned -> round_robin -> pinned (stale routing cache in Dispatcher)."""
from __future__ import annotations

import time
from typing import Any

import pytest

from daemon_fixture import Daemon
from emitterd.dispatch import stream_slot
from subscriber_helper import (ACK, HOLD, start_pool, sub_spec, subscribers,  # noqa: F401
                               wait_until)


def _run(daemon: Daemon, subscribers: Any, first: str, name: str) -> tuple:
    held: set = set()

    other = 1 - stream_slot("X", 2)      # the worker that is not X's pinned slot

    def policy(ev: Any, conn: Any) -> Any:
        # hold the first X event that round robin put on the other worker, ack the rest
        if ev["stream"] == "X" and not held and conn.worker == other:
            held.add(ev["position"])
            return HOLD
        return ACK
    sub = subscribers(policy, name=name)
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec(name, subscriber=sub.uri, pool_size=2,
                                         strategy=first, ack_timeout=600))["key"]
    sub.wait_hellos(2)
    if first == "pinned":
        p = c.publish([{"stream": "Y", "type": "t"}])["positions"][0]
        wait_until(lambda: p in sub.positions(key), 10, what="Y delivered")
        c.update(key, options={"strategy": "round_robin"})
    xs = c.publish([{"stream": "X", "type": "t", "data": i} for i in range(4)])["positions"]
    wait_until(lambda: set(xs) <= set(sub.positions(key)), 10, what="4 X events delivered")
    assert held, "test premise: round robin put an X event on worker %d" % other
    # round robin spread X over both workers; the first X is held unacked on one of them
    c.update(key, options={"strategy": "pinned"})
    late = c.publish([{"stream": "X", "type": "t", "data": "late"}])["positions"][0]
    time.sleep(1.5)            # give the daemon the chance to (wrongly) send it
    early = sorted(held)[0]
    worker_of = {e["position"]: x.worker for x in sub.snapshot_conns() for e in x.events}
    sent_early = late in worker_of
    if sent_early:
        assert worker_of[late] != worker_of[early], "test premise: another worker"
    c.stop(key, delete=True, drain_timeout=0)
    return early, late, sent_early


@pytest.mark.timeout(60)
def test_first_switch_to_pinned_waits_for_the_streams_earlier_event(daemon: Daemon,
                                                                   subscribers: Any) -> None:
    early, late, sent = _run(daemon, subscribers, "round_robin", "rr1")
    assert not sent, "X@%d delivered while X@%d was still unacked on another worker" % (
        late, early)


@pytest.mark.timeout(60)
def test_switch_back_to_pinned_waits_for_the_streams_earlier_event(daemon: Daemon,
                                                                  subscribers: Any) -> None:
    early, late, sent = _run(daemon, subscribers, "pinned", "rr2")
    assert not sent, ("pinned -> round_robin -> pinned: X@%d was delivered while X@%d, an "
                      "earlier event of the same stream, was still unacked on another worker "
                      "(after a first switch to pinned it waits)" % (late, early))
