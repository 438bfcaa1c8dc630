"""PROTOCOL §2 update checkpoint ("events after P are delivered (again)") and what was in
flight before it: parked events replayed (§2 parked replay: "sends them again with attempt
1 ... the checkpoint never moves back"), and acks of the earlier deliveries.

A replay of parked events that lie after the cursor (update checkpoint moved it back, and
the pool has not re-read them yet: same turn, a full window, an attached pool with no
consumer) queued them as replays while the log read sent them again as new events: each
went out twice, one ack finished only one of the two deliveries, and the other stayed in
flight for good: status.in_flight never returned to 0, every stop waited its whole
drain_timeout and then warned, and the replayed rows were neither listed nor removed."""
import os
import signal
from typing import Any, List

import psutil
import pytest

from emitterd import procs

from raw_subscriber import RawSubscriber
from waits import wait_until


def _ack_all(recv: Any, ack: Any) -> List[int]:
    """A subscriber that acks every frame it gets, until none came for 1 s after positions
    1..3 were all seen; the positions delivered, in order."""
    seen: List[int] = []
    while True:
        try:
            frame = recv(timeout=1.0 if len(set(seen)) >= 3 else 10.0)
        except TimeoutError:
            break
        if frame is None:
            break
        ps = [e["position"] for e in frame["events"]]
        seen += ps
        ack(ps)
    assert set(seen) == {1, 2, 3}
    return seen


def _settled(c: Any, key: str, seen: List[int], checkpoint: int = 3) -> None:
    """Every delivery acked: nothing in flight (the pool's nor a worker's), the checkpoint
    at `checkpoint`, nothing parked nor listed."""
    def settled() -> bool:
        s = c.status(key)
        return (s["in_flight"] == 0 and all(w["in_flight"] == 0 for w in s["workers"])
                and s["checkpoint"] == checkpoint and s["parked"] == 0
                and not c.parked(key)["events"])
    try:
        wait_until(settled, 5, "nothing in flight")
    except AssertionError:
        s = c.status(key)
        pytest.fail("every delivery was acked (deliveries: %s) yet status says in_flight=%d, "
                    "workers' in_flight=%s, checkpoint=%d, parked=%d, parked list=%d"
                    % (seen, s["in_flight"], [w["in_flight"] for w in s["workers"]],
                       s["checkpoint"], s["parked"], len(c.parked(key)["events"])))


@pytest.mark.timeout(60)
def test_replay_after_checkpoint_moved_back_settles(daemon, short_tmp):
    sub = RawSubscriber(os.path.join(short_tmp, "s.sock"))
    try:
        c = daemon.client()
        key = c.start(sub.spec("replay"))["key"]
        sub.accept()
        c.publish([{"stream": "s", "type": "t"} for _ in range(3)])
        first = sub.recv()["events"]
        assert [e["position"] for e in first] == [1, 2, 3]
        sub.send({"op": "nack", "positions": [1, 2, 3], "action": "park", "reason": "bad"})
        wait_until(lambda: c.status(key)["parked"] == 3, 10, "3 parked")

        # the operator rewinds and replays the parked events (one pipelined batch)
        upd, rep = c.pipeline([("update", {"key": key, "checkpoint": 0}),
                               ("parked", {"key": key, "action": "replay"})])
        assert upd["checkpoint"] == 0
        assert rep["count"] == 3

        seen = _ack_all(sub.recv, lambda ps: sub.send({"op": "ack", "positions": ps}))
        _settled(c, key, seen)
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_replay_after_rewind_without_consumer_settles(daemon):
    """The same without pipelining: an attached pool whose consumer is away reads no
    matching event, so the replayed ones lie after its cursor until a consumer attaches."""
    c = daemon.client()
    key = c.start({"name": "replay-attach", "type": "stream", "selector": "$all",
                   "start_from": "origin", "pool_size": 1})["key"]
    wait_until(lambda: c.status(key)["workers"][0]["state"] == "ready", 10, "worker ready")
    c.publish([{"stream": "s", "type": "t"} for _ in range(3)])
    with daemon.client().attach(key) as con:
        got = []
        while len(got) < 3:
            frame = con.recv(timeout=10)
            assert frame is not None
            got += [e["position"] for e in frame["events"]]
        con.nack(got, "park", "bad")
        wait_until(lambda: c.status(key)["parked"] == 3, 10, "3 parked")
    wait_until(lambda: c.status(key)["workers"][0]["consumers"] == 0, 10, "the consumer gone")
    assert c.update(key, checkpoint=0)["checkpoint"] == 0
    assert c.parked(key, "replay")["count"] == 3
    with daemon.client().attach(key) as con:
        _settled(c, key, _ack_all(con.recv, con.ack))


