"""What another local user can make the daemon, `emitterd restore`, or a client do. Most
tests need root (they switch forked children to uid 65534, as tests/test_security.py does)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, List

import pytest

from daemon_fixture import Daemon
from subscriber_helper import sub_spec
from test_security import NOBODY, as_user
from waits import wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (switches to uid 65534)")


def emitterd(*args: Any, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emitterd"] + [str(a) for a in args],
                          capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("EMITTERD_")})


def victim_file(where: str) -> str:
    """A root-only file standing for /etc/shadow."""
    path = os.path.join(where, "victim")
    with open(path, "w") as f:
        f.write("root-only content\n")
    os.chmod(path, 0o600)
    return path


def _start_or_refuse(d: Daemon) -> bool:
    """Run d's daemon until it listens or exits; whether it listened. It is stopped after."""
    proc = subprocess.Popen(d.argv(), env=d.env, cwd=d.root, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    d.proc = proc
    d.track(proc.pid)
    try:
        wait_for(lambda: proc.poll() is not None or os.path.exists(d.socket), 20,
                 "the daemon to start or refuse")
        return proc.poll() is None
    finally:
        d.stop()


def _daemon_for_nobody(make_daemon: Any, short_tmp: str) -> Daemon:
    """A daemon uid 65534 may talk to, and a short_tmp it may search."""
    d = make_daemon(start=False)
    os.chmod(d.root, 0o755)
    d.extra_args = ["--socket-mode", "0666", "--allow-uids", str(NOBODY)]
    d.start()
    os.chmod(short_tmp, 0o755)
    return d


class Listener:
    """A unix socket that records every connection made to it."""

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, mode)
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.got: List[bytes] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            c.settimeout(2)
            try:
                self.got.append(c.recv(4096))
            except OSError:
                self.got.append(b"")
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._t.join(5)
        self.sock.close()


# ---- 1. restore (run as root) follows symlinks the data directory's owner planted -------------

@needs_root
@pytest.mark.timeout(120)
def test_restore_as_root_does_not_write_or_chown_through_a_planted_lock_symlink(
        daemon: Daemon, short_tmp: str) -> None:
    """README "Backup and restore": root restores into the service user's data directory
    ("What it creates belongs to the data directory's owner (the service user), not to
    root"). That user owns the directory, so it can leave `emitterd.lock` there as a
    symlink to any file: restore opens it O_CREAT|O_RDWR, truncates it, writes its pid in
    it and chowns it to the service user, following the link each time."""
    c = daemon.client(timeout=10)
    c.publish([{"stream": "s", "type": "t"}])
    backup = os.path.join(short_tmp, "b.db")
    r = emitterd("backup", "--data-dir", daemon.data_dir, backup)
    assert r.returncode == 0, r.stderr
    victim = victim_file(short_tmp)
    data_dir = os.path.join(short_tmp, "svc-data")      # StateDirectory= of the service user
    os.mkdir(data_dir, 0o700)
    os.chown(data_dir, NOBODY, NOBODY)
    os.symlink(victim, os.path.join(data_dir, "emitterd.lock"))
    os.lchown(os.path.join(data_dir, "emitterd.lock"), NOBODY, NOBODY)
    r = emitterd("restore", "--data-dir", data_dir, backup)
    st = os.stat(victim)
    with open(victim) as f:
        content = f.read()
    assert (st.st_uid, content) == (0, "root-only content\n"), (
        "restore (exit %d) followed the service user's symlink emitterd.lock -> %s: the "
        "root-owned file now belongs to uid %d and holds %r" % (r.returncode, victim,
                                                               st.st_uid, content))


