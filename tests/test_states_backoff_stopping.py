"""A stop draining a pool that was in `backoff`: README ("Readings of the contract", ping):
"A pool reads ``stopped`` once drained (``running`` while it still waits for acks)"; and §2
`start`: "a stopped, backoff or failed pool starts again ...; already_started if it runs".
Observed: during the drain the pool reads "backoff", yet `start` answers already_started
("is already running") - the state a client sees and the answer it gets disagree."""
import os
import signal
import threading
from typing import Any

import pytest

from emitterd.client import Client, EmitterError
from subscriber_helper import start_pool, sub_spec, wait_status
from waits import ready_status, wait_for


@pytest.mark.timeout(120)
def test_stopping_a_backoff_pool_reads_running_while_it_drains(make_daemon):
    d = make_daemon("--restart-backoff", "60,60")
    c = d.client()
    sub = {"name": "bs", "type": "stream", "selector": "$all", "pool_size": 2,
           "start_from": "origin", "options": {"max_restarts": 0, "strategy": "round_robin"}}
    key = c.start(sub)["key"]
    st = ready_status(d, c, key, 2, timeout=30)
    for w in st["workers"]:
        d.track(w["pid"])
    consumer = Client(d.socket, timeout=30).attach(key)       # lands on worker 0
    wait_for(lambda: any(w["index"] == 0 and w["consumers"] == 1
                         for w in c.status(key)["workers"]), 20, "consumer on worker 0")
    os.kill(next(w["pid"] for w in st["workers"] if w["index"] == 1), signal.SIGKILL)
    wait_for(lambda: c.status(key)["state"] == "backoff", 20, "backoff")
    c.publish([{"stream": "s", "type": "t"}])
    frame = consumer.recv(timeout=20)
    assert frame and frame["events"], "the surviving worker delivers in backoff"
    # the event stays unacked: a stop from another connection drains for it
    stopped = {}

    def stopper() -> None:
        with Client(d.socket, timeout=60) as c2:
            stopped["st"] = c2.stop(key, drain_timeout=40)
    t = threading.Thread(target=stopper, daemon=True)
    t.start()
    try:
        def stopping() -> bool:
            try:
                c.parked(key, "replay")
            except EmitterError as e:
                return e.code == "unavailable" and "stopping" in e.message
            return False
        wait_for(stopping, 20, "the stop to be draining (replay refused as stopping)")
        assert t.is_alive()
        state = c.status(key)["state"]
        try:
            c.start(sub)
            start_answer = "ok"
        except EmitterError as e:
            start_answer = e.code
        assert not (start_answer == "already_started" and state != "running"), (
            "while a stop drains a pool that was in backoff, status reads %r but start answers "
            "already_started (\"already running\"); README: a draining pool reads running, and "
            "§2: a backoff pool starts again" % state)
        assert state == "running", "a draining pool reads %r, README says running" % state
    finally:
        consumer.ack([e["position"] for e in frame["events"]])
        t.join(60)
        consumer.close()


@pytest.mark.timeout(60)
def test_worker_death_during_backoff_is_counted_when_it_is_replaced(make_daemon: Any) -> None:
    """PROTOCOL §2: pool status `restarts` = "unplanned worker restarts since the pool
    started" (and workers[].restarts per worker; the metric emitterd_pool_restarts_total). A
    worker that dies while its pool is in backoff is replaced when the backoff ends, an
    unplanned restart like any other, but no count shows it: an operator sees two crashed
    workers replaced and `restarts` 1."""
    d = make_daemon("--restart-backoff", "2,2")
    c = d.client()
    st = start_pool(d, c, sub_spec("crashy", pool_size=2, max_restarts=0))
    key = st["key"]
    pids = {w["index"]: w["pid"] for w in st["workers"]}
    os.kill(pids[0], signal.SIGKILL)
    wait_status(c, key, lambda s: s["state"] == "backoff", what="backoff")
    os.kill(pids[1], signal.SIGKILL)          # dies too, while the pool waits out its backoff
    st = wait_status(c, key, lambda s: s["state"] == "running" and len(s["workers"]) == 2
                     and all(w["state"] == "ready" and w["pid"] not in pids.values()
                             for w in s["workers"]),
                     what="both workers replaced after the backoff")
    d.collect_children()
    per_worker = {w["index"]: w["restarts"] for w in st["workers"]}
    assert (st["restarts"], per_worker) == (2, {0: 1, 1: 1}), \
        "two unplanned deaths, both workers replaced: restarts %r, per worker %r" % (
            st["restarts"], per_worker)
