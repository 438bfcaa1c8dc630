"""Security properties of a real daemon (PROTOCOL §2, §3, §6; DESIGN §6):

* `unix:` subscriber paths must be absolute;
* no path given by a client is ever created, unlinked or chmod'ed by the daemon;
* the daemon's own socket: missing directories created 0700, removed on a clean exit;
* SO_PEERCRED by group id (allow_gids), and a refused peer cannot run any op;
* the data dir and the database files are private;
* the systemd unit's `systemd-analyze security` exposure (scripts/check-units).

The uid checks, the socket mode and the data dir mode of an existing parent are in
test_lifecycle.py.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import time
from typing import Any, Dict, List, Optional

import pytest

from daemon_fixture import Daemon
from emitterd.client import Invalid
from emitterd.framing import Decoder, encode
from subscriber_helper import start_pool, sub_spec, wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOBODY = 65534


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def log_text(d: Daemon) -> str:
    try:
        with open(d.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


# ---- 1. unix: subscriber paths are absolute ------------------------------------------------------

RELATIVE = ["unix:rel.sock", "unix:./x", "unix:", "unix:../up.sock", "unix:~/home.sock",
            "unix:sub/dir.sock"]


@pytest.mark.timeout(30)
def test_relative_subscriber_paths_are_invalid(daemon: Daemon, short_tmp: str) -> None:
    c = daemon.client(timeout=10)
    for bad in RELATIVE:
        with pytest.raises(Invalid) as ei:
            c.start(sub_spec("rel", subscriber=bad))
        assert ei.value.details == {"field": "subscription.subscriber"}, (bad, ei.value.details)
    assert c.list()["subscriptions"] == []
    good = "unix:" + os.path.join(short_tmp, "ok.sock")
    key = c.start(sub_spec("rel", subscriber=good))["key"]
    for bad in RELATIVE:
        with pytest.raises(Invalid) as ei:
            c.update(key, subscriber=bad)
        assert ei.value.details == {"field": "subscriber"}, (bad, ei.value.details)
    assert c.status(key)["subscription"]["subscriber"] == good


# ---- 2. client-given paths are never touched ---------------------------------------------------

def snapshot(path: str) -> Dict[str, Any]:
    """Everything a create/unlink/chmod/chown/write would change."""
    st = os.lstat(path)
    snap: Dict[str, Any] = {"ino": st.st_ino, "mode": st.st_mode, "uid": st.st_uid,
                            "gid": st.st_gid, "size": st.st_size, "mtime": st.st_mtime_ns}
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            snap["content"] = f.read()
    elif stat.S_ISDIR(st.st_mode):
        snap["entries"] = sorted(os.listdir(path))
    elif stat.S_ISLNK(st.st_mode):
        snap["target"] = os.readlink(path)
    return snap


@pytest.mark.timeout(40)
def test_subscriber_paths_are_never_created_unlinked_or_chmoded(daemon: Daemon,
                                                                 short_tmp: str) -> None:
    d = daemon
    c = d.client(timeout=15)
    base = os.path.join(short_tmp, "hostile")
    os.mkdir(base, 0o755)
    missing_dir = os.path.join(base, "missing-dir")
    missing2 = os.path.join(base, "missing-too")
    regular = os.path.join(base, "regular.sock")
    with open(regular, "w") as f:
        f.write("precious\n")
    os.chmod(regular, 0o640)
    directory = os.path.join(base, "dir.sock")
    os.mkdir(directory, 0o750)
    with open(os.path.join(directory, "inside"), "w") as f:
        f.write("x")
    target = os.path.join(base, "target")
    with open(target, "w") as f:
        f.write("pointed at\n")
    os.chmod(target, 0o604)
    link = os.path.join(base, "link.sock")
    os.symlink(target, link)
    kept = [regular, directory, target, link]
    before = {p: snapshot(p) for p in kept}
    base_before = sorted(os.listdir(base))

    paths = {"missing": os.path.join(missing_dir, "sub.sock"), "regular": regular,
             "directory": directory, "link": link}
    keys = {}
    for name, path in paths.items():
        keys[name] = start_pool(d, c, sub_spec("hostile-" + name, subscriber="unix:" + path,
                                               pool_size=2))["key"]
    c.publish([{"stream": "s-%d" % i, "type": "t"} for i in range(6)])
    # a live change of subscriber to another missing directory
    c.update(keys["missing"], subscriber="unix:" + os.path.join(missing2, "x", "sub.sock"))

    # the workers try (and keep trying) every path: the log says so, nothing is delivered
    wait_until(lambda: all(p in log_text(d) for p in (regular, directory, link)), 10,
               "each worker to report its subscriber unreachable")
    time.sleep(3.0)      # backoff 0.1, 0.2, 0.4, 0.8, 1.6: several attempts per worker
    for name, key in keys.items():
        st = c.status(key)
        assert st["state"] == "running" and st["checkpoint"] == 0, (name, st["state"])
        assert all(w["consumers"] == 0 for w in st["workers"]), (name, st["workers"])

    def unchanged(when: str) -> None:
        assert not os.path.exists(missing_dir), "%s: the daemon created %s" % (when, missing_dir)
        assert not os.path.exists(missing2), "%s: the daemon created %s" % (when, missing2)
        for p in kept:
            assert os.path.lexists(p), "%s: the daemon removed %s" % (when, p)
            assert snapshot(p) == before[p], "%s: %s changed: %r -> %r" % (
                when, p, before[p], snapshot(p))
        assert sorted(os.listdir(base)) == base_before, "%s: %r" % (when, os.listdir(base))

    unchanged("while the pools run")
    for key in keys.values():
        c.stop(key, delete=True, drain_timeout=0)
    assert c.list()["subscriptions"] == []
    unchanged("after stop --delete")
    assert d.stop() == 0
    unchanged("after the daemon exited")


@pytest.mark.timeout(30)
def test_own_socket_parent_created_0700_and_socket_removed_on_exit(make_daemon: Any) -> None:
    d = make_daemon(start=False)
    parent = os.path.join(d.root, "sockets")
    d.socket = os.path.join(parent, "ctl.sock")
    d.start()
    assert mode(parent) == 0o700
    assert stat.S_ISSOCK(os.lstat(d.socket).st_mode)
    assert d.client(timeout=5).ping()["pid"] == d.proc.pid
    d.proc.send_signal(signal.SIGINT)          # SIGTERM has its own test in test_lifecycle
    assert d.proc.wait(15) == 0
    assert not os.path.lexists(d.socket), "the socket file outlived a clean exit"


@pytest.mark.timeout(30)
def test_every_missing_directory_is_created_0700(make_daemon: Any) -> None:
    # PROTOCOL §2: "(directories created with mode 0700 when missing)"; the data dir is
    # "created with mode 0700" (emitterd config): so are the missing directories above them
    d = make_daemon(start=False)
    d.socket = os.path.join(d.root, "s1", "s2", "ctl.sock")
    d.data_dir = os.path.join(d.root, "d1", "d2")
    d.start()
    created = [os.path.join(d.root, "s1"), os.path.join(d.root, "s1", "s2"),
               os.path.join(d.root, "d1"), os.path.join(d.root, "d1", "d2")]
    modes = {p: oct(mode(p)) for p in created}
    assert all(m == oct(0o700) for m in modes.values()), modes


# ---- 3. SO_PEERCRED by group -----------------------------------------------------------------

def _read_frame(s: socket.socket, timeout: float) -> Optional[Dict[str, Any]]:
    dec = Decoder(1 << 30)
    deadline = time.monotonic() + timeout
    while True:
        f = dec.next()
        if f is not None:
            return f
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no frame")
        s.settimeout(left)
        try:
            data = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not data:
            return None
        dec.feed(data)


def _closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False


def as_user(path: str, uid: int, gid: int, groups: List[int], request: Dict[str, Any],
            closed_wait: float = 1.5) -> Dict[str, Any]:
    """In a forked child with these credentials: connect, send `request` at once (before
    reading anything), read one frame, tell whether the daemon then closed. Reaped here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # child: never returns
        out: Dict[str, Any] = {}
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            out["creds"] = [os.getuid(), os.getgid(), sorted(os.getgroups())]
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(path)
            try:
                s.sendall(encode(request))
            except (BrokenPipeError, ConnectionResetError):
                out["send_failed"] = True
            out["frame"] = _read_frame(s, 5)
            out["closed"] = _closed_by_peer(s, closed_wait)
            s.close()
        except BaseException as e:  # noqa: BLE001
            out["error"] = "%s: %s" % (type(e).__name__, e)
        finally:
            try:
                os.write(w, json.dumps(out, default=repr).encode())
            finally:
                os._exit(0)
    os.close(w)
    chunks = []
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        for _ in range(100):
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return json.loads(b"".join(chunks).decode() or "{}")


