"""Nothing leaves the daemon before it is on disk: with strace on the parent, for every
publish, the fdatasync of the WAL comes after the request was read and before the events
go to a worker and before the publisher is answered (the parent commits without SQLite's own
fsync, routes while the disk writes, and syncs the WAL itself: control/events.py Committer).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from typing import Any, List

import pytest

from daemon_fixture import Daemon
from subscriber_helper import start_pool, sub_spec, subscribers, wait_checkpoint  # noqa: F401

STRACE = shutil.which("strace")
_LINE = re.compile(r"^(?:\[pid\s+\d+\]\s+)?(\w+)\((\d+)?")


def _attach_strace(pid: int, out: str) -> subprocess.Popen:
    proc = subprocess.Popen([STRACE, "-p", str(pid), "-qq", "-s", "65535", "-o", out,
                             "-e", "trace=fdatasync,fsync,sendto,sendmsg,recvfrom,write"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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


@pytest.mark.skipif(STRACE is None, reason="strace is not installed")
@pytest.mark.timeout(90)
def test_events_leave_only_after_the_fdatasync(daemon: Daemon, subscribers: Any,
                                               short_tmp: str) -> None:
    sub = subscribers()
    c = daemon.client()
    st = start_pool(daemon, c, sub_spec("durable-order", subscriber=sub.uri))
    out = os.path.join(short_tmp, "strace.txt")
    tracer = _attach_strace(daemon.proc.pid, out)
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
    lines: List[str] = open(out, errors="replace").read().splitlines()
    calls = []
    for text in lines:
        m = _LINE.match(text)
        if m:
            calls.append((m.group(1), int(m.group(2) or -1), text))
    for i in range(5):
        marker = "zzmark%02d" % i
        got = [k for k, (name, _fd, text) in enumerate(calls)
               if name == "recvfrom" and marker in text]
        assert got, "the publish of %s was not seen in the trace:\n%s" % (marker, "\n".join(lines[:40]))
        read_at = got[0]
        client_fd = calls[read_at][1]
        syncs = [k for k in range(read_at, len(calls)) if calls[k][0] in ("fdatasync", "fsync")]
        assert syncs, "no fdatasync after the publish of %s" % marker
        sync_at = syncs[0]
        sent = [k for k in range(read_at, len(calls))
                if calls[k][0] in ("sendto", "sendmsg") and marker in calls[k][2]]
        assert sent, "the events of %s were not seen going to the worker" % marker
        assert sent[0] > sync_at, "events of %s sent before the fdatasync:\n%s" % (
            marker, "\n".join(c[2][:200] for c in calls[read_at:sent[0] + 1]))
        answers = [k for k in range(read_at + 1, len(calls))
                   if calls[k][0] in ("sendto", "sendmsg", "write") and calls[k][1] == client_fd]
        assert answers and answers[0] > sync_at, "%s answered before the fdatasync" % marker
