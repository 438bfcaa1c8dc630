"""Failures on the event path (PROTOCOL §3 at-least-once, §5 checkpoint): killed workers,
a killed and restarted daemon, a subscriber that appears late or restarts, SIGTERM
while a slow consumer still works."""
from __future__ import annotations

import collections
import os
import signal
import time
from typing import Any, Dict

import psutil
import pytest

from daemon_fixture import Daemon
from old_logs import write_v2_log
from emitterd.client import Conflict, Unavailable
from subscriber_helper import (ACK, HOLD, ack_all, events, start_pool, sub_spec,  # noqa: F401
                               subscribers, wait_checkpoint, wait_status, wait_until)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


@pytest.mark.timeout(40)
def test_killed_workers_holding_unacked_events_get_them_redelivered(daemon: Daemon,
                                                                    subscribers: Any) -> None:
    phase = {"v": "hold"}
    sub = subscribers(lambda e, conn: HOLD if phase["v"] == "hold" else ACK)
    c = daemon.client()
    st = start_pool(daemon, c, sub_spec("kill", subscriber=sub.uri, pool_size=2))
    key = st["key"]
    old_pids = sorted(w["pid"] for w in st["workers"])
    sub.wait_hellos(2)
    ps = c.publish([e for i in range(10) for e in events(5, stream="k-%d" % i)])["positions"]
    sub.wait_count(len(ps))
    st = c.status(key)
    assert st["checkpoint"] == 0 and st["in_flight"] == len(ps), st
    phase["v"] = "ack"           # from now on the subscriber acks what it gets
    for pid in old_pids:
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: all(_gone(p) for p in old_pids), 10, "the killed workers to exit")
    st = wait_checkpoint(c, key, ps[-1], timeout=20)
    assert st["restarts"] == 2, "two unplanned worker deaths: restarts %r" % st["restarts"]
    new_pids = sorted(w["pid"] for w in st["workers"])
    assert not set(new_pids) & set(old_pids) and len(new_pids) == 2
    daemon.collect_children()
    by_pos = sub.by_position(key)
    assert sorted(by_pos) == ps, "missing positions: %r" % sorted(set(ps) - set(by_pos))
    for p in ps:
        attempts = [e["attempt"] for e in by_pos[p]]
        assert attempts[0] == 1 and len(attempts) >= 2 and attempts[-1] >= 2, \
            "position %d: attempts %r (held when its worker was killed)" % (p, attempts)


@pytest.mark.timeout(60)
def test_daemon_kill_9_and_restart_resumes_after_the_persisted_checkpoint(
        daemon: Daemon, subscribers: Any) -> None:
    phase = {"v": "first"}

    def policy(e: Dict[str, Any], conn: Any) -> Any:
        if phase["v"] == "first" and e["position"] > 100:
            return HOLD
        return ACK
    sub = subscribers(policy)
    c = daemon.client()
    st = start_pool(daemon, c, sub_spec("crash", subscriber=sub.uri, pool_size=2))
    key = st["key"]
    ps = []
    for i in range(4):
        ps += c.publish([e for s in range(5) for e in events(10, stream="c-%d" % s,
                                                             start=10 * i)])["positions"]
    assert ps == list(range(1, 201))
    wait_checkpoint_at = wait_status(c, key, lambda s: s["checkpoint"] == 100, timeout=20,
                                     what="checkpoint 100")
    assert wait_checkpoint_at["in_flight"] == 100
    time.sleep(1.6)              # PROTOCOL §5: persisted at least once a second while it moves
    daemon.collect_children()
    workers = [p.pid for p in daemon.collect_children()]
    daemon.proc.kill()
    daemon.proc.wait(10)
    wait_until(lambda: all(_gone(p) for p in workers), 10, "workers to exit after their parent")
    c.close()
    n_before = len(sub.deliveries)
    phase["v"] = "second"
    daemon.start()               # same --socket and --data-dir
    c = daemon.client()
    st = wait_checkpoint(c, key, 200, timeout=30)
    daemon.collect_children()
    assert st["state"] == "running" and st["head"] == 200
    after = [e for _, e, _ in sub.deliveries[n_before:]]
    got = sorted(e["position"] for e in after)
    assert got == list(range(101, 201)), (
        "after the restart expected exactly positions 101..200 once each; got %d deliveries, "
        "first %r, missing %r" % (len(got), got[:5], sorted(set(range(101, 201)) - set(got))[:10]))
    assert all(e["attempt"] == 1 for e in after), \
        "attempts start again at 1 after a daemon restart: %r" % sorted(
            {e["attempt"] for e in after})