ALLOWED_GID = 4242
OTHER_GID = 4343


@pytest.mark.timeout(60)
def test_allow_gids_admits_that_group_and_refuses_others_before_any_op(make_daemon: Any) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test switches forked children to uid 65534 and other gids")
    d = make_daemon(start=False)
    os.chmod(d.root, 0o755)                   # uid 65534 must reach the socket file
    d.extra_args = ["--socket-mode", "0666", "--allow-gids", str(ALLOWED_GID)]
    d.start()
    c = d.client(timeout=10)
    spec = sub_spec("by-a-stranger", start_from="origin")

    # a different gid (primary or supplementary): refused at once, and the start sent
    # right after connecting is not run
    for gid, groups in ((OTHER_GID, []), (NOBODY, [OTHER_GID])):
        got = as_user(d.socket, NOBODY, gid, groups, {"id": 3, "op": "start",
                                                      "args": {"subscription": spec}})
        assert "error" not in got, got
        assert got["creds"] == [NOBODY, gid, sorted(groups)], got
        frame = got["frame"]
        assert frame is not None, "refused peer got no answer: %r" % got
        assert frame["id"] == 0 and frame["ok"] is False, frame
        assert frame["error"]["code"] == "permission_denied", frame
        assert got["closed"] is True, "the refused connection stays open"
    time.sleep(0.3)
    assert c.list()["subscriptions"] == [], "a refused peer's start was run"
    assert "connection refused: peer not allowed" in log_text(d)

    # the allowed gid, as the primary gid of uid 65534 or as a supplementary group (a
    # member of the group, as socket_mode 0660 admits them): served
    for gid, groups in ((ALLOWED_GID, []), (NOBODY, [OTHER_GID, ALLOWED_GID])):
        got = as_user(d.socket, NOBODY, gid, groups, {"id": 4, "op": "ping"})
        assert "error" not in got, got
        frame = got["frame"]
        assert frame is not None and frame["id"] == 4 and frame["ok"] is True, (gid, groups, got)
        assert frame["result"]["pid"] == d.proc.pid
        assert got["closed"] is False, "an allowed connection must stay open"
    # and the very same start from it is run: the refusal above is what stopped it
    got = as_user(d.socket, NOBODY, ALLOWED_GID, [], {"id": 5, "op": "start",
                                                      "args": {"subscription": spec}},
                  closed_wait=0.1)
    assert got["frame"] is not None and got["frame"]["ok"] is True, got
    assert [s["subscription"]["name"] for s in c.list()["subscriptions"]] == ["by-a-stranger"]
    d.collect_children()


