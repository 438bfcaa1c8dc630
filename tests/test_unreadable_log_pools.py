"""A stopped or failed pool whose events cannot be read (a damaged chunk).

Commit 8bfb3f6 made Pool.pump() of a stopped or failed pool call
dispatcher.pass_unmatched(), which reads the log. Registry.pump_all() turns an exception
from pump() into pool.fail(); before, a failed pool's pump() returned at once. Then a pool
failed because its events cannot be read raised again on every loop turn (a traceback and
a "pool failed" error per turn, for good), and a *stopped* pool that nobody started was
turned into a failed one. Now the read error is said once and the state is kept."""
import os
import sqlite3

import pytest

from subscriber_helper import wait_checkpoint
from waits import wait_for


def _restart_with_the_first_chunk_damaged(d):
    """Stop the daemon, make the chunk of positions 1.. unreadable, start it: a client."""
    assert d.stop() == 0
    db = sqlite3.connect(os.path.join(d.data_dir, "emitterd.db"))
    n = db.execute("UPDATE chunks SET bodies = x'c1c1c1c1' WHERE first = 1").rowcount
    db.commit()
    db.close()
    assert n == 1
    d.start()
    return d.client()


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
    c = _restart_with_the_first_chunk_damaged(d)
    st = c.status(key)
    before_state = st["state"]
    for _ in range(200):
        c.ping()
    fails = _count(d.log_path, "pool failed")
    tracebacks = _count(d.log_path, "Traceback")
    assert before_state == "stopped" and fails <= 1, (
        "stopped pool (nobody started it) is %r; after 200 pings the log has %d 'pool failed' "
        "lines and %d tracebacks" % (before_state, fails, tracebacks))


@pytest.mark.timeout(90)
def test_update_checkpoint_past_damage_lets_a_stopped_pool_pass_unmatched_events(make_daemon):
    """A stopped pool whose scan of unmatched events meets an unreadable log
sets Dispatcher.scan_failed, which only Pool.start() clears. `update --checkpoint P`
(PROTOCOL §2: "moves the cursor: events after P are delivered (again), events up to P are
not") past the damaged range does not clear it: the stopped pool's checkpoint then never
passes the readable events after P that do not match it (§5: "so it passes events that do
not match"), however many are published."""
    d = make_daemon()
    c = d.client()
    ps = c.publish([{"stream": "a", "type": "t", "data": i} for i in range(50)])["positions"]
    key = c.start({"name": "p", "type": "stream", "selector": "a",
                   "start_from": "origin"})["key"]
    c.stop(key)
    c.close()
    c = _restart_with_the_first_chunk_damaged(d)
    wait_for(lambda: _count(d.log_path, "cannot be read for a pool that is stopped") >= 1, 20,
             what="the stopped pool's scan to meet the damaged chunk")
    # the operator moves the checkpoint past the damaged range (it is 'p''s own events)
    st = c.update(key, checkpoint=ps[-1])
    assert st["state"] == "stopped" and st["checkpoint"] == ps[-1], st
    more = c.publish([{"stream": "x", "type": "t"}] * 10)["positions"]
    try:
        wait_checkpoint(c, key, more[-1], timeout=10)
    except AssertionError:
        st = c.status(key)
        pytest.fail("stopped pool: checkpoint %r, head %r: the 10 readable events after the "
                    "moved checkpoint do not match it and are not passed (§5)"
                    % (st["checkpoint"], st["head"]))
