"""PROTOCOL §5: "The checkpoint of a subscription is the highest position P <= head such that
every event at or below P that matches it has been acked, skipped or parked (so it passes
events that do not match)." A stopped pool's checkpoint passes non-matching events
(dispatch.pass_unmatched: "§5 defines it so, whatever the pool's state"); a pool that is
`failed` (restart intensity exceeded repeatedly) keeps its checkpoint below events that do not
match it, for as long as it stays failed - and its lag (head - checkpoint) grows."""
import os
import signal
import time

import pytest

from waits import ready_status, wait_for


def _drive_to_failed(c, key, d):
    deadline = time.monotonic() + 60
    while c.status(key)["state"] != "failed":
        assert time.monotonic() < deadline, "pool never failed: %r" % c.status(key)
        st = c.status(key)
        ready = [w for w in st["workers"] if w["state"] == "ready"]
        if st["state"] == "running" and ready:
            d.track(ready[0]["pid"])
            os.kill(ready[0]["pid"], signal.SIGKILL)
            wait_for(lambda: all(w["pid"] != ready[0]["pid"] for w in c.status(key)["workers"]),
                     20, "death seen")
        time.sleep(0.05)


@pytest.mark.timeout(120)
def test_failed_pool_checkpoint_passes_events_that_do_not_match(make_daemon):
    d = make_daemon("--max-backoffs", "1", "--restart-backoff", "0.3,0.3")
    c = d.client()
    opts = {"max_restarts": 0}
    failed = c.start({"name": "f", "type": "stream", "selector": "wanted", "start_from": "origin",
                      "options": opts})["key"]
    stopped = c.start({"name": "s", "type": "stream", "selector": "wanted",
                       "start_from": "origin", "options": opts})["key"]
    for k in (failed, stopped):
        ready_status(d, c, k, 1, timeout=30)
    _drive_to_failed(c, failed, d)
    c.stop(stopped)
    head = c.publish([{"stream": "other", "type": "t"} for _ in range(5)])["positions"][-1]
    # the stopped pool's checkpoint passes them (as §5 says) ...
    wait_for(lambda: c.status(stopped)["checkpoint"] == head, 20, "stopped pool checkpoint")
    # ... and so must the failed pool's: none of the events matches it
    try:
        wait_for(lambda: c.status(failed)["checkpoint"] == head, 10, "failed pool checkpoint")
    except AssertionError:
        st = c.status(failed)
        raise AssertionError("failed pool: checkpoint %d, head %d, though no event matches it "
                             "(a stopped pool's checkpoint is %d)"
                             % (st["checkpoint"], st["head"], c.status(stopped)["checkpoint"]))