@pytest.mark.timeout(40)
def test_a_subscriber_socket_that_appears_late_gets_everything(daemon: Daemon,
                                                              subscribers: Any) -> None:
    sub = subscribers(listen=False)
    assert not os.path.exists(sub.path)
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("late", subscriber=sub.uri, pool_size=2))["key"]
    ps = c.publish([e for s in range(4) for e in events(5, stream="l-%d" % s)])["positions"]
    time.sleep(1.5)
    st = c.status(key)
    assert st["checkpoint"] == 0 and st["in_flight"] == len(ps), "events wait: %r" % st
    sub.listen()
    wait_checkpoint(c, key, ps[-1], timeout=20)
    by_pos = sub.by_position(key)
    assert sorted(by_pos) == ps
    assert all(len(v) == 1 and v[0]["attempt"] == 1 for v in by_pos.values()), \
        "first deliveries carry attempt 1: %r" % {p: [e["attempt"] for e in v]
                                                  for p, v in by_pos.items() if len(v) != 1
                                                  or v[0]["attempt"] != 1}
    assert sorted(x.worker for x in sub.wait_hellos(2)) == [0, 1]


@pytest.mark.timeout(40)
def test_a_restarting_subscriber_gets_its_unacked_events_again(daemon: Daemon,
                                                              subscribers: Any) -> None:
    sub = subscribers(lambda e, conn: HOLD)
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("restart", subscriber=sub.uri, pool_size=2))["key"]
    sub.wait_hellos(2)
    ps = c.publish([e for s in range(6) for e in events(5, stream="r-%d" % s)])["positions"]
    sub.wait_count(len(ps))
    first_conns = sub.snapshot_conns()
    sub.shutdown()               # every connection closed, nobody listens
    time.sleep(0.5)
    st = c.status(key)
    assert st["checkpoint"] == 0 and st["in_flight"] == len(ps), st
    sub.policy = ack_all
    sub.listen()
    st = wait_checkpoint(c, key, ps[-1], timeout=20)
    later = [x for x in sub.snapshot_conns() if x not in first_conns]
    assert sorted(x.worker for x in later if x.hello) == [0, 1], "both workers reconnected"
    redelivered = collections.defaultdict(list)
    for x in later:
        for e in x.events:
            redelivered[e["position"]].append(e["attempt"])
    assert sorted(redelivered) == ps, "missing: %r" % sorted(set(ps) - set(redelivered))
    assert all(a == [2] for a in redelivered.values()), dict(redelivered)


@pytest.mark.timeout(60)
def test_sigterm_with_a_slow_consumer_exits_0_and_loses_nothing(daemon: Daemon,
                                                               subscribers: Any) -> None:
    def slow(e: Dict[str, Any], conn: Any) -> Any:
        time.sleep(0.01)
        return ACK
    sub = subscribers(slow)
    c = daemon.client()
    key = start_pool(daemon, c, sub_spec("slow", subscriber=sub.uri, pool_size=2,
                                         batch_size=5, max_in_flight=20))["key"]
    ps = c.publish([e for s in range(6) for e in events(50, stream="t-%d" % s)])["positions"]
    wait_status(c, key, lambda s: s["delivered"] >= 40, what="40 events acked")
    daemon.collect_children()
    workers = [p.pid for p in daemon.collect_children()]
    daemon.proc.send_signal(signal.SIGTERM)
    rc = daemon.proc.wait(20)
    assert rc == 0, "exit status %r after SIGTERM" % rc
    wait_until(lambda: all(_gone(p) for p in workers), 10, "workers to exit")
    c.close()
    acked_before = set(sub.acked)
    n_before = len(sub.deliveries)
    assert 40 <= len(acked_before) < len(ps)
    sub.policy = ack_all
    daemon.start()
    c = daemon.client()
    wait_checkpoint(c, key, ps[-1], timeout=30)
    daemon.collect_children()
    after = [e["position"] for _, e, _ in sub.deliveries[n_before:]]
    assert set(sub.positions(key)) == set(ps), "every event delivered at least once"
    again = sorted(acked_before & set(after))
    assert not again, ("events acked before the graceful stop were delivered again after the "
                       "restart (the drain waited for their acks): %r" % again[:20])
    assert set(after) == set(ps) - acked_before


