"""The daemon's own lifecycle against real processes (PROTOCOL §2, §3, §5, §6;
DESIGN §1, §6): persisted subscriptions across a restart, workers never
outliving the daemon, the control socket file (stale, taken, not a socket,
modes), the data dir mode, graceful shutdown with events in flight,
SO_PEERCRED permission checks and max_connections.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import psutil
import pytest

from daemon_fixture import Daemon
from emitterd.client import AlreadyStarted, Client, Unavailable
from emitterd.framing import Decoder, encode
from emitterd.control.server import ADMIN_RESERVE
from waits import ready_status, received, wait_for  # noqa: E402

NOBODY = 65534


# ---- helpers -----------------------------------------------------------------

def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def sub(name: str, **kw: Any) -> Dict[str, Any]:
    s = {"name": name, "type": "stream", "selector": "orders"}
    s.update(kw)
    return s


def hold_admin_reserve(d: Any) -> List[socket.socket]:
    """The tests run as root, who has ADMIN_RESERVE connections beyond max_connections (so
    that a client holding every connection cannot lock the administrator out): held here,
    idle and admitted, the next ones meet max_connections as any client's would."""
    held = []
    for i in range(ADMIN_RESERVE):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        held.append(s)
        s.connect(d.socket)
        s.sendall(encode({"id": i + 1, "op": "ping"}))
        f = read_frame(s)
        assert f is not None and f.get("ok") is True, f
    return held


def read_frame(sock: socket.socket, timeout: float = 5.0) -> Optional[dict]:
    """One frame from a raw socket, or None on EOF."""
    dec = Decoder(0xFFFFFFFF)
    deadline = time.monotonic() + timeout
    while True:
        f = dec.next()
        if f is not None:
            return f
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            return None
        dec.feed(data)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ---- persisted subscriptions -------------------------------------------------------

@pytest.mark.timeout(60)
def test_subscriptions_survive_a_restart(make_daemon: Any) -> None:
    d1 = make_daemon("--drain-timeout", "1")     # one event stays unacked on purpose
    c = d1.client()
    running = c.start(sub("keeps-running", pool_size=2, start_from="origin",
                          options={"batch_size": 3}))
    stopped = c.start(sub("stays-stopped", selector="other"))
    st = ready_status(d1, c, running["key"], 2)
    old_pids = {w["pid"] for w in st["workers"]}
    ready_status(d1, c, stopped["key"], 1)
    c.stop(stopped["key"])
    # some progress to persist: 2 of the 3 events acked
    positions = c.publish([{"stream": "orders", "type": "t", "data": i} for i in range(3)])[
        "positions"]
    with c.attach(running["key"]) as consumer:
        got: List[int] = []
        for batch in consumer.batches(timeout=10):
            got += [e["position"] for e in batch]
            if len(got) >= 3:
                break
        assert sorted(got) == positions
        consumer.ack(positions[:2])
        wait_for(lambda: c.status(running["key"])["checkpoint"] == positions[1], 5,
                 what="checkpoint %d" % positions[1])
    before = {s["key"]: s for s in c.list()["subscriptions"]}
    c.close()

    d1.proc.send_signal(signal.SIGTERM)
    assert d1.proc.wait(20) == 0
    for pid in old_pids:
        wait_for(lambda pid=pid: not alive(pid), 5, what="old worker %d to exit" % pid)

    d2 = make_daemon(start=False)
    d2.data_dir = d1.data_dir
    d2.start()
    c2 = d2.client()
    after = {s["key"]: s for s in c2.list()["subscriptions"]}
    assert set(after) == set(before) == {running["key"], stopped["key"]}
    for key in after:
        assert after[key]["subscription"] == before[key]["subscription"]
    st = ready_status(d2, c2, running["key"], 2)
    assert not old_pids & {w["pid"] for w in st["workers"]}, "new daemon, new workers"
    for w in st["workers"]:
        assert psutil.Process(w["pid"]).ppid() == d2.proc.pid
    assert st["checkpoint"] >= positions[1]
    assert st["head"] == positions[-1] == c2.ping()["head"]
    st = c2.status(stopped["key"])
    assert st["state"] == "stopped" and st["workers"] == []
    # the same triple has the same key in the new run
    with pytest.raises(AlreadyStarted) as ei:
        c2.start(sub("keeps-running", pool_size=2))
    assert ei.value.details == {"key": running["key"]}
    # the unacked event comes again (attempt 1 after a daemon restart), the acked ones not
    with c2.attach(running["key"]) as consumer:
        again: List[Dict[str, Any]] = []
        for batch in consumer.batches(timeout=5):
            again += batch
            consumer.ack([e["position"] for e in batch])
            if any(e["position"] == positions[2] for e in again):
                break
        assert [(e["position"], e["attempt"]) for e in again] == [(positions[2], 1)]
    # the stopped one starts again on request
    assert c2.start(sub("stays-stopped", selector="other"))["state"] == "running"
    ready_status(d2, c2, stopped["key"], 1)