# ---- 4. private data ------------------------------------------------------------------------

def _db_modes(data_dir: str) -> Dict[str, str]:
    return {n: oct(mode(os.path.join(data_dir, n))) for n in sorted(os.listdir(data_dir))
            if n.startswith("emitterd.db")}


@pytest.mark.timeout(40)
def test_data_dir_and_database_files_are_private(make_daemon: Any) -> None:
    d = make_daemon()
    c = d.client(timeout=10)
    c.publish([{"stream": "secret", "type": "t", "data": "pin 1234"}])
    c.start(sub_spec("s"))
    assert mode(d.data_dir) == 0o700
    first = _db_modes(d.data_dir)
    assert first.get("emitterd.db") == oct(0o600), first
    assert "emitterd.db-wal" in first, first     # WAL mode: present while the daemon runs

    # and after a restart on the existing data dir
    assert d.stop() == 0
    d2 = make_daemon(start=False)
    d2.data_dir = d.data_dir
    d2.start()
    d2.client(timeout=10).publish([{"stream": "secret", "type": "t"}])
    assert mode(d2.data_dir) == 0o700
    again = _db_modes(d2.data_dir)
    assert again.get("emitterd.db") == oct(0o600), again

    exposed = {when: {n: m for n, m in modes.items() if int(m, 8) & 0o077}
               for when, modes in (("first start", first), ("restart", again))}
    assert not any(exposed.values()), \
        "database files open beyond the owner: %r (umask %s)" % (exposed, oct(_umask()))


