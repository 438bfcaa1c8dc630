"""Commit 8bfb3f6 makes Pool.pump() of a stopped or failed pool call
dispatcher.pass_unmatched(), which reads the log. Registry.pump_all() turns an exception
from pump() into pool.fail(); before, a failed pool's pump() returned at once. Now a pool
failed because its events cannot be read raises again on every loop turn: a traceback and
a "pool failed" error per turn (per request, ack, heartbeat), for good; and a *stopped*
pool that nobody started is turned into a failed one."""
import os
import sqlite3

import pytest

from waits import wait_for


def _count(path, text):
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace").count(text)


@pytest.mark.timeout(90)
def test_unreadable_events_fail_a_pool_once_not_every_turn(make_daemon):
    d = make_daemon()
    c = d.client()
    c.publish([{"stream": "a", "type": "t", "data": i} for i in range(50)])
    st = c.start({"name": "p", "type": "stream", "selector": "a", "start_from": "origin"})
    key = st["key"]
    c.stop(key)
    assert c.status(key)["state"] == "stopped"
    c.close()
    assert d.stop() == 0
    db = sqlite3.connect(os.path.join(d.data_dir, "emitterd.db"))
    n = db.execute("UPDATE chunks SET bodies = x'c1c1c1c1' WHERE first = 1").rowcount
    db.commit()
    db.close()
    assert n == 1
    d.start()
    c = d.client()
    st = c.status(key)
    before_state = st["state"]
    for _ in range(200):
        c.ping()
    fails = _count(d.log_path, "pool failed")
    tracebacks = _count(d.log_path, "Traceback")
    assert before_state == "stopped" and fails <= 1, (
        "stopped pool (nobody started it) is %r; after 200 pings the log has %d 'pool failed' "
        "lines and %d tracebacks" % (before_state, fails, tracebacks))