@needs_root
@pytest.mark.timeout(60)
def test_a_root_daemon_does_not_truncate_through_a_lock_symlink_in_a_foreign_data_dir(
        make_daemon: Any, short_tmp: str) -> None:
    """The same open without O_NOFOLLOW in `emitterd run` (datalock.lock): a root daemon
    whose data directory belongs to another user truncates whatever that user's
    emitterd.lock points to (the socket directory's owner is checked; the data
    directory's is not)."""
    victim = victim_file(short_tmp)
    d = make_daemon(start=False)
    os.mkdir(d.data_dir, 0o700)
    os.chown(d.data_dir, NOBODY, NOBODY)
    os.symlink(victim, os.path.join(d.data_dir, "emitterd.lock"))
    os.lchown(os.path.join(d.data_dir, "emitterd.lock"), NOBODY, NOBODY)
    _start_or_refuse(d)
    with open(victim) as f:
        content = f.read()
    assert content == "root-only content\n", (
        "the root daemon truncated %s through the symlink emitterd.lock planted in a data "
        "directory of uid %d; it now holds %r" % (victim, NOBODY, content))


# ---- 2. the unix: subscriber check walks the path as the client would -----------------------------

@needs_root
@pytest.mark.timeout(60)
def test_the_subscriber_check_does_not_resolve_links_inside_directories_the_client_cannot_search(
        make_daemon: Any, short_tmp: str) -> None:
    """README Security: the client needs "search permission on every directory up to it".
    The check resolves the path with os.path.realpath, i.e. with the daemon's rights, then
    judges the resolved path: a name inside a directory the client cannot search is judged
    by where the daemon found it leads, and the refusal names that target, which the client
    could not read (a symlink's target, an existence test inside a private directory)."""
    d = _daemon_for_nobody(make_daemon, short_tmp)
    private = os.path.join(short_tmp, "private")
    os.mkdir(private, 0o700)
    public = os.path.join(short_tmp, "public")
    os.mkdir(public, 0o755)
    target = Listener(os.path.join(public, "secret-name-4f2a.sock"), 0o600)
    try:
        os.symlink(target.path, os.path.join(private, "link"))
        got = as_user(d.socket, NOBODY, NOBODY, [], {"id": 1, "op": "start", "args": {
            "subscription": sub_spec("leak", subscriber="unix:" + os.path.join(private, "link"))}})
        frame = got["frame"]
        assert frame["ok"] is False and frame["error"]["code"] == "permission_denied", frame
        msg = frame["error"]["message"]
        assert "secret-name-4f2a" not in msg and "no search permission on directory %s" % private \
            in msg, ("the refusal reveals where a symlink inside %s (mode 0700, not searchable "
                     "by uid %d) points: %r" % (private, NOBODY, msg))
    finally:
        target.close()


# ---- 3. a socket directory reached through another user's symlink -----------------------------

@needs_root
@pytest.mark.timeout(60)
def test_a_socket_directory_that_is_another_users_symlink_is_refused(make_daemon: Any,
                                                                     short_tmp: str) -> None:
    """README Security: "a socket directory owned by another user or writable by others
    without the sticky bit refused at start (whoever could write there could swap the
    socket clients talk to)". server._check_socket_dir uses os.stat, which follows a
    symlink: another user's symlink (e.g. a /tmp/emitterd-<uid> made first) to a
    root-owned or sticky directory passes, and that user can later point it at its own
    directory, where its own listener then answers the daemon's clients."""
    os.chmod(short_tmp, 0o1777)                  # a /tmp of its own: sticky, world-writable
    real = os.path.join(short_tmp, "real")
    os.mkdir(real, 0o755)                        # root's (the daemon's user here)
    planted = os.path.join(short_tmp, "emitterd-0")
    os.symlink(real, planted)
    os.lchown(planted, NOBODY, NOBODY)           # made by uid 65534 before the daemon
    d = make_daemon(start=False)
    d.socket = os.path.join(planted, "emitterd.sock")
    listening = _start_or_refuse(d)
    assert not listening, ("the daemon listens on %s although its directory is a symlink "
                           "owned by uid %d, who can re-point it at any time"
                           % (d.socket, NOBODY))


# ---- 4. one allowed client locks everyone out, root included -------------------------------------