@pytest.mark.timeout(30)
def test_workers_exit_when_the_daemon_is_killed(make_daemon: Any) -> None:
    d = make_daemon()
    c = d.client()
    keys = [c.start(sub("a", pool_size=3))["key"], c.start(sub("b", pool_size=2))["key"]]
    pids: List[int] = []
    for key, n in zip(keys, (3, 2)):
        pids += [w["pid"] for w in ready_status(d, c, key, n)["workers"]]
    assert {p.pid for p in d.pool_workers()} == set(pids)
    everyone = [p.pid for p in d.collect_children()]       # the checkpointer too
    assert len(everyone) > len(pids)
    c.close()
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait(5)
    # checked before the fixture's cleanup kills anything: they exit on their own
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in everyone):
        time.sleep(0.05)
    left = [p for p in everyone if alive(p)]
    assert left == [], "children outlived the daemon: %r" % left
    # crash recovery: the socket file left behind is stale; a new daemon on the same
    # socket and data dir replaces it and runs both pools again
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    d2 = make_daemon(start=False)
    d2.socket, d2.data_dir = d.socket, d.data_dir
    d2.start()
    c2 = d2.client()
    assert sorted(s["key"] for s in c2.list()["subscriptions"]) == sorted(keys)
    for key, n in zip(keys, (3, 2)):
        st = ready_status(d2, c2, key, n)
        assert not set(pids) & {w["pid"] for w in st["workers"]}


# ---- the socket file --------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_stale_socket_file_is_replaced(make_daemon: Any) -> None:
    d = make_daemon(start=False)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(d.socket)              # bound, never listening, then closed: a stale socket file
    s.close()
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    d.start()
    assert d.client().ping()["pid"] == d.proc.pid
    assert mode(d.socket) == 0o660


@pytest.mark.timeout(30)
def test_second_daemon_on_the_same_socket_refuses(make_daemon: Any) -> None:
    d1 = make_daemon()
    ino = os.stat(d1.socket).st_ino
    d2 = make_daemon(start=False)
    d2.socket = d1.socket
    r = d2.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert d1.socket in out or "already" in out.lower(), out
    # the first one keeps its socket and answers
    assert os.stat(d1.socket).st_ino == ino
    assert d1.proc.poll() is None
    assert d1.client().ping()["pid"] == d1.proc.pid


@pytest.mark.timeout(40)
def test_a_daemon_leaves_a_socket_file_that_is_no_longer_its_own(make_daemon: Any) -> None:
    """A tmp cleaner removed d1's socket file and d2 now listens at that path: when d1 stops,
    it must not unlink d2's socket."""
    d1 = make_daemon()
    os.unlink(d1.socket)
    d2 = make_daemon(start=False)
    d2.socket = d1.socket
    d2.start()
    assert d1.stop() == 0
    assert os.path.exists(d1.socket), "d1 removed the socket of the daemon that replaced it"
    assert d2.client().ping()["pid"] == d2.proc.pid
    assert "not the one this daemon made" in open(d1.log_path).read()
    assert d2.stop() == 0
    assert not os.path.exists(d1.socket), "d2 removes its own socket"


