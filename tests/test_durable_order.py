"""Nothing reaches a subscriber, and no publisher is answered, before the events are on disk.

The parent commits a publish without SQLite's own fsync, routes the new events to the workers
marked "held" while the disk writes, fdatasyncs the WAL itself and only then writes them, tells
the workers "durable" and answers (control/events.py Committer, worker/main.py; a worker's own
hold of a batch that left early is tests/test_worker_hold.py). With strace on the parent
and its worker, for every publish: the parent's fdatasync starts after it read the request, and
the worker's send of those events to the subscriber, the parent's "durable" notice and the
answer all start after that fdatasync returned.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from typing import Any, Dict, List

import pytest

from daemon_fixture import Daemon
from subscriber_helper import start_pool, sub_spec, subscribers, wait_checkpoint  # noqa: F401

STRACE = shutil.which("strace")
# "<pid> <t> name(args...) = ret <dur>", "<pid> <t> name(args <unfinished ...>",
# "<pid> <t> <... name resumed>...) = ret <dur>"
_CALL = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+<\.\.\. (\w+) resumed>(.*)$")
_DURATION = re.compile(r"<(\d+\.\d+)>\s*$")


def _attach_strace(pids: List[int], out: str) -> subprocess.Popen:
    argv = [STRACE, "-qq", "-ttt", "-T", "-s", "65535", "-o", out,
            "-e", "trace=fdatasync,fsync,sendto,sendmsg,recvfrom,write"]
    for pid in pids:
        argv += ["-p", str(pid)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # strace has attached once its output file exists and it is still running
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            pytest.skip("strace cannot attach here (ptrace not permitted?): %s" % err.strip())
        if os.path.exists(out):
            time.sleep(0.3)
            return proc
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    pytest.fail("strace did not attach within 10 s")


def _calls(path: str) -> List[Dict[str, Any]]:
    """Every traced call: pid, name, fd, start, end (None if it never returned), text."""
    calls: List[Dict[str, Any]] = []
    open_calls: Dict[tuple, Dict[str, Any]] = {}
    for line in open(path, errors="replace").read().splitlines():
        m = _CALL.match(line)
        if m:
            pid, t, name, rest = int(m.group(1)), float(m.group(2)), m.group(3), m.group(4)
            fd = re.match(r"(\d+)", rest)
            call = {"pid": pid, "name": name, "fd": int(fd.group(1)) if fd else -1,
                    "start": t, "end": None, "text": rest}
            calls.append(call)
            if rest.endswith("<unfinished ...>"):
                open_calls[(pid, name)] = call
            else:
                d = _DURATION.search(rest)
                call["end"] = t + float(d.group(1)) if d else t
            continue
        m = _RESUMED.match(line)
        if m:
            call = open_calls.pop((int(m.group(1)), m.group(3)), None)
            d = _DURATION.search(m.group(4))
            if call is not None:
                call["end"] = call["start"] + float(d.group(1)) if d else float(m.group(2))
                call["text"] += m.group(4)       # what a read returned is printed at the end
    return calls


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
@pytest.mark.timeout(90)
def test_nothing_leaves_before_the_fdatasync(daemon: Daemon, subscribers: Any,
                                             short_tmp: str) -> None:
    sub = subscribers()
    c = daemon.client()
    st = start_pool(daemon, c, sub_spec("durable-order", subscriber=sub.uri))
    parent = daemon.proc.pid
    worker = st["workers"][0]["pid"]
    out = os.path.join(short_tmp, "strace.txt")
    tracer = _attach_strace([parent, worker], out)
    try:
        last = 0
        for i in range(5):
            marker = "zzmark%02d" % i
            res = c.publish([{"stream": "s-%d" % j, "type": "t", "data": marker} for j in range(20)])
            last = res["positions"][-1]
        wait_checkpoint(c, st["key"], last)
    finally:
        tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    calls = _calls(out)
    sends = ("sendto", "sendmsg", "write")
    for i in range(5):
        marker = "zzmark%02d" % i
        read = [k for k, x in enumerate(calls)
                if x["pid"] == parent and x["name"] == "recvfrom" and marker in x["text"]]
        assert read, "the publish of %s is not in the trace" % marker
        after = calls[read[0]:]
        client_fd = calls[read[0]]["fd"]
        sync = next((x for x in after if x["pid"] == parent
                     and x["name"] in ("fdatasync", "fsync")), None)
        assert sync is not None and sync["end"] is not None, "no fdatasync after %s" % marker
        to_worker = [x for x in after if x["pid"] == parent and x["name"] in sends
                     and marker in x["text"]]
        assert to_worker and "\\244held" in to_worker[0]["text"], (
            "the events of %s did not go to the worker marked held" % marker)
        to_subscriber = [x for x in after if x["pid"] == worker and x["name"] in sends
                         and marker in x["text"]]
        assert to_subscriber, "the worker did not send %s to the subscriber" % marker
        assert to_subscriber[0]["start"] >= sync["end"], (
            "%s reached the subscriber %.6f s before the fdatasync returned"
            % (marker, sync["end"] - to_subscriber[0]["start"]))
        notice = [x for x in after if x["pid"] == parent and x["name"] in sends
                  and "\\247durable" in x["text"]]
        assert notice and notice[0]["start"] >= sync["end"], "durable notice before the sync"
        answer = [x for x in after if x["pid"] == parent and x["name"] in sends
                  and x["fd"] == client_fd]
        assert answer and answer[0]["start"] >= sync["end"], "%s answered before the sync" % marker


@pytest.mark.timeout(60)
@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
def test_shutdown_saves_the_pools_in_a_few_commits_not_one_per_pool(make_daemon: Any) -> None:
    """SIGTERM (systemctl stop) saves every running pool in a commit of its own: one fsync of the
    event log per pool, on the loop, before the exit. The final flush_checkpoints already saves
    every checkpoint in one transaction; with max_subscriptions pools (1000 by default) on a disk
    whose fsync takes 10-30 ms that is 10-30 s more on top of drain_timeout, past the unit's
    TimeoutStopSec=30 (systemd then SIGKILLs the stop)."""
    pools = 30
    d = make_daemon()
    c = d.client()
    for i in range(pools):
        c.start({"name": "p%d" % i, "type": "event_type", "selector": "t%d" % i})
    c.publish([{"stream": "s", "type": "t%d" % i} for i in range(pools)])
    c.close()
    out = os.path.join(d.root, "strace.out")
    tracer = _attach_strace([d.proc.pid], out)      # the parent only: it has one thread
    try:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        tracer.wait(10)
    finally:
        if tracer.poll() is None:
            tracer.kill()
            tracer.wait()
    with open(out, errors="replace") as f:
        syncs = [line for line in f if re.search(r"\b(fsync|fdatasync)\(", line)]
    # the final checkpoint flush and the last publishes: a handful, whatever the pools
    assert len(syncs) <= 5, "%d fsyncs during the shutdown of %d pools" % (len(syncs), pools)