@needs_root
@pytest.mark.timeout(60)
def test_idle_connections_of_one_allowed_uid_do_not_lock_out_root(make_daemon: Any) -> None:
    """Risk, not written in the README: max_connections is global and a connection that
    never sends a byte is never closed, so one allowed uid holding max_connections idle
    connections refuses every other client, root and the daemon's own user included (no
    way left to stop a pool or look at the daemon)."""
    d = make_daemon(start=False)
    os.chmod(d.root, 0o755)
    d.extra_args = ["--socket-mode", "0666", "--allow-uids", str(NOBODY),
                    "--max-connections", "8"]
    d.start()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            held = []
            for _ in range(8):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(d.socket)
                held.append(s)
            os.write(w, b"x")
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"x"
        time.sleep(0.5)
        rc, out, err = d.ctl("ping", timeout=20)
        assert rc == 0, ("root's ping refused while uid %d holds 8 idle connections: rc %d %s"
                         % (NOBODY, rc, err.strip()))
    finally:
        os.close(r)
        os.kill(pid, 9)
        os.waitpid(pid, 0)


# ---- 5. partial_frame_timeout is reset by every byte: a trickle holds a frame buffer for good ---

@pytest.mark.timeout(90)
def test_a_frame_trickled_one_byte_at_a_time_is_still_cut_off(make_daemon: Any) -> None:
    """README Limits: "a half-sent frame blocks nobody (and its connection is closed after
    partial_frame_timeout, 60 s: it would hold its buffer for good)". The timer restarts
    whenever the buffered byte count changes (ControlConn.close_if_frame_stalled), so a
    client that sends 7 MiB of an 8 MiB frame and then one byte per (timeout - 1) seconds
    keeps that buffer in the parent forever; max_connections such clients hold
    max_connections * max_frame_bytes (8 GiB by default)."""
    d = make_daemon("--partial-frame-timeout", "2")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.socket)
    s.settimeout(10)
    s.sendall((8 * 1024 * 1024 - 100).to_bytes(4, "big") + b"\x00" * (1024 * 1024))
    s.setblocking(False)
    closed_at = None
    start = time.monotonic()
    try:
        while time.monotonic() - start < 20:       # ten times partial_frame_timeout
            time.sleep(1.0)                        # under the 2 s timeout
            try:
                s.send(b"\x00")
                if s.recv(65536, socket.MSG_PEEK) == b"":
                    closed_at = time.monotonic() - start
                    break
            except BlockingIOError:
                continue
            except OSError:
                closed_at = time.monotonic() - start
                break
    finally:
        s.close()
    assert closed_at is not None, (
        "a frame begun 20 s ago and still unfinished (one byte a second) was not cut off "
        "with partial_frame_timeout 2 s: its buffer is held for as long as the trickle goes on")


# ---- 6. clients follow the default /tmp path into another user's directory ---------------------

@needs_root
@pytest.mark.timeout(60)
def test_a_client_does_not_talk_to_a_socket_in_a_default_directory_another_user_made(
        make_daemon: Any, short_tmp: str, monkeypatch: Any) -> None:
    """PROTOCOL §2 makes /tmp/emitterd-<uid>/emitterd.sock the default without
    XDG_RUNTIME_DIR (cron, su, ssh without pam_systemd), a name another user can take first.
    The daemon refuses such a directory; the client library and emitterctl connected to
    whatever listened there. No fixed path is touched: the client's uid and its default are
    patched in process to a directory of this test's, owned by another uid. A path given
    explicitly (what the refusal advises) is not refused."""
    from emitterd import client as client_mod
    from emitterd.client import Client, Unreachable
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.delenv("EMITTERD_SOCKET", raising=False)
    where = os.path.join(short_tmp, "emitterd-1000")
    os.mkdir(where, 0o755)
    os.chown(where, 64999, 64999)                  # made first by another user
    fake = Listener(os.path.join(where, "emitterd.sock"), 0o666)
    try:
        monkeypatch.setattr(client_mod.os, "getuid", lambda: 1000)
        monkeypatch.setattr(client_mod.paths, "default_socket_path",
                            lambda env=None, uid=None: fake.path)
        with pytest.raises(Unreachable) as ei:
            Client(timeout=3).publish([{"stream": "payroll", "type": "t", "data": {"x": 1}}])
        assert "owned by uid 64999" in str(ei.value) and "give --socket" in str(ei.value)
        time.sleep(0.3)
        assert not fake.got, "the publish went to %s, a directory of uid 64999: %r" % (
            fake.path, fake.got[0][:120])
    finally:
        fake.close()
    # the advice works: the daemon's own socket in such a place, named explicitly
    d = make_daemon(start=False)
    real = os.path.join(d.root, "real")
    os.mkdir(real, 0o700)
    link = os.path.join(d.root, "emitterd-1000")
    os.symlink(real, link)
    d.socket = os.path.join(link, "emitterd.sock")
    d.start()
    monkeypatch.setattr(client_mod.paths, "default_socket_path",
                        lambda env=None, uid=None: d.socket)
    with pytest.raises(Unreachable):
        Client(None).ping()                         # the default: a link, refused
    assert Client(d.socket).ping()["pid"] == d.proc.pid