# ---- the data directory --------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_second_daemon_on_the_same_data_dir_refuses(make_daemon: Any) -> None:
    """Two daemons on one log would reuse positions and run the same pools twice: the
    second one names the first and exits before it opens the log or binds its socket."""
    d1 = make_daemon()
    c = d1.client()
    key = c.start(sub("kept", start_from="origin"))["key"]
    first = c.publish([{"stream": "orders", "type": "t"}])["positions"]
    d2 = make_daemon(start=False)
    d2.data_dir = d1.data_dir
    r = d2.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "in use by another emitterd (pid %d)" % d1.proc.pid in out, out
    assert d1.data_dir in out and "Traceback" not in out, out
    assert not os.path.exists(d2.socket)
    # the first one is untouched: it publishes on from where it was, its pool runs on
    assert d1.proc.poll() is None
    assert c.publish([{"stream": "orders", "type": "t"}])["positions"] == [first[0] + 1]
    assert [s["key"] for s in c.list()["subscriptions"]] == [key]
    assert c.status(key)["state"] == "running" and c.ping()["head"] == first[0] + 1


@pytest.mark.timeout(40)
def test_a_killed_daemons_lock_is_not_kept_by_a_child_that_outlives_it(make_daemon: Any) -> None:
    """The lock goes with the daemon, however it dies: a restart right after a SIGKILL starts
    at once, while a worker that was SIGSTOPped then may still be there. (No child has the
    lock file open today, since the helpers are exec'd and close their fds; a record lock
    would not pass to one that had.) Nor does that worker linger: in a process group of its
    own, orphaned by the daemon's death, the kernel continues it (SIGHUP, ignored, and
    SIGCONT), and it exits on EOF."""
    d1 = make_daemon()
    c = d1.client()
    key = c.start(sub("a"))["key"]
    (worker,) = [w["pid"] for w in ready_status(d1, c, key, 1)["workers"]]
    os.kill(worker, signal.SIGSTOP)
    # stopped before the daemon dies (a stop that lands after it would find no one to
    # continue the orphaned group, and the worker would stay stopped for good)
    wait_for(lambda: psutil.Process(worker).status() == psutil.STATUS_STOPPED, 10,
             what="the worker stopped")
    c.close()
    d1.proc.send_signal(signal.SIGKILL)
    d1.proc.wait(5)
    d2 = make_daemon(start=False)
    d2.socket, d2.data_dir = d1.socket, d1.data_dir
    d2.start()                         # fails (the log says why) if the lock stayed behind
    assert d2.client().ping()["pid"] == d2.proc.pid
    wait_for(lambda: not alive(worker), 10, what="the stopped worker of the dead daemon gone")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("where", ["data_dir", "socket"])
def test_a_path_that_cannot_be_used_is_one_line_not_a_traceback(make_daemon: Any,
                                                                 where: str) -> None:
    d = make_daemon(start=False)
    blocker = os.path.join(d.root, "a-file")
    with open(blocker, "w") as f:
        f.write("not a directory\n")
    bad = os.path.join(blocker, "data") if where == "data_dir" else os.path.join(blocker, "s.sock")
    setattr(d, where, bad)
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "cannot start" in out and blocker in out and "Not a directory" in out, out
    assert "Traceback" not in out, out
    assert out.count("\n") == 1, out


@pytest.mark.timeout(30)
def test_another_programs_database_is_not_taken_for_an_event_log(make_daemon: Any) -> None:
    """An SQLite file of another program at <data_dir>/emitterd.db: refused in one line,
    and left as it was, byte for byte: it was switched to WAL mode (header bytes 18-19, for
    good) before the tables were looked at."""
    d = make_daemon(start=False)
    os.makedirs(d.data_dir, mode=0o700)
    path = os.path.join(d.data_dir, "emitterd.db")
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE x (a)")
    with open(path, "rb") as f:
        before = f.read()
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out, out
    assert "is not an emitterd event log (its tables: x)" in out, out
    with open(path, "rb") as f:
        after = f.read()
    assert after[18:20] == before[18:20], "switched to WAL mode: %r -> %r" % (
        before[18:20], after[18:20])
    assert after == before


