"""The fork server (emitterd/forkserver.py) against real processes: workers and spares are
forked from it, not from the daemon, yet are the daemon's own children (it is their
subreaper); when the fork server dies, workers are still replaced (the daemon forks them
itself meanwhile) and the fork server comes back.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Any, List, Optional

import psutil
import pytest

from emitterd import procs
from waits import ready_status, wait_for

SERVER_TITLE = procs.SERVICE_TITLES["forkserver"]


def children_titled(pid: int, prefix: str) -> List[psutil.Process]:
    out = []
    for k in psutil.Process(pid).children():
        try:
            if " ".join(k.cmdline()).startswith(prefix):
                out.append(k)
        except psutil.Error:
            pass
    return out


def fork_server(d: Any) -> Optional[psutil.Process]:
    found = children_titled(d.proc.pid, SERVER_TITLE)
    return found[0] if found else None


def maps_sqlite(pid: int) -> bool:
    """Whether the process has SQLite's module mapped: everything forked from the daemon
    does (it has the event log open); the fork server never imports it."""
    with open("/proc/%d/maps" % pid) as f:
        return "_sqlite3" in f.read()


def sub(name: str, **kw: Any) -> dict:
    s = {"name": name, "type": "stream", "selector": "orders"}
    s.update(kw)
    return s


def replace_worker(d: Any, c: Any, key: str, index: int = 0) -> int:
    """SIGKILL worker `index` of pool `key`; the pid of its ready replacement."""
    old = [w["pid"] for w in c.status(key)["workers"] if w["index"] == index][0]
    os.kill(old, signal.SIGKILL)
    st = wait_for(lambda: (lambda s: s if any(w["index"] == index and w["pid"] != old
                                              and w["state"] == "ready" for w in s["workers"])
                           else None)(c.status(key)), 10, "a ready replacement of %d" % old)
    new = [w["pid"] for w in st["workers"] if w["index"] == index][0]
    d.track(new)
    return new


@pytest.mark.timeout(60)
def test_workers_and_spare_come_from_the_fork_server_as_children_of_the_daemon(
        make_daemon: Any) -> None:
    d = make_daemon()
    c = d.client()
    server = wait_for(lambda: fork_server(d), 10, "the fork server")
    d.track(server.pid)
    assert not maps_sqlite(server.pid)
    assert maps_sqlite(d.proc.pid), "the check below would prove nothing"
    key = c.start(sub("fs", pool_size=2))["key"]
    # the first workers may be forked before the fork server said ready: replace them
    for i in (0, 1):
        replace_worker(d, c, key, i)
    replace_worker(d, c, key, 0)       # this one from the spare (made after the first)
    spares = wait_for(lambda: children_titled(d.proc.pid, procs.SERVICE_TITLES["spare"]), 10,
                      "a spare worker")
    st = ready_status(d, c, key, 2)
    pids = [w["pid"] for w in st["workers"]] + [p.pid for p in spares]
    for pid in pids:
        d.track(pid)
        p = psutil.Process(pid)
        assert p.ppid() == d.proc.pid, "pid %d: parent %d, not the daemon" % (pid, p.ppid())
        assert not maps_sqlite(pid), "pid %d was forked from the daemon" % pid


@pytest.mark.timeout(60)
def test_workers_are_replaced_while_the_fork_server_is_down_and_it_comes_back(
        make_daemon: Any) -> None:
    d = make_daemon()
    c = d.client()
    key = c.start(sub("fs-down", pool_size=1))["key"]
    ready_status(d, c, key, 1)
    server = wait_for(lambda: fork_server(d), 10, "the fork server")
    server.kill()
    server.wait(5)
    # gone: the daemon forks the replacement itself, at once
    replacement = replace_worker(d, c, key, 0)
    assert psutil.Process(replacement).ppid() == d.proc.pid
    again = wait_for(lambda: (lambda s: s if s is not None and s.pid != server.pid else None)(
        fork_server(d)), 10, "a new fork server")
    d.track(again.pid)
    # once it is ready, replacements come from it again
    deadline = time.monotonic() + 20
    while True:
        new = replace_worker(d, c, key, 0)
        if not maps_sqlite(new):
            break
        assert time.monotonic() < deadline, "no worker came from the new fork server"
        time.sleep(0.2)
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
    with pytest.raises(psutil.NoSuchProcess):      # ended and reaped by the daemon
        again.status()
    log = open(d.log_path).read()
    assert "fork server exited, starting another" in log


ORPHAN_SCRIPT = r"""
import os, socket, sys, time
from emitterd import procs
real_fork = os.fork
forks = [0]
def slow_fork():
    forks[0] += 1
    pid = real_fork()
    if forks[0] == 2 and pid != 0:
        time.sleep(1.0)    # the intermediate, having forked the child: its caller dies now
    return pid