@pytest.mark.timeout(30)
def test_a_data_directory_every_user_may_write_is_refused(make_daemon: Any) -> None:
    """Anyone could rename emitterd.db there, or plant an emitterd.lock link."""
    d = make_daemon(start=False)
    os.mkdir(d.data_dir, 0o700)
    os.chmod(d.data_dir, 0o777)
    r = d.run_refused()
    assert r.returncode == 1, r
    assert "is writable by every user (mode 0777)" in r.stderr, r.stderr


# ---- 5. a link swapped in after the check ------------------------------------------------------

@needs_root
@pytest.mark.timeout(120)
def test_a_link_swapped_in_after_the_check_leads_the_workers_nowhere_the_client_could_not_go(
        make_daemon: Any, short_tmp: str) -> None:
    """README Security: "a client may only name a socket it could connect to itself". The
    check ran at `start` only, with the worker following the path with the daemon's rights
    at each connect: a client that owns the directory of its subscriber swapped a symbolic
    link in after the check, and the worker connected to a root-only socket for it. Also
    after a restart (the client's rights are stored with the subscription)."""
    d = _daemon_for_nobody(make_daemon, short_tmp)
    own = os.path.join(short_tmp, "own")
    os.mkdir(own, 0o755)
    os.chown(own, NOBODY, NOBODY)
    private = os.path.join(short_tmp, "private")
    os.mkdir(private, 0o700)
    mine = Listener(os.path.join(own, "mine.sock"), 0o666)      # the client may connect here
    secret = Listener(os.path.join(private, "secret.sock"), 0o600)
    link = os.path.join(own, "sub")
    try:
        os.symlink(mine.path, link)
        os.lchown(link, NOBODY, NOBODY)
        got = as_user(d.socket, NOBODY, NOBODY, [], {"id": 1, "op": "start", "args": {
            "subscription": sub_spec("swap", subscriber="unix:" + link, pool_size=1)}},
            closed_wait=0.1)
        assert got["frame"]["ok"] is True, got
        # the listener closes each connection at once: the worker connects again and again
        wait_for(lambda: mine.got, 20, "the worker to connect to the client's socket")
        os.unlink(link)
        os.symlink(secret.path, link)      # as uid 65534 may: own/ is its directory
        os.lchown(link, NOBODY, NOBODY)

        def refusals() -> int:
            with open(d.log_path, "rb") as f:
                return f.read().count(b"subscriber refused")
        wait_for(lambda: secret.got or refusals(), 30, "the worker to connect again")
        assert not secret.got, "the worker connected to %s through a link swapped in " \
            "after the check" % secret.path
        d.stop()
        before = refusals()
        d.start()
        wait_for(lambda: secret.got or refusals() > before, 30, "the restarted worker to connect")
        assert not secret.got, "after a restart, the worker connected to %s" % secret.path
    finally:
        mine.close()
        secret.close()