@pytest.mark.timeout(30)
def test_an_event_log_path_that_is_a_directory_is_named(make_daemon: Any) -> None:
    d = make_daemon(start=False)
    os.makedirs(os.path.join(d.data_dir, "emitterd.db"))
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out, out
    assert "emitterd.db is a directory, not the event log" in out, out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["emitterd.db", "emitterd.db-wal"])
def test_a_fifo_in_place_of_the_log_is_refused_not_waited_on(make_daemon: Any, name: str) -> None:
    """A FIFO at emitterd.db or its WAL: the start-up fdatasync of what an earlier run left
    opened it O_RDONLY and waited for a writer for good, without a word (under systemd:
    killed by TimeoutStartSec, started again, over and over)."""
    d = make_daemon()
    d.client().publish([{"stream": "s", "type": "t"}])
    assert d.stop() == 0
    path = os.path.join(d.data_dir, name)
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path, 0o600)
    try:
        r = d.run_refused(timeout=6)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"") + (e.stderr or b"")
        raise AssertionError("with a FIFO at %s the daemon neither started nor refused in 6 s "
                             "(output: %r)" % (name, out[-500:])) from None
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out and name in out, out


@pytest.mark.timeout(60)
def test_a_log_of_a_newer_schema_is_refused_and_left_unchanged(make_daemon: Any) -> None:
    """There is no downgrade (README, Upgrading). The log carried no schema version, so an
    older emitterd (an rpm/apt rollback, a pinned image) could not tell a newer log from its
    own: it opened it, as v2 did with v3 logs. Now the log says its version, and a newer one
    is refused with the reason, its files unchanged."""
    d = make_daemon()
    d.client().publish([{"stream": "s", "type": "t"} for _ in range(5)])
    assert d.stop() == 0
    path = os.path.join(d.data_dir, "emitterd.db")
    with sqlite3.connect(path, isolation_level=None) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        assert version > 0, "the event log records no schema version"
        db.execute("PRAGMA user_version = %d" % (version + 1))   # what a newer one leaves
    db.close()

    def files() -> Dict[str, bytes]:
        out = {}
        for n in ("emitterd.db", "emitterd.db-wal", "emitterd.db-shm"):
            if os.path.exists(os.path.join(d.data_dir, n)):
                with open(os.path.join(d.data_dir, n), "rb") as f:
                    out[n] = f.read()
        return out
    before = files()
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out and "newer" in out, out
    assert files() == before, "a refused start changed the log"


@pytest.mark.timeout(60)
def test_a_read_only_event_log_is_refused_at_start(make_daemon: Any, needs_root: None) -> None:
    """SQLite opens a log its user cannot write read-only: the daemon used to say ready and
    fail every publish. Run as uid 65534 (root ignores modes) on a log made read-only."""
    d = make_daemon()
    d.client().publish([{"stream": "s", "type": "t"}])
    assert d.stop() == 0
    for dirpath, _, files in os.walk(d.root):
        os.chown(dirpath, 65534, 65534)
        for n in files:
            os.chown(os.path.join(dirpath, n), 65534, 65534)
    os.chmod(os.path.join(d.data_dir, "emitterd.db"), 0o400)
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
                       + d.argv(), env=d.env, cwd=d.root, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=20)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out, out
    assert "emitterd.db is not readable and writable by uid 65534 (mode 0400" in out, out


@pytest.mark.timeout(60)
def test_a_migrated_log_an_older_daemon_wrote_to_is_refused_with_the_remedy(
        make_daemon: Any) -> None:
    """An older emitterd (one row per event) opens a converted log without a word, sees no
    events, and appends at positions the chunks hold. What it writes is simulated here with
    its schema; the current daemon refuses, saying what happened and what to do, instead of
    SQLite's "UNIQUE constraint failed"."""
    d = make_daemon()
    d.client().publish([{"stream": "s", "type": "t"} for _ in range(5)])
    assert d.stop() == 0
    here = os.path.dirname(os.path.abspath(__file__))
    db = sqlite3.connect(os.path.join(d.data_dir, "emitterd.db"), isolation_level=None)
    with open(os.path.join(here, "data_v2_schema.sql")) as f:
        db.executescript(f.read())
    db.execute("INSERT INTO events VALUES (1, 's', 5, 't', NULL, ?)", (b"\x80",))
    db.close()
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out, out
    assert "written by an older emitterd after this one had converted it" in out, out
    assert "restore the backup taken before the upgrade" in out and "UNIQUE" not in out, out