# ---- a late ack of the delivery before the update ----------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ack_first", [True, False], ids=["ack-then-update", "update-then-ack"])
def test_ack_of_delivery_before_update_checkpoint_is_not_taken_for_the_new_one(daemon, short_tmp,
                                                                             ack_first):
    """PROTOCOL §2 update checkpoint: "events after P are delivered (again)"; README's reading:
    "late acks for earlier deliveries are ignored"; §5: the checkpoint passes only events that
    were acked, skipped or parked.
    
    An ack the consumer sent for the earlier delivery of position p, which reaches the parent
    after the update re-sent p to the same worker, is taken for an ack of the new delivery:
    the checkpoint passes p although nobody acked it since the update. Should the consumer
    then fail (or the daemon restart), p is never delivered again.
    
    Deterministic here: the worker is SIGSTOPped while the consumer's ack and the parent's
    "forget" + new delivery queue up for it, in either order; on SIGCONT it reads them in
    that order. Read first, the ack was forwarded and counted for the new delivery; read
    after the forget, it was taken for an ack of the new delivery by the worker itself."""
    sub = RawSubscriber(os.path.join(short_tmp, "s.sock"))
    wpid = None
    try:
        c = daemon.client()
        key = c.start(sub.spec("rewind"))["key"]
        sub.accept()
        c.publish([{"stream": "s", "type": "t"}])
        (ev,) = sub.recv()["events"]
        assert (ev["position"], ev["attempt"]) == (1, 1)
        wpid = c.status(key)["workers"][0]["pid"]

        os.kill(wpid, signal.SIGSTOP)
        if ack_first:
            sub.send({"op": "ack", "positions": [1]})    # in the worker's socket now
        assert c.update(key, checkpoint=0)["checkpoint"] == 0
        c.ping()          # a later turn: the update's re-delivery is written to the worker
        if not ack_first:
            # the parent's pipe became readable first: the worker (epoll returns fds in the
            # order they became ready) reads "forget" and the new delivery before this ack,
            # which the consumer sent before it saw the new delivery: still the old one's
            sub.send({"op": "ack", "positions": [1]})
        os.kill(wpid, signal.SIGCONT)
        wpid = None

        (again,) = sub.recv()["events"]                   # delivered again, as §2 says
        assert again["position"] == 1
        # ... and not acked. The ack of the first delivery must not count for it.
        # the worker wrote its report of the stale ack to the parent before the frame to
        # us; a ping answered after that turn orders the status after it
        c.ping()
        st = c.status(key)
        assert (st["checkpoint"], st["in_flight"]) == (0, 1), (
            "position 1 was delivered again after update checkpoint=0 and not acked since, "
            "yet checkpoint=%d in_flight=%d: the late ack of the earlier delivery counted"
            % (st["checkpoint"], st["in_flight"]))
    finally:
        if wpid is not None:
            os.kill(wpid, signal.SIGCONT)
        sub.close()


# ---- a forget that came with a spare's activate ----------------------------------------

def _spare_pid(daemon):
    for k in daemon.collect_children():
        try:
            if procs.service_name(k.cmdline()) == "spare":
                return k.pid
        except psutil.Error:
            pass
    return None


@pytest.mark.timeout(60)
def test_forget_sent_with_a_spare_activation_is_answered(daemon, short_tmp):
    """A "forget" sent to a worker that was a spare and has not read its "activate" yet is
    lost: the spare's standby() reads activate with a decoder of its own and drops whatever
    came with it. h.forgetting then stays 1 for good, and the parent drops every delivery
    report of that worker (acks, nacks, requeues): what it delivers stays in flight forever,
    the checkpoint never passes it.
    
    Deterministic: the spare is SIGSTOPped while it is handed the dead worker's slot and the
    update checkpoint arrives, so activate and forget are read in one recv()."""
    sub = RawSubscriber(os.path.join(short_tmp, "s.sock"))
    stopped = None
    try:
        c = daemon.client()
        key = c.start(sub.spec("spare", pool_size=1))["key"]
        sub.accept()
        # a first death: its replacement, once ready, has a spare forked for the next one
        os.kill(c.status(key)["workers"][0]["pid"], signal.SIGKILL)
        sub.accept()
        spare = wait_until(lambda: _spare_pid(daemon), 10, "a spare worker")
        os.kill(spare, signal.SIGSTOP)
        stopped = spare
        os.kill(c.status(key)["workers"][0]["pid"], signal.SIGKILL)
        wait_until(lambda: c.status(key)["workers"]
                   and c.status(key)["workers"][0]["pid"] == spare, 10, "the spare took the slot")
        assert c.update(key, checkpoint=0)["checkpoint"] == 0
        c.ping()
        os.kill(spare, signal.SIGCONT)
        stopped = None
        sub.accept()
        c.publish([{"stream": "s", "type": "t"}])
        (ev,) = sub.recv()["events"]
        sub.send({"op": "ack", "positions": [ev["position"]]})
        # (the worker's reports were dropped: its "forget" was lost with the spare's activate)
        _settled(c, key, [ev["position"]], checkpoint=1)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        sub.close()