@pytest.mark.timeout(40)
def test_events_waiting_for_an_absent_subscriber_survive_a_worker_kill_with_attempt_1(
        daemon: Daemon, subscribers: Any) -> None:
    """Events handed to a worker whose subscriber cannot be reached wait (§3); when that
    worker is killed they go to its replacement. They were never delivered, so their
    first delivery still carries attempt 1 (Event.attempt: "1 on first delivery")."""
    sub = subscribers(listen=False)
    c = daemon.client()
    st = start_pool(daemon, c, sub_spec("waiting", subscriber=sub.uri))
    key = st["key"]
    pid = st["workers"][0]["pid"]
    ps = c.publish(events(5))["positions"]
    wait_status(c, key, lambda s: s["in_flight"] == 5 and s["workers"][0]["in_flight"] == 5,
                what="the events handed to the worker")
    os.kill(pid, signal.SIGKILL)
    wait_status(c, key, lambda s: s["restarts"] == 1 and len(s["workers"]) == 1
                and s["workers"][0]["pid"] != pid and s["workers"][0]["state"] == "ready",
                what="the replacement worker")
    daemon.collect_children()
    sub.listen()
    wait_checkpoint(c, key, ps[-1], timeout=20)
    by_pos = sub.by_position(key)
    assert sorted(by_pos) == ps, "nothing is dropped"
    first_attempts = {p: v[0]["attempt"] for p, v in by_pos.items()}
    assert set(first_attempts.values()) == {1}, (
        "never-delivered events arrived first with attempts %r" % first_attempts)


@pytest.mark.timeout(40)
def test_sigterm_refuses_publishes_and_a_drain_timeout_still_exits_0(
        make_daemon: Any, subscribers: Any) -> None:
    d = make_daemon("--drain-timeout", "2")
    sub = subscribers(lambda e, conn: ACK if e["position"] <= 3 else HOLD)
    c = d.client()
    key = start_pool(d, c, sub_spec("drain", subscriber=sub.uri, pool_size=2))["key"]
    ps = c.publish(events(10))["positions"]
    sub.wait_count(10)
    wait_status(c, key, lambda s: s["checkpoint"] == 3, what="checkpoint 3")
    workers = [p.pid for p in d.collect_children()]
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)                      # inside the 2 s drain: the daemon still answers
    with pytest.raises(Unavailable):
        c.publish(events(1))
    rc = d.proc.wait(20)
    assert rc == 0, "exit status %r after a drain that timed out" % rc
    assert time.monotonic() - t0 >= 1.5, "exited before drain_timeout although events were unacked"
    wait_until(lambda: all(_gone(p) for p in workers), 10, "workers to exit")
    c.close()
    n_before = len(sub.deliveries)
    sub.policy = ack_all
    d.start()
    c = d.client()
    st = wait_checkpoint(c, key, ps[-1], timeout=30)
    d.collect_children()
    assert st["head"] == ps[-1], "the refused publish appended nothing"
    after = sorted(e["position"] for _, e, _ in sub.deliveries[n_before:])
    assert after == ps[3:], "after the restart: %r" % after


