"""A client's `stop` that arrives while the daemon drains for SIGTERM joins the shutdown's
stop (Pool.stop: `st["waiters"].append(done)`), whose persist flag is False: the client is
answered with a stopped pool status, yet the subscription stays desired "running" on
disk and runs again at the next start. PROTOCOL §2 stop: "persists the checkpoint, stops
every worker"; a stopped pool stays stopped across restarts (start runs it again)."""
import os
import signal
import time

import pytest

from waits import ready_status, received, wait_for


@pytest.mark.timeout(120)
def test_stop_answered_during_shutdown_drain_is_persisted(make_daemon):
    d = make_daemon(env={"EMITTERD_DRAIN_TIMEOUT": "8"})
    c = d.client()
    st = c.start({"name": "p", "type": "stream", "selector": "s", "start_from": "origin",
                  "options": {"ack_timeout": 60}})
    key = st["key"]
    ready_status(d, c, key, 1, timeout=30)
    consumer = c.attach(key)
    c.publish([{"stream": "s", "type": "t"}])
    assert received(consumer, 1, timeout=20) == [1]      # held, never acked: the drain waits
    c.close()
    os.kill(d.proc.pid, signal.SIGTERM)
    c2 = d.client()
    wait_for(lambda: c2.ping().get("shutting_down"), 10, "shutting down")
    t0 = time.monotonic()
    res = c2.stop(key)            # joins the shutdown's drain
    assert res["state"] == "stopped"
    consumer.close()
    assert d.proc.wait(30) == 0
    d.start()
    c3 = d.client()
    st = c3.status(key)
    for w in st["workers"]:
        d.track(w["pid"])
    assert st["state"] == "stopped", ("the client's stop was answered %r, yet after a restart "
                                     "the pool is %r" % (res["state"], st["state"]))