def _umask() -> int:
    old = os.umask(0)
    os.umask(old)
    return old


# ---- 5. systemd-analyze security ------------------------------------------------------------

@pytest.mark.timeout(120)
def test_systemd_unit_security_exposure_is_under_the_threshold() -> None:
    script = os.path.join(ROOT, "scripts", "check-units")
    if not os.path.exists(script):
        pytest.skip("scripts/check-units does not exist")
    r = subprocess.run([script, "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=110)
    text = r.stdout.decode("utf-8", "replace")
    if r.returncode == 0 and text.startswith("skipped:"):
        pytest.skip(text.strip())
    assert r.returncode == 0, text
    assert "security: ok" in text, text


# ---- unix: subscribers the client could not reach itself -----------------------------------

@pytest.mark.timeout(60)
def test_a_client_cannot_make_the_daemon_connect_where_it_could_not(make_daemon: Any,
                                                                     short_tmp: str) -> None:
    """The daemon (root here) connects to a unix: subscriber with its own rights: a client
    may only name a socket it could connect to itself, or it would reach, through the
    daemon, sockets kept from it (a confused deputy). And no client may name the daemon's
    own control socket (every worker would reconnect to it forever)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test switches forked children to uid 65534")
    d = make_daemon(start=False)
    os.chmod(d.root, 0o755)
    d.extra_args = ["--socket-mode", "0666", "--allow-uids", str(NOBODY)]
    d.start()
    private = os.path.join(short_tmp, "private")
    open_dir = os.path.join(short_tmp, "open")
    os.mkdir(private, 0o700)
    os.mkdir(open_dir, 0o755)
    os.chmod(short_tmp, 0o755)
    listeners = []
    for where, mode in ((private, 0o777), (open_dir, 0o777), (open_dir, 0o755)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = os.path.join(where, "sub-%o.sock" % mode)
        s.bind(path)
        os.chmod(path, mode)
        s.listen(4)
        listeners.append((s, path))
    try:
        def start(path: str, name: str) -> Dict[str, Any]:
            got = as_user(d.socket, NOBODY, NOBODY, [], {"id": 1, "op": "start", "args": {
                "subscription": sub_spec(name, subscriber="unix:" + path)}})
            assert "error" not in got and got["frame"] is not None, got
            return got["frame"]
        hidden, reachable, read_only = (p for _, p in listeners)
        for path, why in ((hidden, "no search permission on directory %s" % private),
                          (read_only, "no write permission on %s" % read_only)):
            frame = start(path, "deputy-%s" % os.path.basename(path))
            assert frame["ok"] is False and frame["error"]["code"] == "permission_denied", frame
            assert why in frame["error"]["message"], frame
            assert frame["error"]["details"] == {"field": "subscription.subscriber"}, frame
        frame = start(d.socket, "itself")
        assert frame["ok"] is False and frame["error"]["code"] == "invalid", frame
        assert "the daemon's own control socket" in frame["error"]["message"], frame
        c = d.client(timeout=10)
        assert c.list()["subscriptions"] == [], "a refused start was run"
        ok = start(reachable, "reachable")
        assert ok["ok"] is True, ok
        # update is held to the same rule; root (the daemon's own user here) is not
        got = as_user(d.socket, NOBODY, NOBODY, [], {"id": 2, "op": "update", "args": {
            "key": ok["result"]["key"], "subscriber": "unix:" + hidden}})
        assert got["frame"]["error"]["code"] == "permission_denied", got
        assert c.update(ok["result"]["key"], subscriber="unix:" + hidden)["subscription"][
            "subscriber"] == "unix:" + hidden
        d.collect_children()
    finally:
        for s, _ in listeners:
            s.close()