@pytest.mark.timeout(30)
def test_regular_file_at_the_socket_path_is_not_replaced(make_daemon: Any) -> None:
    d = make_daemon(start=False)
    with open(d.socket, "w") as f:
        f.write("precious\n")
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert d.socket in out, out
    with open(d.socket) as f:
        assert f.read() == "precious\n"


@pytest.mark.timeout(30)
def test_socket_mode_and_data_dir_mode(make_daemon: Any) -> None:
    d = make_daemon()
    assert stat.S_ISSOCK(os.stat(d.socket).st_mode)
    assert mode(d.socket) == 0o660
    assert mode(d.data_dir) == 0o700
    d2 = make_daemon("--socket-mode", "0600")
    assert mode(d2.socket) == 0o600
    assert d2.client().ping()["pid"] == d2.proc.pid


@pytest.mark.timeout(30)
def test_default_paths_are_created_private(make_daemon: Any) -> None:
    # no --socket, no --data-dir: $XDG_RUNTIME_DIR/emitterd/emitterd.sock, $XDG_STATE_HOME/emitterd
    d = make_daemon(start=False)
    d.socket = os.path.join(d.root, "run", "emitterd", "emitterd.sock")
    d.data_dir = os.path.join(d.root, "state", "emitterd")
    d.argv = lambda: [sys.executable, "-m", "emitterd", "run"]  # type: ignore[method-assign]
    assert not os.path.exists(os.path.dirname(d.socket))
    d.start()
    assert mode(os.path.dirname(d.socket)) == 0o700
    assert mode(d.socket) == 0o660
    assert mode(d.data_dir) == 0o700
    assert d.client().ping()["pid"] == d.proc.pid


# ---- graceful shutdown ---------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_sigterm_to_the_whole_process_group_still_drains(make_daemon: Any) -> None:
    """`kill -TERM -PGID` (or `timeout`, or a shell) signals every process of the daemon's
    group: the workers and helpers are in groups of their own, so the daemon alone gets it
    and drains; the events held by a consumer are acked during the drain, and no child is
    reported dead before the shutdown."""
    d = make_daemon("--drain-timeout", "10")       # started with start_new_session: pgid = pid
    c = d.client()
    key = c.start(sub("group-kill", start_from="origin", pool_size=2))["key"]
    ready_status(d, c, key, 2)
    assert os.getpgid(d.proc.pid) == d.proc.pid
    for child in d.collect_children():
        assert os.getpgid(child.pid) != d.proc.pid, child.cmdline()
    positions = c.publish([{"stream": "orders", "type": "t"} for _ in range(4)])["positions"]
    consumer = c.attach(key)
    try:
        got = received(consumer, 2)
        os.killpg(d.proc.pid, signal.SIGTERM)
        time.sleep(0.5)                  # the drain waits for these acks
        consumer.ack(got)
        assert d.proc.wait(15) == 0
    finally:
        consumer.close()
    log = open(d.log_path).read()
    before = log.split("shutting down")[0]
    for bad in ("worker died", "checkpointer died", "fork server dropped"):
        assert bad not in before, log[-3000:]
    assert "drain timed out" not in log, log[-3000:]
    # the acks sent during the drain moved the checkpoint the pool stopped at
    stopped = [ln for ln in log.splitlines() if "pool stopped" in ln]
    assert stopped and "checkpoint=%d" % max(got) in stopped[-1], stopped
    assert sorted(got) == positions[:len(got)]