os.fork = slow_fork
a, b = socket.socketpair()
print(os.getpid(), flush=True)
procs.fork_orphan("emitterd-test: orphan", b, lambda s: None, lambda: None)
"""


@pytest.mark.timeout(30)
def test_an_intermediate_whose_fork_server_died_exits_quietly(tmp_path: Any) -> None:
    """The daemon (and with it the fork server) can die between the intermediate's fork of
    a worker and its report of the pid: no traceback in the log then (a chaos run found
    one)."""
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    try:
        caller = int(p.stdout.readline())
        time.sleep(0.3)                  # the intermediate sleeps in slow_fork
        os.kill(caller, signal.SIGKILL)
        p.wait(10)
        err = p.stderr.read()            # EOF once the intermediate and the child are gone
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == -signal.SIGKILL
    assert "Traceback" not in err, err


@pytest.mark.timeout(30)
def test_a_daemon_that_closes_without_reading_ready_ends_the_server_quietly() -> None:
    """An idle daemon (no worker forked) closes its end at shutdown with the server's
    "ready" unread: the server's next read gets ECONNRESET, not EOF. That is the daemon
    gone all the same; it used to end the server with a warning on many clean shutdowns."""
    import socket
    import threading
    from emitterd import forkserver
    daemon_end, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    outcome: List[Any] = []

    def run() -> None:
        try:
            forkserver.serve(server_end)
            outcome.append("returned")
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    daemon_end.settimeout(5)
    deadline = time.monotonic() + 5       # "ready" is in the daemon's queue, unread
    while not _pending(daemon_end) and time.monotonic() < deadline:
        time.sleep(0.01)
    daemon_end.close()
    t.join(10)
    server_end.close()
    assert outcome == ["returned"], outcome


def _pending(sock: Any) -> bool:
    import socket
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False


# ---- out of processes ---------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_running_out_of_processes_logs_no_bare_traceback(make_daemon: Any) -> None:
    if os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("prlimit"):
        pytest.skip("needs root, setpriv and prlimit (RLIMIT_NPROC binds a non-root real uid)")
    d = make_daemon(start=False)
    base = d.argv
    # real uid 65534 (RLIMIT_NPROC counts its processes), effective root without
    # CAP_SYS_RESOURCE/CAP_SYS_ADMIN (which would lift the limit)
    d.argv = lambda: ["setpriv", "--ruid=65534", "--bounding-set=-sys_resource,-sys_admin",  # type: ignore
                      "prlimit", "--nproc=10:10", "--"] + base()
    d.start()
    c = d.client(timeout=20)
    # the fork server up first: while it starts, the daemon forks workers itself (one process
    # each, not the server's two)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
            "fork server" in " ".join(k.cmdline()) for k in d.collect_children()):
        time.sleep(0.1)
    time.sleep(0.5)
    for i in range(9):
        c.start({"name": "p%d" % i, "type": "stream", "selector": "$all"})
        time.sleep(0.3)
    deadline = time.monotonic() + 20
    log = ""
    while time.monotonic() < deadline:
        log = open(d.log_path, encoding="utf-8", errors="replace").read()
        if "could not start a worker" in log:
            break
        time.sleep(0.2)
    assert "could not start a worker" in log, "the process limit was not reached:\n" + log[-2000:]
    time.sleep(2)
    log = open(d.log_path, encoding="utf-8", errors="replace").read()
    assert c.ping()["pid"] == d.proc.pid
    assert "Resource temporarily unavailable" in log, log[-2000:]    # the reason, in words
    assert "Traceback" not in log, "a bare traceback in the daemon's log:\n%s" % "\n".join(
        ln for ln in log.splitlines() if not ln.startswith("20"))[:1500]