@pytest.mark.timeout(90)
def test_a_pool_that_cannot_read_the_log_fails_alone(make_daemon: Any) -> None:
    """A damaged page of the log that one pool must read (it replays from the origin) fails
    that pool, with the reason in the log; the other pools go on delivering (the error
    ended every loop turn's pumping before the pools after it, on every turn)."""
    d = make_daemon()
    c = d.client()
    for _ in range(12):
        c.publish([{"stream": "old", "type": "t", "data": "y" * 180}] * 256)
    head = c.ping()["head"]
    assert d.stop() == 0
    db = os.path.join(d.data_dir, "emitterd.db")
    size = os.path.getsize(db)
    assert size > 400_000, size
    with open(db, "r+b") as f:          # pages of the early chunks, not the schema's
        f.seek(size // 2)
        f.write(b"\xff" * 65536)
    d.start()
    c = d.client()
    assert c.ping()["head"] == head
    fresh = c.start({"name": "fresh", "type": "stream", "selector": "$all"})["key"]
    wait_status(c, fresh, lambda s: any(w["state"] == "ready" for w in s["workers"]),
                what="a ready worker")
    damaged = c.start({"name": "replayer", "type": "stream", "selector": "$all",
                       "start_from": "origin"})["key"]
    with d.client().attach(damaged) as replayer:      # its pool reads from position 1
        for batch in replayer.batches(timeout=10):
            replayer.ack([e["position"] for e in batch])
        wait_status(c, damaged, lambda s: s["state"] == "failed", timeout=20,
                    what="the pool reading the damaged pages to fail")
    with c.attach(fresh) as consumer:
        ps = c.publish([{"stream": "new", "type": "t"}] * 3)["positions"]
        got = []
        for batch in consumer.batches(timeout=10):
            got += [e["position"] for e in batch]
            consumer.ack([e["position"] for e in batch])
            if len(got) >= 3:
                break
    assert got == ps
    log_text = d.log_tail(400)
    assert "pool failed: the event log cannot be read for it" in log_text, log_text
    assert log_text.count("delivery failed for a pool") == 1, log_text


@pytest.mark.timeout(60)
def test_a_stopped_daemon_does_not_kill_its_healthy_workers_when_it_continues(
        make_daemon: Any) -> None:
    """SIGSTOP of the parent for longer than worker_timeout (Ctrl-Z, a frozen cgroup, a
    debugger): the workers' heartbeats wait unread in their pipes, so on SIGCONT they are
    not unresponsive; it killed every one of them (and their restarts could put the pool
    in backoff)."""
    d = make_daemon("--worker-timeout", "1", "--heartbeat-interval", "0.2")
    c = d.client()
    key = start_pool(d, c, sub_spec("frozen", pool_size=3))["key"]
    pids = sorted(w["pid"] for w in c.status(key)["workers"])
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    time.sleep(2)                      # two worker timeouts after it runs again
    st = c.status(key)
    assert st["restarts"] == 0 and sorted(w["pid"] for w in st["workers"]) == pids, st
    assert "did not run for" in d.log_tail(50)


# ---- stream versions after a kill before the first save of the stream heads ----------------

def _restart_after_sigkill(make_daemon: Any, d: Any) -> Any:
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(10)
    d2 = make_daemon(start=False)
    d2.socket, d2.data_dir = d.socket, d.data_dir
    return d2.start()


@pytest.mark.timeout(60)
def test_stream_versions_continue_after_sigkill_right_after_first_publish(make_daemon: Any) -> None:
    d = make_daemon()
    c = d.client()
    r = c.publish([{"stream": "orders", "type": "T"} for _ in range(5)])
    assert r["versions"] == [0, 1, 2, 3, 4]
    c.close()
    # killed before its first checkpoint flush (checkpoint_interval 1 s)
    d2 = _restart_after_sigkill(make_daemon, d)
    c2 = d2.client()
    # the stream exists with last version 4: "must not exist" is a conflict
    with pytest.raises(Conflict):
        c2.publish([{"stream": "orders", "type": "T"}], expected_version=-1)
    r2 = c2.publish([{"stream": "orders", "type": "T"}])
    assert r2["positions"] == [6]
    assert r2["versions"] == [5], (
        "stream 'orders' held versions 0..4 at positions 1..5; after the SIGKILL the next event "
        "got version %r (a version the stream already has)" % r2["versions"])


@pytest.mark.timeout(60)
def test_stream_versions_continue_after_upgrade_then_sigkill(make_daemon: Any) -> None:
    """A version 2 log (README: migrated on open) whose daemon is killed in its first second
    after the upgrade: the events published since the upgrade are forgotten by the stream heads."""
    d = make_daemon(start=False)
    write_v2_log(d.data_dir, 3)
    d.start()
    c = d.client()
    assert c.publish([{"stream": "s", "type": "T"} for _ in range(3)])["versions"] == [3, 4, 5]
    c.close()
    d2 = _restart_after_sigkill(make_daemon, d)
    r = d2.client().publish([{"stream": "s", "type": "T"}])
    assert r["positions"] == [7]
    assert r["versions"] == [6], (
        "after upgrade + SIGKILL the stream's next version is %r; versions 3..5 were already "
        "given to positions 4..6" % r["versions"])
