"""Pools of worker processes against a real daemon (PROTOCOL §2 Operations,
DESIGN §1, §4): respawn after a kill, restart intensity -> backoff -> failed,
resize, stop/delete, process titles and parents, psutil figures, heartbeats.

Workers are real forked processes; tests kill them with real signals and
observe the daemon through `status`. The daemon fixture kills every process
it saw at teardown, so tests register worker pids with ``Daemon.track``.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, List, Optional

import psutil
import pytest

from daemon_fixture import Daemon
from emitterd.client import AlreadyStarted, Client, NotFound, Unavailable
from waits import wait_for, ready_status  # noqa: E402


# ---- helpers -----------------------------------------------------------------

def sub(name: str, **kw: Any) -> Dict[str, Any]:
    s = {"name": name, "type": "stream", "selector": "$all"}
    s.update(kw)
    return s


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def title(pid: int) -> str:
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        raw = f.read()
    return " ".join(p.decode("utf-8", "replace") for p in raw.split(b"\0") if p)


def pids_by_index(st: Dict[str, Any]) -> Dict[int, int]:
    return {w["index"]: w["pid"] for w in st["workers"]}


def kill_and_wait_replacement(d: Daemon, c: Client, key: str, index: int, n: int = 1,
                              timeout: float = 10.0) -> Dict[str, Any]:
    old = pids_by_index(c.status(key))[index]
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old), 5, what="worker %d to die" % old)
    return ready_status(d, c, key, n, timeout, exclude=frozenset({old}))


# ---- respawn -------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_killed_worker_is_replaced_at_the_same_index(daemon: Daemon) -> None:
    c = daemon.client()
    key = c.start(sub("respawn", pool_size=2))["key"]
    before = pids_by_index(ready_status(daemon, c, key, 2))
    os.kill(before[1], signal.SIGKILL)
    st = ready_status(daemon, c, key, 2, exclude=frozenset({before[1]}))
    after = pids_by_index(st)
    assert after[0] == before[0], "the other worker was touched"
    assert after[1] != before[1]
    assert st["state"] == "running"
    assert st["restarts"] == 1
    per_worker = {w["index"]: w["restarts"] for w in st["workers"]}
    assert per_worker == {0: 0, 1: 1}
    assert not alive(before[1])
    assert psutil.Process(after[1]).ppid() == daemon.proc.pid
    # a second kill of the same slot counts again
    st = kill_and_wait_replacement(daemon, c, key, 1, n=2)
    assert st["restarts"] == 2
    assert {w["index"]: w["restarts"] for w in st["workers"]} == {0: 0, 1: 2}
    assert pids_by_index(st)[0] == before[0]


# ---- restart intensity ------------------------------------------------------------

@pytest.mark.timeout(40)
def test_restart_intensity_puts_the_pool_in_backoff_then_it_runs_again(daemon: Daemon) -> None:
    c = daemon.client()
    key = c.start(sub("flaky", options={"max_restarts": 2, "restart_period": 60}))["key"]
    ready_status(daemon, c, key, 1)
    for n in (1, 2):                          # within max_restarts: respawned at once
        st = kill_and_wait_replacement(daemon, c, key, 0)
        assert st["state"] == "running" and st["restarts"] == n
    third = pids_by_index(c.status(key))[0]
    os.kill(third, signal.SIGKILL)
    killed_at = time.monotonic()
    st = wait_for(lambda: (lambda s: s if s["state"] != "running" else None)(c.status(key)),
                  5, interval=0.01, what="the pool to leave running")
    assert st["state"] == "backoff", st
    assert st["workers"] == [], "no respawn while in backoff"
    assert st["restarts"] == 3
    # not attachable while in backoff
    with pytest.raises(Unavailable):
        c.attach(key)
    # after the default restart_backoff (1 s) it respawns and runs
    st = ready_status(daemon, c, key, 1, timeout=10, exclude=frozenset({third}))
    assert time.monotonic() - killed_at >= 0.8, "respawned before the backoff delay"
    assert st["state"] == "running"
    assert st["restarts"] == 3
    assert st["workers"][0]["restarts"] == 3
    assert st["workers"][0]["index"] == 0


@pytest.mark.timeout(40)
@pytest.mark.parametrize("revive", ["start", "update"])
def test_repeated_backoffs_end_in_failed_and_start_revives(make_daemon: Any, revive: str) -> None:
    """DESIGN §4: failed until start or update (the log line says so too)."""
    d = make_daemon("--restart-backoff", "0.2,0.4", "--max-backoffs", "1")
    c = d.client()
    spec = sub("doomed", options={"max_restarts": 1, "restart_period": 60})
    key = c.start(spec)["key"]
    ready_status(d, c, key, 1)
    seen: List[str] = []

    def next_state_after_kill() -> Dict[str, Any]:
        pid = pids_by_index(c.status(key))[0]
        os.kill(pid, signal.SIGKILL)
        return wait_for(lambda: (lambda s: s if s["state"] != "running" else None)(c.status(key)),
                        5, interval=0.01, what="the pool to leave running")

    # first round: one restart allowed, the next death -> backoff
    kill_and_wait_replacement(d, c, key, 0)
    st = next_state_after_kill()
    seen.append(st["state"])
    assert st["state"] == "backoff", st
    ready_status(d, c, key, 1, timeout=10)        # backoff over (0.2 s): running again
    # second round: the next backoff is one too many -> failed
    kill_and_wait_replacement(d, c, key, 0)
    st = next_state_after_kill()
    assert st["state"] == "failed", (seen, st)
    assert st["workers"] == []
    assert st["restarts"] == 4
    # a failed pool keeps no workers (those it stopped may take a moment to exit)
    wait_for(lambda: not d.pool_workers(), 10, what="the failed pool's workers to exit")
    assert "`emitterctl start` or `update` runs it again" in open(d.log_path).read(), \
        "the log line of a failed pool says how to run it again"
    # it stays failed (no timer brings it back): longer than the largest backoff
    time.sleep(0.6)
    st = c.status(key)
    assert st["state"] == "failed" and st["workers"] == []
    with pytest.raises(Unavailable):
        c.attach(key)
    # start (or update) runs it again from its checkpoint, with the given pool_size,
    # restarts reset
    again = c.start(dict(spec, pool_size=2)) if revive == "start" else c.update(key, pool_size=2)
    assert again["key"] == key
    assert again["state"] == "running" and again["restarts"] == 0
    assert again["subscription"]["pool_size"] == 2
    st = ready_status(d, c, key, 2)
    assert st["restarts"] == 0 and all(w["restarts"] == 0 for w in st["workers"])
    with pytest.raises(AlreadyStarted):
        c.start(spec)


# ---- resize -----------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_resize_up_keeps_pids_and_down_retires_highest_indexes(daemon: Daemon) -> None:
    c = daemon.client()
    key = c.start(sub("elastic"))["key"]
    first = pids_by_index(ready_status(daemon, c, key, 1))
    up = c.update(key, pool_size=3)
    assert up["subscription"]["pool_size"] == 3
    assert up["state"] == "running"
    st = ready_status(daemon, c, key, 3)
    grown = pids_by_index(st)
    assert sorted(grown) == [0, 1, 2]
    assert grown[0] == first[0], "resize must keep the pid of index 0"
    assert len(set(grown.values())) == 3
    for pid in grown.values():
        assert psutil.Process(pid).ppid() == daemon.proc.pid
    down = c.update(key, pool_size=1)
    assert down["subscription"]["pool_size"] == 1
    states = {w["index"]: (w["pid"], w["state"]) for w in down["workers"]}
    assert states.get(0, (None, None))[0] == grown[0]
    assert states[0][1] == "ready"
    for i in (1, 2):
        assert states.get(i) == (grown[i], "draining"), down["workers"]
    for i in (1, 2):
        wait_for(lambda i=i: not alive(grown[i]), 10, what="retired worker %d to exit" % i)
    st = ready_status(daemon, c, key, 1)
    assert pids_by_index(st) == {0: grown[0]}
    assert st["restarts"] == 0, "a resize is not a restart"
    assert st["workers"][0]["restarts"] == 0
    # up again: new processes at indexes 1 and 2, none of the retired pids
    c.update(key, pool_size=3)
    st = ready_status(daemon, c, key, 3, exclude=frozenset({grown[1], grown[2]}))
    assert pids_by_index(st)[0] == grown[0]
    assert st["restarts"] == 0


@pytest.mark.timeout(60)
def test_a_retired_worker_without_consumer_does_not_wait_out_the_drain(make_daemon: Any,
                                                                        short_tmp: str) -> None:
    """Shrinking a pool whose unix: subscriber is unreachable: the retired worker's events
    cannot be acked, so it stops at once instead of after drain_timeout (the same rule as a
    stop's drain), and its events go to the worker that stays."""
    d = make_daemon("--drain-timeout", "30")
    c = d.client()
    key = c.start(sub("unreachable", subscriber="unix:" + os.path.join(short_tmp, "no.sock"),
                      pool_size=2, options={"strategy": "round_robin"}))["key"]
    pids = pids_by_index(ready_status(d, c, key, 2))
    c.publish([{"stream": "s-%d" % i, "type": "t"} for i in range(6)])
    wait_for(lambda: all(w["in_flight"] > 0 for w in c.status(key)["workers"]), 10,
             what="events held by both workers")
    t0 = time.monotonic()
    c.update(key, pool_size=1)
    wait_for(lambda: not alive(pids[1]), 25, what="the retired worker to exit")
    assert time.monotonic() - t0 < 20, "the retired worker waited for acks no one could send"
    wait_for(lambda: c.status(key)["workers"][0]["in_flight"] == 6, 10,
             what="its events handed to the worker that stays")


# ---- stop, delete, start again ---------------------------------------------------------

@pytest.mark.timeout(30)
def test_stop_stop_again_delete_and_start_again(daemon: Daemon) -> None:
    c = daemon.client()
    spec = sub("stoppable", pool_size=2)
    key = c.start(spec)["key"]
    pids = list(pids_by_index(ready_status(daemon, c, key, 2)).values())
    st = c.stop(key)
    assert st["key"] == key and st["state"] == "stopped" and st["workers"] == []
    for pid in pids:
        wait_for(lambda pid=pid: not alive(pid), 5, what="worker %d to exit" % pid)
    assert daemon.pool_workers() == []
    assert st["restarts"] == 0, "a stop is not a restart"
    # stopping a stopped pool is ok; by key or by triple
    assert c.stop(key)["state"] == "stopped"
    assert c.stop(subscription={"name": "stoppable", "type": "stream",
                                "selector": "$all"})["state"] == "stopped"
    st = c.status(key)
    assert st["state"] == "stopped" and st["workers"] == []
    assert [s["key"] for s in c.list()["subscriptions"]] == [key]
    with pytest.raises(Unavailable):
        c.attach(key)
    # update of a stopped pool is stored, nothing runs
    up = c.update(key, options={"batch_size": 7})
    assert up["state"] == "stopped" and up["workers"] == []
    assert up["subscription"]["options"]["batch_size"] == 7
    time.sleep(0.1)
    assert daemon.pool_workers() == []
    # start again: new workers, the given settings
    again = c.start(spec)
    assert again["state"] == "running" and again["key"] == key
    st = ready_status(daemon, c, key, 2, exclude=frozenset(pids))
    # delete forgets it
    gone = c.stop(key, delete=True)
    assert gone["key"] == key and gone["state"] == "stopped" and gone["workers"] == []
    for pid in pids_by_index(st).values():
        wait_for(lambda pid=pid: not alive(pid), 5, what="worker %d to exit" % pid)
    with pytest.raises(NotFound):
        c.status(key)
    with pytest.raises(NotFound):
        c.stop(key)
    assert c.list()["subscriptions"] == []
    # and it can be started anew afterwards, from scratch
    fresh = c.start(spec)
    assert fresh["key"] == key and fresh["state"] == "running" and fresh["restarts"] == 0
    assert fresh["subscription"]["options"]["batch_size"] == 64
    ready_status(daemon, c, key, 2)


# ---- processes: titles, parent, psutil figures -----------------------------------------

@pytest.mark.timeout(30)
def test_worker_titles_and_parent(daemon: Daemon) -> None:
    c = daemon.client()
    pools = [c.start(sub("titled", pool_size=3)), c.start(sub("other", selector="x"))]
    for pool in pools:
        st = ready_status(daemon, c, pool["key"], pool["subscription"]["pool_size"])
        for w in st["workers"]:
            assert title(w["pid"]) == "emitterd: %s #%d" % (st["name"], w["index"])
            assert psutil.Process(w["pid"]).ppid() == daemon.proc.pid
    names = [c.status(p["key"])["name"] for p in pools]
    assert len(set(names)) == 2
    kids = {p.pid for p in daemon.pool_workers()}
    listed = {w["pid"] for p in pools for w in c.status(p["key"])["workers"]}
    assert kids == listed


@pytest.mark.timeout(40)
def test_workers_take_worker_nice_and_replacements_too(make_daemon: Any) -> None:
    d = make_daemon("--worker-nice", "3")
    c = d.client()
    base = psutil.Process(d.proc.pid).nice()
    key = c.start(sub("niced", pool_size=2))["key"]
    st = ready_status(d, c, key, 2)
    assert [psutil.Process(w["pid"]).nice() for w in st["workers"]] == [min(19, base + 3)] * 2
    st = kill_and_wait_replacement(d, c, key, 0, n=2)       # a replacement: niced as well
    assert [psutil.Process(w["pid"]).nice() for w in st["workers"]] == [min(19, base + 3)] * 2
    assert psutil.Process(d.proc.pid).nice() == base      # the parent keeps its own
    flat = make_daemon("--worker-nice", "0")
    c = flat.client()
    key = c.start(sub("flat", pool_size=1))["key"]
    st = ready_status(flat, c, key, 1)
    assert psutil.Process(st["workers"][0]["pid"]).nice() == psutil.Process(flat.proc.pid).nice()


@pytest.mark.timeout(30)
def test_status_reports_rss_and_cpu(daemon: Daemon) -> None:
    c = daemon.client()
    key = c.start(sub("measured", pool_size=2))["key"]
    ready_status(daemon, c, key, 2)
    time.sleep(1.2)

    def measured() -> Optional[Dict[str, Any]]:
        st = c.status(key)
        ok = len(st["workers"]) == 2 and all(w["rss"] > 0 for w in st["workers"])
        return st if ok else None
    st = wait_for(measured, 5, interval=0.1, what="rss of every worker")
    for w in st["workers"]:
        assert isinstance(w["rss"], int)
        assert isinstance(w["cpu_percent"], float) and w["cpu_percent"] >= 0.0
        # the figure is the worker's own memory, not the daemon's or zero
        real = psutil.Process(w["pid"]).memory_info().rss
        assert 0.25 * real < w["rss"] < 4 * real, (w, real)


# ---- heartbeats ------------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_silent_worker_is_killed_and_replaced(make_daemon: Any) -> None:
    d = make_daemon("--heartbeat-interval", "0.2", "--worker-timeout", "1")
    c = d.client()
    key = c.start(sub("hb", pool_size=2))["key"]
    before = pids_by_index(ready_status(d, c, key, 2))
    frozen = before[0]
    os.kill(frozen, signal.SIGSTOP)
    try:
        st = ready_status(d, c, key, 2, timeout=8, exclude=frozenset({frozen}))
        assert st["restarts"] >= 1
        assert {w["index"]: w["restarts"] for w in st["workers"]}[0] >= 1
        assert pids_by_index(st)[1] == before[1], "the healthy worker was touched"
        wait_for(lambda: not alive(frozen), 5, what="the frozen worker to be gone")
        # the healthy worker, answering heartbeats, is left alone
        time.sleep(1.5)
        st = c.status(key)
        assert pids_by_index(st)[1] == before[1]
        assert st["state"] == "running"
    finally:
        try:
            os.kill(frozen, signal.SIGCONT)
        except ProcessLookupError:
            pass


# ---- planned replacements and live updates ------------------------------------------------

@pytest.mark.timeout(30)
def test_recycling_for_rss_is_not_a_restart(make_daemon: Any) -> None:
    d = make_daemon("--max-worker-rss", "1000")       # every worker is over the limit
    c = d.client()
    key = c.start(sub("recycled", pool_size=2))["key"]
    first = pids_by_index(ready_status(d, c, key, 2))
    st = ready_status(d, c, key, 2, timeout=10, exclude=frozenset(first.values()))
    assert st["restarts"] == 0, "recycling counted as a restart"
    assert all(w["restarts"] == 0 for w in st["workers"])
    assert st["state"] == "running"
    for pid in first.values():
        wait_for(lambda pid=pid: not alive(pid), 5, what="recycled worker %d to exit" % pid)


@pytest.mark.timeout(30)
def test_live_update_of_options_and_subscriber_keeps_the_workers(daemon: Daemon,
                                                                  short_tmp: str) -> None:
    c = daemon.client()
    key = c.start(sub("live", pool_size=2))["key"]
    pids = pids_by_index(ready_status(daemon, c, key, 2))
    up = c.update(key, options={"ack_timeout": 5, "batch_size": 3, "strategy": "round_robin"})
    opts = up["subscription"]["options"]
    assert (opts["ack_timeout"], opts["batch_size"], opts["strategy"]) == (5.0, 3, "round_robin")
    assert opts["max_retries"] == 10, "a partial options update keeps the other options"
    path = "unix:" + os.path.join(short_tmp, "nobody.sock")
    up = c.update({"name": "live", "type": "stream", "selector": "$all"}, subscriber=path)
    assert up["key"] == key and up["subscription"]["subscriber"] == path
    up = c.update(key, subscriber=None)
    assert up["subscription"]["subscriber"] is None
    time.sleep(0.2)
    st = ready_status(daemon, c, key, 2)
    assert pids_by_index(st) == pids, "a live update must keep the worker pids"
    assert st["restarts"] == 0


@pytest.mark.timeout(30)
def test_start_of_a_stopped_pool_resumes_from_its_checkpoint(daemon: Daemon) -> None:
    c = daemon.client()
    spec = sub("resumable", selector="orders", start_from="origin")
    key = c.start(spec)["key"]
    ready_status(daemon, c, key, 1)
    positions = c.publish([{"stream": "orders", "type": "t", "data": i} for i in range(4)])[
        "positions"]
    with c.attach(key) as consumer:
        got: List[int] = []
        for batch in consumer.batches(timeout=10):
            got += [e["position"] for e in batch]
            if len(got) >= 4:
                break
        assert sorted(got) == positions
        consumer.ack(positions[:2])
        wait_for(lambda: c.status(key)["checkpoint"] == positions[1], 5, what="checkpoint")
        st = c.stop(key, drain_timeout=0.3)
    assert st["state"] == "stopped" and st["checkpoint"] == positions[1]
    # start again with other settings; start_from is ignored for a known subscription
    again = c.start(dict(spec, start_from="now", options={"batch_size": 1}))
    assert again["checkpoint"] == positions[1]
    assert again["subscription"]["options"]["batch_size"] == 1
    assert again["subscription"]["start_from"] == "origin"
    ready_status(daemon, c, key, 1)
    with c.attach(key) as consumer:
        frames: List[List[int]] = []
        for batch in consumer.batches(timeout=5):
            frames.append([e["position"] for e in batch])
            consumer.ack(frames[-1])
            if sum(len(f) for f in frames) >= 2:
                break
        assert frames == [[positions[2]], [positions[3]]], frames
        wait_for(lambda: c.status(key)["checkpoint"] == positions[3], 5, what="checkpoint")


@pytest.mark.timeout(60)
def test_start_of_a_stopped_pool_keeps_the_settings_it_is_not_given(daemon: Daemon,
                                                                     short_tmp: str) -> None:
    """§2: a stopped pool "starts again from its checkpoint, taking the given pool_size,
    subscriber and options". A start that gave only the triple (`emitterctl stop KEY`, then
    `emitterctl start NAME --type T --selector S`) took the defaults instead: a unix:
    subscription came back as an attach one with one worker, and its events waited for a
    consumer nobody would attach."""
    c = daemon.client()
    triple = {"name": "kept", "type": "stream", "selector": "$all"}
    path = "unix:" + os.path.join(short_tmp, "nobody-listens.sock")
    key = c.start(dict(triple, subscriber=path, pool_size=2,
                       options={"batch_size": 7, "strategy": "round_robin"}))["key"]
    c.stop(key, drain_timeout=0.1)
    sub = c.start(triple)["subscription"]
    assert (sub["subscriber"], sub["pool_size"], sub["options"]["batch_size"],
            sub["options"]["strategy"]) == (path, 2, 7, "round_robin"), sub
    c.stop(key, drain_timeout=0.1)
    # what is given is taken: options merge over the stored ones, nil clears the subscriber
    sub = c.start(dict(triple, subscriber=None, options={"batch_size": 3}))["subscription"]
    assert (sub["subscriber"], sub["pool_size"], sub["options"]["batch_size"],
            sub["options"]["strategy"]) == (None, 2, 3, "round_robin"), sub
    c.stop(key, drain_timeout=0.1)
    sub = c.start(dict(triple, pool_size=1))["subscription"]
    assert (sub["subscriber"], sub["pool_size"]) == (None, 1), sub


@pytest.mark.timeout(60)
def test_a_resize_during_a_stop_does_not_keep_the_pool_running(make_daemon: Any) -> None:
    """An update of pool_size that lands after a stop has ended its workers, while they
    exit, spawned new ones the stop never ended: the stop was never answered, a second one
    neither, and SIGTERM hung. Now the size is stored for the next start."""
    d = make_daemon("--worker-grace", "1.5")
    c = d.client()
    key = c.start({"name": "racing", "type": "stream", "selector": "$all", "pool_size": 1})["key"]
    (w,) = ready_status(d, c, key, 1)["workers"]
    os.kill(w["pid"], signal.SIGSTOP)    # it cannot exit before the grace's SIGKILL
    try:
        stopper = d.client(timeout=20)
        out: List[Any] = []
        t = threading.Thread(target=lambda: out.append(stopper.stop(key)))
        t.start()
        time.sleep(0.3)                  # nothing to drain: the stop has ended the worker
        grown = c.update(key, pool_size=3)
        t.join(15)
    finally:
        try:
            os.kill(w["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    d.collect_children()
    assert out and out[0]["state"] == "stopped" and out[0]["workers"] == [], out
    assert grown["subscription"]["pool_size"] == 3
    st = c.status(key)
    assert st["state"] == "stopped" and st["workers"] == [], st
    assert c.start({"name": "racing", "type": "stream", "selector": "$all",
                    "pool_size": 2})["state"] == "running"
    d.collect_children()
    assert d.stop(timeout=15) == 0