@pytest.mark.timeout(30)
def test_sigusr1_and_sigusr2_are_logged_and_ignored(make_daemon: Any) -> None:
    """Their default action would end the daemon with no drain, no log line and its socket
    left behind."""
    d = make_daemon()
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        d.proc.send_signal(sig)
        wait_for(lambda: "signal ignored" in open(d.log_path).read()
                 and signal.Signals(sig).name in open(d.log_path).read(), 10,
                 what="the ignored %s logged" % signal.Signals(sig).name)
    assert d.proc.poll() is None and d.client().ping()["pid"] == d.proc.pid
    assert d.stop() == 0


@pytest.mark.timeout(60)
def test_a_drain_does_not_wait_for_workers_without_a_consumer(make_daemon: Any,
                                                               short_tmp: str) -> None:
    """Events held by a worker whose subscriber is unreachable cannot be acked: a stop (and
    the shutdown) does not wait drain_timeout for them; they are delivered again later."""
    d = make_daemon("--drain-timeout", "30")
    c = d.client()
    path = os.path.join(short_tmp, "absent.sock")
    key = c.start(sub("nobody-home", start_from="origin", subscriber="unix:" + path))["key"]
    ready_status(d, c, key, 1)
    c.publish([{"stream": "orders", "type": "t"}] * 3)
    wait_for(lambda: c.status(key)["in_flight"] == 3, 10, what="3 events held by the worker")
    t0 = time.monotonic()
    st = c.stop(key)
    assert time.monotonic() - t0 < 20, "the stop waited for events no consumer could ack"
    assert st["state"] == "stopped" and st["checkpoint"] == 0
    assert "no consumer connected" in open(d.log_path).read()
    assert "drain timed out" not in open(d.log_path).read()


@pytest.mark.timeout(40)
def test_sigterm_with_unacked_events_exits_0_after_the_drain(make_daemon: Any) -> None:
    d = make_daemon("--drain-timeout", "1")
    c = d.client()
    key = c.start(sub("slow-consumer", start_from="origin"))["key"]
    ready_status(d, c, key, 1)
    positions = c.publish([{"stream": "orders", "type": "t"} for _ in range(3)])["positions"]
    other = d.client()
    other.ping()
    consumer = c.attach(key)
    try:
        assert sorted(received(consumer, 3)) == positions
        wait_for(lambda: c.status(key)["in_flight"] == 3, 5, what="3 events in flight")
        d.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # while it drains, new publishes are refused as unavailable
        def refused() -> bool:
            try:
                other.publish([{"stream": "late", "type": "t"}])
            except Unavailable:
                return True
            return False
        wait_for(refused, 0.9, interval=0.05, what="publish to be unavailable while draining")
        assert d.proc.wait(1 + 5) == 0
        elapsed = time.monotonic() - sent
        assert elapsed >= 0.5, "exited without waiting for the drain (%.2fs)" % elapsed
        # the consumer connection ends with the daemon
        assert consumer.recv(timeout=5) is None
    finally:
        consumer.close()
    assert not os.path.exists(d.socket), "the daemon removes its socket file on exit"
    # nothing was lost: a new daemon delivers the unacked events again
    d2 = make_daemon(start=False)
    d2.data_dir = d.data_dir
    d2.start()
    c2 = d2.client()
    ready_status(d2, c2, key, 1)
    assert c2.status(key)["checkpoint"] == 0
    with c2.attach(key) as again:
        redo: List[int] = []
        for batch in again.batches(timeout=5):
            redo += [e["position"] for e in batch]
            again.ack([e["position"] for e in batch])
            if len(redo) >= 3:
                break
        assert sorted(redo) == positions


# ---- permissions (SO_PEERCRED) ----------------------------------------------------------------

