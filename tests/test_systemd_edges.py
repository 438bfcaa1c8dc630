"""systemd edges: socket activation with unusual inherited descriptors, the service manager's
systemd variables handed on to the daemon's helper processes.

Each test starts a real `emitterd run` the way systemd does it (fds from 3 on, LISTEN_PID
set by the process that execs emitterd, LISTEN_FDS / LISTEN_FDNAMES), via /bin/sh so that
LISTEN_PID is the daemon's own pid. Everything started is ended by pid in `finally`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import pytest

from emitterd.client import Client
from daemon_fixture import clean_env
from service_helpers import ActivatedDaemon, read_log


class Launched(ActivatedDaemon):
    """`emitterd run` with `socks` on fds 3, 4, ... and the given LISTEN_* variables."""

    def __init__(self, root: str, socks: Sequence[object], sock_path: str,
                 listen_fds: Optional[str] = None, names: Optional[str] = None,
                 extra_env: Optional[Dict[str, str]] = None, prefix: Sequence[str] = ()) -> None:
        self.root = root
        super().__init__(list(socks), sock_path, os.path.join(root, "data"),
                         os.path.join(root, "daemon.log"), clean_env(root, extra_env), root,
                         listen_fds=listen_fds, names=names, prefix=prefix)

    def collect(self) -> None:
        self.collect_children()

    def log(self) -> str:
        return read_log(self.log_path)

    def wait_log(self, pattern: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.collect()
            if re.search(pattern, self.log()):
                return True
            if self.proc.poll() is not None:
                return bool(re.search(pattern, self.log()))
            time.sleep(0.05)
        return False


def _listening(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    return s


def _ping(path: str, timeout: float = 5.0):
    with Client(path, timeout=timeout) as c:
        return c.ping()


# ---- 1. a connected (Accept=yes) or non-listening inherited socket -------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["accept_yes_connection", "bound_not_listening"])
def test_inherited_socket_that_cannot_accept_does_not_spin_and_flood_the_log(short_tmp, kind):
    """With Accept=yes in a .socket unit (or any launcher that passes a connected socket),
    fd 3 is a connection, not a listener. accept() on it fails with EINVAL at every loop
    turn: the daemon spins at 100% CPU and writes one ERROR line per turn (about 30,000
    lines a second into the journal), after having sent READY=1 and logged
    'listening ... activated=True'. Expected: refuse to start (exit 1, one 'cannot start'
    line), or at the very least not spin."""
    path = os.path.join(short_tmp, "ctl.sock")
    if kind == "accept_yes_connection":
        # what Accept=yes hands over: the client's connection, its request already sent
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.sendall(b"\x00\x00\x00\x0b\x82\xa2id\x01\xa2op\xa4ping")
    else:
        a = b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b.bind(path)
    d = Launched(short_tmp, [b], path)
    b.close()
    try:
        started = d.wait_log(r"emitterd ready|cannot start", 20)
        assert started, d.log()[-3000:]
        # give a spinning loop a moment; a well-behaved daemon has exited or is idle
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and d.proc.poll() is None:
            time.sleep(0.1)
        log = d.log()
        failures = log.count("accept failed")
        assert failures <= 10, (
            "%d 'accept failed' lines within about 2 s (daemon exit status %r); first lines:\n%s"
            % (failures, d.proc.poll(), "\n".join(log.splitlines()[:6])))
    finally:
        d.cleanup()
        a.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["tcp", "unix_dgram"])
def test_inherited_socket_that_is_no_unix_stream_listener_is_refused(short_tmp, kind):
    """PROTOCOL §2: the control channel is a Unix stream socket whose peers are checked with
    SO_PEERCRED. Handed a TCP listener (or a Unix datagram socket) on fd 3, the daemon logs
    'listening socket=<the --socket path> activated=True' and 'emitterd ready', then
    refuses every TCP peer (permission_denied, uid -1) or never gets a connection at all:
    a daemon that says it is ready and serves nobody, and a log line naming a path it does
    not listen on. Expected: exit status 1 with a 'cannot start' line naming the fd."""
    path = os.path.join(short_tmp, "ctl.sock")
    if kind == "tcp":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(16)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
    d = Launched(short_tmp, [s], path)
    s.close()
    try:
        try:
            rc = d.proc.wait(15)
        except subprocess.TimeoutExpired:
            rc = None
        assert rc == 1 and "cannot start" in d.log(), (
            "daemon handed a %s socket on fd 3: exit status %r (None = still running); log:\n%s"
            % (kind, rc, d.log()[-2000:]))
    finally:
        d.cleanup()


# ---- 2. several inherited sockets: the one named "control" -------------------------------------

@pytest.mark.timeout(60)
def test_the_socket_named_control_is_the_control_socket(short_tmp):
    """emitterd.socket names its socket (FileDescriptorName=control), and systemd passes the
    names in LISTEN_FDNAMES; with a second socket passed first (a drop-in ListenStream=,
    another .socket unit with Service=emitterd.service: the order across units is not
    fixed), the daemon takes fd 3 whatever its name, closes the socket named 'control',
    and logs 'listening socket=<control path>'. Clients of the documented path are refused
    (here) or, under systemd, which keeps the socket open, hang unanswered."""
    other = os.path.join(short_tmp, "other.sock")
    path = os.path.join(short_tmp, "ctl.sock")
    s_other, s_ctl = _listening(other), _listening(path)
    d = Launched(short_tmp, [s_other, s_ctl], path, names="other:control")
    s_other.close()
    s_ctl.close()
    try:
        assert d.wait_log(r"emitterd ready|cannot start", 20), d.log()[-3000:]
        assert d.proc.poll() is None, d.log()[-3000:]
        try:
            pid = _ping(path)["pid"]
            err = None
        except Exception as e:  # noqa: BLE001
            pid, err = None, e
        assert pid == d.proc.pid, (
            "no answer on the socket named 'control' (%s): %r; log:\n%s"
            % (path, err, d.log()[-1500:]))
    finally:
        d.cleanup()


# ---- 3. LISTEN_FDS larger than what was passed ---------------------------------------------------

@pytest.mark.timeout(90)
def test_listen_fds_count_beyond_the_passed_fds_does_not_close_the_daemons_own_fds(short_tmp):
    """The daemon creates its signal wakeup socketpair (Daemon.__init__) before it reads
    LISTEN_FDS (Daemon.start). With LISTEN_FDS=3 but one socket passed, fds 4 and 5 are
    that socketpair: listen_fds() wraps them, the list is dropped at the end of start(),
    and the garbage collector closes the daemon's own wakeup fds. Observed: ping gets no
    answer, 'Exception ignored when trying to write to the signal wakeup fd ...
    BrokenPipeError' and SIGTERM is ignored (the daemon keeps running until SIGKILL).
    Expected: the fds the daemon owns are never taken for inherited ones (read LISTEN_FDS
    first, as sd_listen_fds(3) callers do), it answers and stops on SIGTERM."""
    path = os.path.join(short_tmp, "ctl.sock")
    s = _listening(path)
    d = Launched(short_tmp, [s], path, listen_fds="3")
    s.close()
    try:
        assert d.wait_log(r"emitterd ready|cannot start", 20), d.log()[-3000:]
        try:
            _ping(path, timeout=5.0)
            err = None
        except Exception as e:  # noqa: BLE001
            err = e
        d.proc.send_signal(signal.SIGTERM)
        try:
            rc = d.proc.wait(15)
        except subprocess.TimeoutExpired:
            rc = None
        assert err is None and rc == 0, (
            "LISTEN_FDS=3 with one fd: ping error %r, exit status after SIGTERM %r "
            "(None = still running 15 s later); log:\n%s" % (err, rc, d.log()[-2000:]))
    finally:
        d.cleanup()


# ---- 4. NOTIFY_SOCKET / WATCHDOG_* handed on to the helpers and workers --------------------------

@pytest.mark.timeout(90)
@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
def test_helpers_do_not_inherit_notify_socket_or_watchdog(make_daemon, short_tmp):
    """sd_notify(3) (unset_environment) and sd_watchdog_enabled(3): the variables are for the
    main process; children must not see them. emitterd unsets LISTEN_* (systemd.py says:
    'so forked workers and children never see them') but hands NOTIFY_SOCKET and
    WATCHDOG_USEC to the fork server and the checkpointer (procs.spawn_module copies
    os.environ), and so to every worker the fork server forks. Checked on the execve
    of the helpers, under strace."""
    nsock = os.path.join(short_tmp, "n.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(nsock)
    trace = os.path.join(short_tmp, "trace")
    d = make_daemon(start=False)
    d.env.update({"NOTIFY_SOCKET": nsock, "WATCHDOG_USEC": "30000000"})
    argv = d.argv
    d.argv = lambda: ["strace", "-f", "-qq", "-e", "trace=execve", "-v", "-s", "4096",
                      "-o", trace] + argv()
    try:
        d.start()
        pid = d.wait_ping()["pid"]
        deadline = time.monotonic() + 20
        spawned: List[str] = []
        while time.monotonic() < deadline:
            with open(trace, errors="replace") as f:
                spawned = [ln for ln in f if "execve(" in ln and
                           ("emitterd.forkserver" in ln or "emitterd.checkpointer" in ln)]
            if len(spawned) >= 2:
                break
            time.sleep(0.1)
        assert len(spawned) >= 2, "helpers not seen in the trace"
        os.kill(pid, signal.SIGTERM)
        leaked = sorted({m.group(0).split("=")[0] for ln in spawned
                         for m in re.finditer(r'"(NOTIFY_SOCKET|WATCHDOG_USEC|WATCHDOG_PID)=', ln)})
        assert not leaked, "helpers started with %s in their environment:\n%s" % (
            ", ".join(v.strip('"') for v in leaked), "\n".join(l[:300] for l in spawned))
    finally:
        rx.close()


# ---- 5. SIGTERM while a client's `stop` drains with a longer drain_timeout -----------------------

def _frame(obj) -> bytes:
    import msgpack
    b = msgpack.packb(obj, use_bin_type=True)
    return len(b).to_bytes(4, "big") + b


def _read_frame(s: socket.socket):
    import msgpack
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = s.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return buf
    n = int.from_bytes(exactly(4), "big")
    return msgpack.unpackb(exactly(n), raw=False)


@pytest.mark.timeout(90)
def test_sigterm_drains_for_drain_timeout_even_while_a_stop_drains_longer(make_daemon):
    """README 'Running under systemd': "SIGTERM drains: new publishes get unavailable,
    in-flight events get up to drain_timeout to be acked, checkpoints are persisted,
    workers are stopped, exit status 0" (the unit allows TimeoutStopSec=30 for it).
    When a client's `stop` with a long drain_timeout (here 120 s) is draining the pool,
    Daemon.shutdown -> EmitterPool.stop only adds a waiter to that stop and keeps its
    deadline: the daemon is still running long after drain_timeout (3 s here); systemd
    would SIGKILL it at TimeoutStopSec."""
    d = make_daemon("--drain-timeout", "3")
    c = d.client()
    key = c.start({"name": "a", "type": "stream", "selector": "$all", "start_from": "origin",
                   "options": {"ack_timeout": 1000}})["key"]
    consumer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stopper = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        consumer.settimeout(20)
        consumer.connect(d.socket)
        consumer.sendall(_frame({"id": 1, "op": "attach", "args": {"key": key}}))
        assert _read_frame(consumer)["ok"]
        c.publish([{"stream": "x", "type": "t"} for _ in range(3)])
        got = _read_frame(consumer)            # in flight on the consumer, never acked
        assert got["op"] == "events" and got["events"]
        stopper.connect(d.socket)
        stopper.sendall(_frame({"id": 7, "op": "stop",
                                "args": {"key": key, "drain_timeout": 120}}))
        # the stop is taken in the loop turn that reads it; let a later request go round
        with Client(d.socket, timeout=10) as c2:
            c2.ping()
        time.sleep(0.5)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        try:
            rc = d.proc.wait(25)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        assert rc == 0, (
            "SIGTERM with drain_timeout 3 while a stop(drain_timeout=120) drains: exit status "
            "%r after %.0f s (None = still running)\n%s" % (rc, took, d.log_tail()))
    finally:
        consumer.close()
        stopper.close()


# ---- 6. a reload during the shutdown drain says READY=1 after STOPPING=1 ------------------------

@pytest.mark.timeout(60)
def test_no_ready_after_stopping(make_daemon, short_tmp):
    """sd_notify(3): STOPPING=1 "tells the service manager that the service is beginning its
    shutdown". A SIGHUP (systemctl reload, a logrotate hook) that arrives while SIGTERM's
    drain is under way is run as a reload: the daemon sends RELOADING=1 and then
    READY=1 (with a STATUS= line of running pools) after its STOPPING=1, and re-applies
    settings (it even replaces its checkpointer helper) while exiting. Expected: after
    STOPPING=1 no READY=1 (a reload during shutdown is ignored, or only logged)."""
    from service_helpers import NotifyReceiver, has_line
    nsock = os.path.join(short_tmp, "notify.sock")
    rx = NotifyReceiver(nsock)
    consumer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        d = make_daemon("--drain-timeout", "5", env={"NOTIFY_SOCKET": nsock})
        rx.wait_for(lambda t: has_line(t, "READY=1"), 10)
        c = d.client()
        key = c.start({"name": "a", "type": "stream", "selector": "$all",
                       "start_from": "origin", "options": {"ack_timeout": 1000}})["key"]
        consumer.settimeout(20)
        consumer.connect(d.socket)
        consumer.sendall(_frame({"id": 1, "op": "attach", "args": {"key": key}}))
        assert _read_frame(consumer)["ok"]
        c.publish([{"stream": "x", "type": "t"}])
        assert _read_frame(consumer)["op"] == "events"      # held, never acked: drain waits
        n = rx.count()
        d.proc.send_signal(signal.SIGTERM)
        i_stop, _ = rx.wait_for(lambda t: has_line(t, "STOPPING=1"), 10, after=n)
        d.proc.send_signal(signal.SIGHUP)
        assert d.proc.wait(30) == 0
        after = rx.texts()[i_stop + 1:]
        assert not any(has_line(t, "READY=1") for t in after), (
            "sent after STOPPING=1: %r" % (after,))
    finally:
        consumer.close()
        rx.close()


# ---- 7. start-up refusals under journald carry no priority -------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("env_extra", [{"EMITTERD_LOG_LEVEL": "bogus"},
                                       {"EMITTERD_CONFIG": "/nonexistent/emitterd.toml"}])
def test_startup_refusal_under_journald_has_an_error_priority(short_tmp, env_extra):
    """logs.py: under journald ($JOURNAL_STREAM names stderr) every line carries a syslog
    priority prefix (<3> for errors). A failed start from a bad setting in
    /etc/emitterd/emitterd.env (the unit's EnvironmentFile=) is printed by the command line
    without one, so journald files the only line that says why the service failed at the
    stream's default priority, info: `journalctl -u emitterd -p err` shows nothing.
    (A 'cannot start' from the daemon itself does get <3>.)"""
    a, b = socket.socketpair()
    st = os.fstat(b.fileno())
    env = clean_env(short_tmp, dict(env_extra, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino)))
    try:
        p = subprocess.run([sys.executable, "-m", "emitterd", "run", "--socket",
                            os.path.join(short_tmp, "s.sock"), "--data-dir",
                            os.path.join(short_tmp, "data")], stdin=subprocess.DEVNULL,
                           stdout=b.fileno(), stderr=b.fileno(), env=env, timeout=30)
        b.close()
        a.settimeout(5)
        out = b""
        while True:
            chunk = a.recv(65536)
            if not chunk:
                break
            out += chunk
        text = out.decode(errors="replace")
        assert p.returncode != 0, text
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert lines and all(re.match(r"<[0-3]>", ln) for ln in lines), (
            "exit %d under journald, lines without an error priority: %r" % (p.returncode, lines))
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_a_stale_listen_pid_is_named_not_taken_for_another_daemon(short_tmp: str) -> None:
    """LISTEN_FDS meant for another process (LISTEN_PID of a wrapper that forked emitterd, say
    ExecStart=/bin/sh -c 'emitterd run; ...'): the daemon skips the inherited socket, as it must,
    but says nothing about it and then refuses to start because "another daemon is already
    listening" on the socket path, which is systemd's own socket (the one it was given). The
    operator is sent looking for a second daemon that does not exist."""
    path = os.path.join(short_tmp, "ctl.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)          # what systemd's emitterd.socket holds
    listener.listen(16)
    env = clean_env(short_tmp, {"LISTEN_PID": "1", "LISTEN_FDS": "1",
                                "LISTEN_FDNAMES": "control"})
    r = subprocess.run([sys.executable, "-c",
                        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
                        "os.execv(sys.executable, [sys.executable, '-m', 'emitterd', 'run', "
                        "'--socket', sys.argv[2], '--data-dir', sys.argv[3]])",
                        str(listener.fileno()), path, os.path.join(short_tmp, "data")],
                       pass_fds=(listener.fileno(),), env=env, capture_output=True, text=True,
                       timeout=20)
    listener.close()
    assert r.returncode == 1, r.stderr
    # the cause is the inherited socket meant for another pid, not a second daemon
    assert "LISTEN_PID" in r.stderr, r.stderr
