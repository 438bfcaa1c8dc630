"""After the parent is SIGKILLed between writing a publish's commit
and fdatasyncing it (the publisher got no answer), the restarted daemon treats everything in
the WAL as durable, so it must fdatasync the WAL at open (eventlog/sqlite.py
_sync_left_over; tests/test_eventlog.py checks that in process, and for the retried publish's
answer, which rests on the same); before, it

* delivers that never-synced event to a subscriber before anything made the WAL durable
  (README, Readings of the contract, "Delivered only once durable": "an event goes to the
  workers only after the commit that stored it is on disk ..., never between the write and the
  fsync: after a power cut such an event could vanish and its position be reused"), and
* answers the publisher's retry of it (same id: the duplicate path, which appends nothing and
  whose sync() finds nothing "unsynced") with its position, before anything made it durable
  (PROTOCOL.md §2 publish: "answered only after the events are durable").

The window is made deterministic with strace: the parent's own fdatasync of the commit is held
(delay_enter) and the parent SIGKILLed while it is held. The restarted daemon runs under
`strace -f` (every process: parent, checkpointer, workers) to see every fdatasync/fsync of the WAL.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, List, Optional, Tuple

import psutil
import pytest

from daemon_fixture import Daemon
from emitterd.client import Client, serve_subscriber
from waits import wait_for

STRACE = shutil.which("strace")


def _crash_between_write_and_fdatasync(d: Daemon, tmp: str) -> None:
    """Publish id 'never-synced' and SIGKILL the parent while its fdatasync of that commit is
    held by strace (never entered). The publisher gets no answer."""
    time.sleep(2.5)   # checkpoints flushed, WAL checkpointed: the next commit rewinds the WAL
    trace1 = os.path.join(tmp, "st1.txt")
    # the commit's fdatasyncs: SQLite's of the rewound WAL header (1st, before the commit's
    # frames), then the parent's own of the commit (2nd): hold that one
    tracer: Optional[subprocess.Popen] = subprocess.Popen(
        [STRACE, "-qq", "-y", "-p", str(d.proc.pid), "-e", "trace=fdatasync",
         "-e", "inject=fdatasync:delay_enter=60000000:when=2", "-o", trace1],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: os.path.exists(trace1), 10, "strace to attach")
        time.sleep(0.5)
        answer: dict = {}

        def publish() -> None:
            try:
                with Client(d.socket, timeout=20) as c2:
                    answer["ok"] = c2.publish([{"stream": "s", "type": "t", "id": "never-synced"}])
            except Exception as e:  # noqa: BLE001
                answer["error"] = repr(e)
        pt = threading.Thread(target=publish)
        pt.start()
        wait_for(lambda: open(trace1).read().count("fdatasync(") >= 2, 15,
              "the parent's own fdatasync of the commit")
        time.sleep(0.3)
        os.kill(d.proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        tracer.kill()
        tracer.wait(10)
        tracer = None
        d.proc.wait(20)
        pt.join(30)
        assert "ok" not in answer, "precondition: the publish was answered: %r" % answer
    finally:
        if tracer is not None:
            tracer.kill()
            tracer.wait(10)


def _start_traced(d: Daemon, tmp: str) -> Tuple[subprocess.Popen, str]:
    trace2 = os.path.join(tmp, "st2.txt")
    with open(d.log_path, "ab") as log:
        p = subprocess.Popen([STRACE, "-f", "-qq", "-ttt", "-y", "-e", "trace=fdatasync,fsync",
                              "-o", trace2] + d.argv(), stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, env=d.env, cwd=d.root,
                             start_new_session=True)
    return p, trace2


def _wal_syncs(trace: str) -> List[float]:
    out = []
    for line in open(trace):
        parts = line.split()
        if len(parts) > 2 and "sync(" in line and "-wal>" in line and "= 0" in line:
            out.append(float(parts[1]))
    return out


def _end_traced(d: Daemon, p: Optional[subprocess.Popen]) -> None:
    if p is None:
        return
    try:
        for ch in psutil.Process(p.pid).children():
            d.track(ch.pid)
            os.kill(ch.pid, signal.SIGTERM)
    except psutil.Error:
        pass
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
@pytest.mark.timeout(120)
def test_restart_does_not_deliver_unsynced_events_before_syncing(make_daemon: Any,
                                                                  short_tmp: str) -> None:
    d: Daemon = make_daemon()
    got: List[Tuple[float, int, str]] = []
    stop = threading.Event()
    sub_path = os.path.join(short_tmp, "sub.sock")
    th = threading.Thread(target=serve_subscriber, daemon=True,
                          args=(sub_path, lambda e: got.append((time.time(), e["position"], e["id"]))),
                          kwargs={"stop": stop})
    th.start()
    wait_for(lambda: os.path.exists(sub_path), 10, "the subscriber socket")
    restarted = None
    try:
        with Client(d.socket) as c:
            c.start({"name": "u", "type": "stream", "selector": "$all", "start_from": "origin",
                     "subscriber": "unix:" + sub_path})
            c.publish([{"stream": "s", "type": "t", "id": "first"}])
        wait_for(lambda: got, 20, "the first event delivered")
        _crash_between_write_and_fdatasync(d, short_tmp)
        assert [g[2] for g in got] == ["first"], got
        n = len(got)
        restarted, trace2 = _start_traced(d, short_tmp)
        wait_for(lambda: len(got) > n, 60, "the restarted daemon's delivery")
        t_delivered, pos, eid = got[n]
        assert eid == "never-synced", got
        time.sleep(1.0)
        syncs = _wal_syncs(trace2)
        assert [t for t in syncs if t < t_delivered], (
            "the restarted daemon delivered position %d (%r), whose commit was never "
            "fdatasynced, before any fdatasync/fsync of the WAL (first one %s s later): an "
            "event delivered before it is durable"
            % (pos, eid, ("%.3f" % (min(syncs) - t_delivered)) if syncs else "never"))
    finally:
        _end_traced(d, restarted)
        stop.set()
        th.join(5)