def _as_nobody(path: str, send_ping: bool) -> Dict[str, Any]:
    """In a forked child running as uid/gid 65534: connect, (ping,) read one frame,
    check for EOF; the outcome comes back through a pipe. The child is always reaped."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                          # child: never returns
        out: Dict[str, Any] = {}
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            if send_ping:
                try:
                    s.sendall(encode({"id": 7, "op": "ping"}))
                except (BrokenPipeError, ConnectionResetError):
                    out["send_failed"] = True    # refused before the request went out
            out["frame"] = read_frame(s)
            out["closed"] = closed_by_peer(s, 3)
            s.close()
        except BaseException as e:  # noqa: BLE001
            out["error"] = "%s: %s" % (type(e).__name__, e)
        finally:
            try:
                os.write(w, json.dumps(out, default=repr).encode())
            finally:
                os._exit(0)
    os.close(w)
    try:
        chunks = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        try:
            for _ in range(100):
                done, _status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                time.sleep(0.05)
            else:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return json.loads(b"".join(chunks).decode() or "{}")


@pytest.fixture
def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test switches a forked child to uid/gid 65534")


@pytest.mark.timeout(30)
def test_a_socket_directory_others_could_write_to_is_refused(make_daemon: Any) -> None:
    """Writable by others without the sticky bit, or owned by another user (a
    /tmp/emitterd-<uid> made first by someone else): they could swap the socket that
    clients connect to, so the daemon refuses to start there, in one line."""
    d = make_daemon(start=False)
    shared = os.path.join(d.root, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    d.socket = os.path.join(shared, "ctl.sock")
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out and "writable by others" in out, out
    os.chmod(shared, 0o1777)               # sticky, as /tmp: others cannot remove our file
    d.start()
    assert d.client().ping()["pid"] == d.proc.pid
    assert d.stop() == 0
    if os.geteuid() == 0:
        os.chmod(shared, 0o755)
        os.chown(shared, 65534, 65534)
        r = d.run_refused()
        out = r.stdout + r.stderr
        assert r.returncode == 1 and "belongs to uid 65534" in out, out


def _open_daemon(make_daemon: Any, *args: str) -> Daemon:
    d = make_daemon(start=False)
    os.chmod(d.root, 0o755)           # uid 65534 must reach the socket file
    d.extra_args = ["--socket-mode", "0666"] + list(args)
    return d.start()


@pytest.mark.timeout(60)
def test_permission_denied_for_other_uids(make_daemon: Any, needs_root: None) -> None:
    d = _open_daemon(make_daemon, "--allow-uids", "12345", "--allow-gids", "12345")
    got = _as_nobody(d.socket, send_ping=False)
    assert "error" not in got, got
    frame = got["frame"]
    assert frame is not None, got
    assert frame["id"] == 0 and frame["ok"] is False, frame
    assert frame["error"]["code"] == "permission_denied", frame
    assert isinstance(frame["error"]["message"], str)
    assert got["closed"] is True, "the refused connection stays open"
    # a refused peer affects nobody else
    assert d.client().ping()["pid"] == d.proc.pid
    # even a request sent at once gets only the refusal
    got = _as_nobody(d.socket, send_ping=True)
    assert got.get("frame") and got["frame"]["id"] == 0, got
    assert got["frame"]["error"]["code"] == "permission_denied", got


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag", ["--allow-uids", "--allow-gids"])
def test_allowed_uid_or_gid_is_served(make_daemon: Any, needs_root: None, flag: str) -> None:
    d = _open_daemon(make_daemon, flag, "1000,%d" % NOBODY)
    got = _as_nobody(d.socket, send_ping=True)
    assert "error" not in got, got
    frame = got["frame"]
    assert frame is not None and frame["id"] == 7 and frame["ok"] is True, frame
    assert frame["result"]["pid"] == d.proc.pid
    assert got["closed"] is False, "an allowed connection must stay open"


# ---- max_connections ------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_flood_of_refused_connections_and_bad_frames_does_not_flood_the_log(
        make_daemon: Any) -> None:
    """Lines a client causes per connection (refused at max_connections, a bad frame) are
    held to 5 a minute each; the admitted client is served throughout."""
    d = make_daemon("--max-connections", "1")
    reserve = hold_admin_reserve(d)
    with Client(d.socket, timeout=5) as c:          # 1 of 1: every other one is refused
        c.ping()
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.socket)
            assert read_frame(s)["error"]["code"] == "unavailable"
            s.close()
        assert c.ping()["pid"] == d.proc.pid
    for s in reserve:
        s.close()
    d2 = make_daemon()
    for _ in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(d2.socket)
        s.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")    # not msgpack
        assert read_frame(s)["error"]["code"] == "bad_frame"
        s.close()
    assert d2.client().ping()["pid"] == d2.proc.pid
    log = open(d.log_path).read()
    assert log.count("max_connections reached") == 5, log[-2000:]
    log2 = open(d2.log_path).read()
    assert log2.count("framing error") == 5, log2[-2000:]
    assert "peer_pid=%d" % os.getpid() in log2


@pytest.mark.timeout(30)
def test_max_connections(make_daemon: Any) -> None:
    d = make_daemon("--max-connections", "3")
    clients = [Client(d.socket, timeout=5) for _ in range(3)]
    extra: List[socket.socket] = hold_admin_reserve(d)
    try:
        for cl in clients:
            assert cl.ping()["pid"] == d.proc.pid
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.append(s)
        s.connect(d.socket)
        frame = read_frame(s)
        assert frame is not None, "the 4th connection got no answer"
        assert frame["id"] == 0 and frame["ok"] is False, frame
        assert frame["error"]["code"] == "unavailable", frame
        assert closed_by_peer(s), "the refused connection stays open"
        # the three admitted ones still work, on their own connections
        for cl in clients:
            assert cl.connected
            assert cl.ping()["pid"] == d.proc.pid
        # closing one lets a new one in
        clients[0].close()

        def admitted() -> bool:
            s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            extra.append(s2)
            s2.connect(d.socket)
            try:
                s2.sendall(encode({"id": 3, "op": "ping"}))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused and closed already: its answer is still there to read
            f = read_frame(s2)
            if f is not None and f.get("ok") is True and f["id"] == 3:
                return True
            assert f is not None and f["error"]["code"] == "unavailable", f
            s2.close()
            return False
        wait_for(admitted, 5, interval=0.05, what="a new connection to be admitted")
        for cl in clients[1:]:
            assert cl.ping()["pid"] == d.proc.pid
    finally:
        for cl in clients:
            cl.close()
        for s in extra:
            s.close()


@pytest.mark.timeout(30)
def test_attached_consumers_count_toward_max_connections(make_daemon: Any) -> None:
    # `emitterd config`: max_connections is "Most open connections on the control
    # socket, attached consumers included; more are refused."
    d = make_daemon("--max-connections", "3")
    c = Client(d.socket, timeout=5)
    consumers: List[Any] = []
    extra: List[socket.socket] = hold_admin_reserve(d)
    try:
        key = c.start(sub("consumed"))["key"]
        ready_status(d, c, key, 1)
        consumers = [c.attach(key) for _ in range(2)]           # 1 control + 2 consumers = 3
        wait_for(lambda: c.status(key)["workers"][0]["consumers"] == 2, 5,
                 what="2 consumers on the worker")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        extra.append(s)
        s.connect(d.socket)
        try:
            s.sendall(encode({"id": 1, "op": "ping"}))
        except (BrokenPipeError, ConnectionResetError):
            pass      # refused and closed already: its answer is still there to read
        frame = read_frame(s)
        assert frame is not None, "the 4th connection got no answer"
        assert frame["id"] == 0 and frame["ok"] is False and \
            frame["error"]["code"] == "unavailable", \
            "a 4th connection was admitted beside 1 client and 2 attached consumers: %r" % (frame,)
    finally:
        for cons in consumers:
            cons.close()
        c.close()
        for s in extra:
            s.close()


@pytest.mark.timeout(60)
def test_sigterm_leaves_no_child_behind_not_even_a_zombie(make_daemon: Any) -> None:
    """Every child (workers, checkpointer, spare) is gone and reaped by the daemon itself when
    it exits: none is handed to init as a zombie."""
    d = make_daemon()
    c = d.client()
    key = c.start(sub("reaped", pool_size=2))["key"]
    ready_status(d, c, key, 2)
    c.publish([{"stream": "orders", "type": "t"} for _ in range(10)])
    children = psutil.Process(d.proc.pid).children()
    assert len(children) >= 3          # two workers and the checkpointer
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 0
    for p in children:
        try:
            status = p.status()
        except psutil.NoSuchProcess:
            continue
        pytest.fail("child %d (%s) outlived the daemon: %s" % (p.pid, p.name(), status))
