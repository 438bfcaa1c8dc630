"""A shrink applied while the pool is in backoff: when the backoff ends the pool must run
pool_size workers (PROTOCOL §2 update: "a shrink retires the highest indexes"), and a
worker above pool_size that dies must not be respawned (pool.py on_exit lost its
`h.index >= pool_size` guard; _end_backoff only _fill()s, never retires)."""
import os
import signal
import time

import pytest

from waits import ready_status, wait_for


@pytest.mark.timeout(90)
def test_shrink_during_backoff_is_applied_when_backoff_ends(make_daemon):
    d = make_daemon(env={"EMITTERD_RESTART_BACKOFF": "3,3"})
    c = d.client()
    st = c.start({"name": "bk", "type": "stream", "selector": "s", "pool_size": 2,
                  "options": {"max_restarts": 0}})
    key = st["key"]
    st = ready_status(d, c, key, 2, timeout=30)
    by_index = {w["index"]: w["pid"] for w in st["workers"]}
    os.kill(by_index[0], signal.SIGKILL)           # max_restarts 0: backoff at once
    wait_for(lambda: c.status(key)["state"] == "backoff", 20, "backoff")
    st = c.update(key, pool_size=1, options={"max_restarts": 5})
    assert st["subscription"]["pool_size"] == 1
    # backoff over: running again
    st = wait_for(lambda: (lambda s: s if s["state"] == "running" and any(
        w["index"] == 0 and w["state"] == "ready" for w in s["workers"]) else None)(c.status(key)),
        30, "backoff to end and worker 0 to be ready")
    for w in st["workers"]:
        d.track(w["pid"])
    # give the daemon every chance to retire index 1
    def settled():
        s = c.status(key)
        return s if [w["index"] for w in s["workers"] if w["state"] != "draining"] == [0] else None
    try:
        wait_for(settled, 15, "only worker 0 outside draining")
    except AssertionError:
        s = c.status(key)
        extra = [w for w in s["workers"] if w["index"] >= 1]
        # prove the second half: a death of the surplus worker is 'restarted'
        if extra:
            os.kill(extra[0]["pid"], signal.SIGKILL)
            before = s["restarts"]
            s2 = wait_for(lambda: (lambda x: x if x["restarts"] > before and all(
                w["pid"] != extra[0]["pid"] for w in x["workers"]) else None)(c.status(key)),
                20, "death seen")
            s2 = wait_for(lambda: (lambda x: x if all(w["state"] == "ready" for w in x["workers"])
                                   else None)(c.status(key)), 20, "ready")
            for w in s2["workers"]:
                d.track(w["pid"])
            raise AssertionError("pool_size 1 after a shrink during backoff, yet workers %r; "
                                 "after killing index 1 (a worker that should not exist): state=%s restarts=%d workers=%r" % (
                                     [(w["index"], w["state"]) for w in s["workers"]],
                                     s2["state"], s2["restarts"],
                                     [(w["index"], w["state"], w["pid"]) for w in s2["workers"]]))
        raise


@pytest.mark.timeout(90)
def test_a_consumer_is_never_placed_on_a_surplus_worker(make_daemon):
    """Consequence: attach counted every worker in pool.slots, the surplus one too, but events
    are routed over range(pool_size) only: the second consumer landed on worker 1 and was
    starved (§3: consumers of one pool compete; each event goes to one of them)."""
    d = make_daemon(env={"EMITTERD_RESTART_BACKOFF": "3,3"})
    c = d.client()
    st = c.start({"name": "bk2", "type": "stream", "selector": "s", "pool_size": 2,
                  "options": {"max_restarts": 0, "strategy": "round_robin"}})
    key = st["key"]
    st = ready_status(d, c, key, 2, timeout=30)
    os.kill({w["index"]: w["pid"] for w in st["workers"]}[0], signal.SIGKILL)
    wait_for(lambda: c.status(key)["state"] == "backoff", 20, "backoff")
    c.update(key, pool_size=1)
    st = wait_for(lambda: (lambda s: s if s["state"] == "running" and all(
        w["state"] == "ready" for w in s["workers"]) and any(w["index"] == 0 for w in s["workers"])
        else None)(c.status(key)), 30, "running again")
    for w in st["workers"]:
        d.track(w["pid"])
    a = c.attach(key)
    b = c.attach(key)
    try:
        assert (a.worker, b.worker) == (0, 0), (
            "pool_size 1, yet a consumer was attached to worker %d" % max(a.worker, b.worker))
        c.publish([{"stream": "s", "type": "t", "data": i} for i in range(20)])
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 20 and time.monotonic() < deadline:
            for x in (a, b):
                try:
                    f = x.recv(timeout=0.2)
                except TimeoutError:
                    continue
                if f is not None:
                    got += [e["position"] for e in f["events"]]
                    x.ack([e["position"] for e in f["events"]])
        assert len(set(got)) == 20, "delivered %d of 20 events to the pool's consumers" % len(set(got))
    finally:
        a.close()
        b.close()
