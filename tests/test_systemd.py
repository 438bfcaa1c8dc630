"""emitterd.systemd against real sockets and real child processes; the unit files via scripts/."""
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from emitterd import systemd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV_BASE = {k: v for k, v in os.environ.items()
                  if not k.startswith(("LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM"))}
CHILD_ENV_BASE["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")


# -- helpers ----------------------------------------------------------------------------------------

def _receiver(addr):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(addr)
    sock.settimeout(5)
    return sock


@pytest.fixture
def path_receiver(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = _receiver(path)
    yield sock, {"NOTIFY_SOCKET": path}
    sock.close()


@pytest.fixture
def abstract_receiver():
    name = "emitterd-test-%s" % uuid.uuid4().hex
    sock = _receiver("\0" + name)
    yield sock, {"NOTIFY_SOCKET": "@" + name}
    sock.close()


def _recv(sock):
    return sock.recv(4096).decode()


def _nothing_pending(sock):
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


# -- notify() ----------------------------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_notify_path_socket(path_receiver):
    sock, env = path_receiver
    assert systemd.notify("READY=1\nSTATUS=up", env) is True
    assert _recv(sock) == "READY=1\nSTATUS=up"


@pytest.mark.timeout(10)
def test_notify_abstract_socket(abstract_receiver):
    sock, env = abstract_receiver
    assert systemd.notify("WATCHDOG=1", env) is True
    assert _recv(sock) == "WATCHDOG=1"


@pytest.mark.timeout(10)
def test_notify_uses_os_environ_by_default(path_receiver, monkeypatch):
    sock, env = path_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    assert systemd.notify("STATUS=from environ") is True
    assert _recv(sock) == "STATUS=from environ"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("value", [None, "", "relative/path.sock", "vsock:2:1234", "@"])
def test_notify_without_usable_socket_is_false(value, monkeypatch):
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert systemd.notify("READY=1", env) is False
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


@pytest.mark.timeout(10)
def test_notify_send_failure_is_false_not_raise(tmp_path):
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "missing.sock")}) is False
    # a path that is not a socket
    (tmp_path / "file").write_text("x")
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "file")}) is False
    # too long for sun_path
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "/" + "x" * 200}) is False


@pytest.mark.timeout(10)
def test_notify_empty_state_is_false(path_receiver):
    sock, env = path_receiver
    assert systemd.notify("", env) is False
    assert _nothing_pending(sock)


# -- Notifier ----------------------------------------------------------------------------------------

@pytest.mark.timeout(10)
@pytest.mark.parametrize("which", ["path", "abstract"])
def test_notifier_messages(which, path_receiver, abstract_receiver):
    sock, env = path_receiver if which == "path" else abstract_receiver
    n = systemd.Notifier(env)
    try:
        assert n.enabled
        assert n.ready() is True
        assert _recv(sock) == "READY=1"
        assert n.ready("3 pools, 12 workers") is True
        assert _recv(sock) == "READY=1\nSTATUS=3 pools, 12 workers"
        assert n.status("draining\n2 in flight") is True
        assert _recv(sock) == "STATUS=draining 2 in flight"
        assert n.watchdog() is True
        assert _recv(sock) == "WATCHDOG=1"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert n.reloading() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = _recv(sock).split("\n")
        assert lines[0] == "RELOADING=1"
        assert lines[1].startswith("MONOTONIC_USEC=")
        assert before <= int(lines[1].split("=", 1)[1]) <= after
        assert len(lines) == 2
        assert n.stopping() is True
        assert _recv(sock) == "STOPPING=1"
        assert n.stopping("stopping: draining") is True
        assert _recv(sock) == "STOPPING=1\nSTATUS=stopping: draining"
        assert n.send("EXTEND_TIMEOUT_USEC=5000000") is True
        assert _recv(sock) == "EXTEND_TIMEOUT_USEC=5000000"
    finally:
        n.close()
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.status("x") is False
    assert n.fileno() == -1
    n.close()  # idempotent
    assert _nothing_pending(sock)


@pytest.mark.timeout(10)
def test_notifier_socket_is_one_nonblocking_cloexec_dgram(path_receiver):
    sock, env = path_receiver
    with systemd.Notifier(env) as n:
        fd = n.fileno()
        assert fd >= 0
        assert not os.get_inheritable(fd)
        assert os.get_blocking(fd) is False
        s = socket.socket(fileno=os.dup(fd))
        try:
            assert s.family == socket.AF_UNIX and s.type == socket.SOCK_DGRAM
        finally:
            s.close()
        for _ in range(3):
            n.watchdog()
        assert n.fileno() == fd  # the same socket every time
    assert not n.enabled


@pytest.mark.timeout(20)
def test_notifier_never_blocks_when_the_manager_is_not_reading(tmp_path):
    path = str(tmp_path / "slow.sock")
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.bind(path)
    try:
        with systemd.Notifier({"NOTIFY_SOCKET": path}) as n:
            t0 = time.monotonic()
            results = [n.status("x" * 512) for _ in range(5000)]
            elapsed = time.monotonic() - t0
        assert results[0] is True
        assert results.count(False) > 0      # the queue filled up: dropped, not blocked
        assert elapsed < 5
    finally:
        slow.close()


@pytest.mark.timeout(10)
def test_notifier_after_the_manager_went_away(tmp_path):
    path = str(tmp_path / "gone.sock")
    rx = _receiver(path)
    n = systemd.Notifier({"NOTIFY_SOCKET": path})
    assert n.watchdog() is True
    rx.close()
    os.unlink(path)
    assert n.watchdog() is False  # ENOENT: no exception
    n.close()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:9"}])
def test_notifier_disabled(env):
    n = systemd.Notifier(env)
    assert n.enabled is False
    assert n.fileno() == -1
    assert n.ready("x") is False and n.status("x") is False and n.watchdog() is False
    assert n.stopping() is False and n.reloading() is False
    n.close()


@pytest.mark.timeout(10)
def test_notifier_reads_os_environ_by_default(path_receiver, monkeypatch):
    sock, env = path_receiver
    monkeypatch.setenv("NOTIFY_SOCKET", env["NOTIFY_SOCKET"])
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with systemd.Notifier() as n:
        assert n.enabled
        assert n.watchdog_interval() == 2.0
        assert n.ready() is True
        assert _recv(sock) == "READY=1"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("usec,pid,expected", [
    (None, None, None),
    ("30000000", None, 15.0),
    ("30000000", "", 15.0),
    ("30000000", "self", 15.0),
    ("30000000", "other", None),
    ("1000", "self", 0.0005),
    ("0", None, None),
    ("", None, None),
    ("-5", None, None),
    ("abc", None, None),
    ("30000000", "notapid", None),
])
def test_watchdog_interval(usec, pid, expected, path_receiver):
    env = dict(path_receiver[1])
    if usec is not None:
        env["WATCHDOG_USEC"] = usec
    if pid is not None:
        env["WATCHDOG_PID"] = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
    with systemd.Notifier(env) as n:
        got = n.watchdog_interval()
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


@pytest.mark.timeout(10)
def test_watchdog_interval_without_notify_socket():
    # mirrors sd_watchdog_enabled(): the interval does not depend on NOTIFY_SOCKET
    n = systemd.Notifier({"WATCHDOG_USEC": "2000000"})
    assert n.enabled is False
    assert n.watchdog_interval() == 1.0
    assert n.watchdog() is False


@pytest.mark.timeout(20)
def test_notifier_in_forked_worker_sees_no_watchdog(path_receiver):
    """WATCHDOG_PID = the parent: a forked worker gets None (NotifyAccess=main)."""
    sock, env = path_receiver
    env = dict(env, WATCHDOG_USEC="10000000", WATCHDOG_PID=str(os.getpid()))
    n = systemd.Notifier(env)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.write(w, repr(n.watchdog_interval()).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        child_says = f.read().decode()
    os.waitpid(pid, 0)
    assert child_says == "None"
    assert n.watchdog_interval() == 5.0
    n.close()


# -- listen_fds() in a real child -----------------------------------------------------------------------

# Exec wrapper: moves the passed fds onto 3, 4, ... and sets LISTEN_* for its own pid, then
# execs the child (exec keeps the pid, as systemd does). argv: SPEC -- PROGRAM...
# SPEC is JSON: {"fds": [...], "pid": "self"|"parent"|str, "names": str|null}
WRAPPER = textwrap.dedent("""
    import fcntl, json, os, sys
    spec = json.loads(sys.argv[1])
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in spec["fds"]]
    for fd in spec["fds"]:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)          # inheritable
        os.close(fd)
    pid = {"self": str(os.getpid()), "parent": str(os.getppid())}.get(spec["pid"], spec["pid"])
    os.environ["LISTEN_PID"] = pid
    os.environ["LISTEN_FDS"] = str(len(high))
    if spec.get("names") is not None:
        os.environ["LISTEN_FDNAMES"] = spec["names"]
    os.execv(sys.argv[3], sys.argv[3:])
""")

# The "daemon": reports what listen_fds() gave it, then serves one connection on each socket.
CHILD = textwrap.dedent("""
    import json, os, socket, subprocess, sys
    from emitterd import systemd
    unset = sys.argv[1] == "unset"
    with_names = sys.argv[2] == "names"
    if with_names:
        pairs = systemd.listen_fds_with_names(unset=unset)
        socks = [s for _, s in pairs]
        names = [n for n, _ in pairs]
    else:
        socks = systemd.listen_fds(unset=unset)
        names = None
    grandchild = subprocess.run(
        [sys.executable, "-c",
         "import json, os\\n"
         "def alive(fd):\\n"
         "    try:\\n"
         "        os.fstat(fd)\\n"
         "        return True\\n"
         "    except OSError:\\n"
         "        return False\\n"
         "print(json.dumps({'env': sorted(k for k in os.environ if k.startswith('LISTEN_')),"
         " 'fd3': alive(3), 'fd4': alive(4)}))"],
        close_fds=False, stdout=subprocess.PIPE, check=True)
    report = {
        "pid": os.getpid(),
        "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "socks": [{"fileno": s.fileno(), "family": int(s.family), "type": int(s.type),
                   "name": s.getsockname(), "inheritable": os.get_inheritable(s.fileno())}
                  for s in socks],
        "names": names,
        "grandchild": json.loads(grandchild.stdout),
    }
    print(json.dumps(report), flush=True)
    for s in socks:
        s.settimeout(10)
        conn, _ = s.accept()
        conn.sendall(b"hello from %d" % s.fileno())
        conn.close()
""")


def _listener(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


def _activate(listeners, pid="self", names=None, unset=True, with_names=False):
    spec = {"fds": [s.fileno() for s in listeners], "pid": pid, "names": names}
    return subprocess.Popen(
        [sys.executable, "-c", WRAPPER, json.dumps(spec), "--",
         sys.executable, "-c", CHILD, "unset" if unset else "keep", "names" if with_names else "plain"],
        pass_fds=[s.fileno() for s in listeners], env=CHILD_ENV_BASE, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _connect_and_read(path):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(10)
    c.connect(path)
    data = b""
    while True:
        chunk = c.recv(100)
        if not chunk:
            break
        data += chunk
    c.close()
    return data.decode()


@pytest.mark.timeout(30)
def test_listen_fds_in_activated_child(tmp_path):
    path = str(tmp_path / "ctl.sock")
    lst = _listener(path)
    proc = _activate([lst])
    lst.close()  # only the child holds it now
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode()
        report = json.loads(line)
        assert report["env"] == []                      # LISTEN_* removed
        assert len(report["socks"]) == 1
        s = report["socks"][0]
        assert s["fileno"] == 3
        assert s["family"] == socket.AF_UNIX and s["type"] == socket.SOCK_STREAM
        assert s["name"] == path
        assert s["inheritable"] is False                 # CLOEXEC set
        assert report["grandchild"] == {"env": [], "fd3": False, "fd4": False}
        assert _connect_and_read(path) == "hello from 3"  # the real listening socket
        assert proc.wait(timeout=10) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(30)
def test_listen_fds_two_sockets_with_names(tmp_path):
    paths = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    lsts = [_listener(p) for p in paths]
    proc = _activate(lsts, names="control:other", with_names=True)
    for s in lsts:
        s.close()
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read().decode()
        report = json.loads(line)
        assert [s["fileno"] for s in report["socks"]] == [3, 4]
        assert [s["name"] for s in report["socks"]] == paths
        assert report["names"] == ["control", "other"]
        assert report["env"] == []
        assert _connect_and_read(paths[0]) == "hello from 3"
        assert _connect_and_read(paths[1]) == "hello from 4"
        assert proc.wait(timeout=10) == 0, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(30)
def test_listen_fds_names_default_to_unknown(tmp_path):
    lst = _listener(str(tmp_path / "x.sock"))
    proc = _activate([lst], with_names=True)
    lst.close()
    try:
        report = json.loads(proc.stdout.readline() or b"null")
        assert report is not None, proc.stderr.read().decode()
        assert report["names"] == ["unknown"]
        _connect_and_read(str(tmp_path / "x.sock"))
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(30)
def test_listen_fds_keeps_env_when_unset_false(tmp_path):
    path = str(tmp_path / "k.sock")
    lst = _listener(path)
    proc = _activate([lst], unset=False)
    lst.close()
    try:
        report = json.loads(proc.stdout.readline() or b"null")
        assert report is not None, proc.stderr.read().decode()
        assert report["env"] == ["LISTEN_FDS", "LISTEN_PID"]
        assert len(report["socks"]) == 1 and report["socks"][0]["inheritable"] is False
        # the grandchild sees the variables but LISTEN_PID is not its pid, and fd 3 is closed
        assert report["grandchild"]["env"] == ["LISTEN_FDS", "LISTEN_PID"]
        assert report["grandchild"]["fd3"] is False
        assert _connect_and_read(path) == "hello from 3"
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pid", ["parent", "garbage", ""])
def test_listen_fds_for_another_pid_is_empty(tmp_path, pid):
    lst = _listener(str(tmp_path / "o.sock"))
    proc = _activate([lst], pid=pid)
    lst.close()
    try:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err.decode()
        report = json.loads(out)
        assert report["socks"] == []
        assert report["env"] == []       # unset whatever the outcome
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.timeout(10)
def test_listen_fds_not_activated_in_process():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "1"}
    assert systemd.listen_fds(env) == []
    assert env == {"OTHER": "1"}
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert systemd.listen_fds(env) == []
    assert env == {}
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}
    assert systemd.listen_fds(env, unset=False) == []
    assert env == {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"}
    assert systemd.listen_fds({}) == []
    assert systemd.SD_LISTEN_FDS_START == 3


# -- journal_stream_active() -----------------------------------------------------------------------------

@pytest.mark.timeout(10)
def test_journal_stream_active_in_process(tmp_path):
    st = os.fstat(2)
    assert systemd.journal_stream_active({"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino)}) is True
    assert systemd.journal_stream_active({"JOURNAL_STREAM": "%d:%d" % (st.st_dev, st.st_ino + 1)}) is False
    assert systemd.journal_stream_active({"JOURNAL_STREAM": "%d:%d" % (st.st_dev + 1, st.st_ino)}) is False
    for bad in ("", "12", "a:b", ":", "1:2:3"):
        assert systemd.journal_stream_active({"JOURNAL_STREAM": bad}) is False
    assert systemd.journal_stream_active({}) is False
    with open(tmp_path / "f", "w") as f:
        fst = os.fstat(f.fileno())
        env = {"JOURNAL_STREAM": "%d:%d" % (fst.st_dev, fst.st_ino)}
        assert systemd.journal_stream_active(env, fd=f.fileno()) is True
        assert systemd.journal_stream_active(env, fd=2) is (os.path.sameopenfile(2, f.fileno()))


@pytest.mark.timeout(20)
def test_journal_stream_active_in_child_with_stderr_on_a_socket():
    """Like systemd: stderr is a stream socket and JOURNAL_STREAM names it."""
    a, b = socket.socketpair()
    try:
        st = os.fstat(a.fileno())
        code = "import sys; from emitterd import systemd; print(systemd.journal_stream_active())"
        env = dict(CHILD_ENV_BASE, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
        out = subprocess.run([sys.executable, "-c", code], stderr=a.fileno(), stdout=subprocess.PIPE,
                             env=env, cwd=ROOT, timeout=15, check=True).stdout
        assert out.strip() == b"True"
        out = subprocess.run([sys.executable, "-c", code], stderr=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             env=env, cwd=ROOT, timeout=15, check=True).stdout
        assert out.strip() == b"False"
    finally:
        a.close()
        b.close()


# -- MemoryDenyWriteExecute= (emitterd.service) -----------------------------------------------------------

MDWE_CHILD = textwrap.dedent("""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
    if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        print("unsupported errno=%d" % ctypes.get_errno()); sys.exit(0)
    import mmap
    try:   # proof that the restriction is on
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("not enforced"); sys.exit(0)
    except OSError:
        pass
    import json, selectors, socket, sqlite3, tempfile
    import msgpack, psutil, setproctitle, click, prometheus_client
    import emitterd, emitterd.framing, emitterd.systemd, emitterd.logs, emitterd.paths
    d = tempfile.mkdtemp()
    db = sqlite3.connect(os.path.join(d, "t.db"))
    db.execute("pragma journal_mode=wal")
    db.execute("create table t (x)")
    db.executemany("insert into t values (?)", [(i,) for i in range(1000)])
    db.commit()
    assert db.execute("select count(*) from t").fetchone()[0] == 1000
    assert msgpack.unpackb(msgpack.packb({"a": [1, 2]})) == {"a": [1, 2]}
    p = psutil.Process()
    p.memory_info(); p.cpu_percent(None); p.children()
    setproctitle.setproctitle("emitterd: mdwe test")
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    assert os.WEXITSTATUS(os.waitpid(pid, 0)[1]) == 7
    db.close()
    import shutil
    shutil.rmtree(d)        # the test's own temp directory goes with it
    print("ok")
""")


@pytest.mark.timeout(60)
def test_python_runs_under_memory_deny_write_execute():
    """emitterd.service sets MemoryDenyWriteExecute=yes: the same rule via prctl(PR_SET_MDWE)."""
    out = subprocess.run([sys.executable, "-c", MDWE_CHILD], env=CHILD_ENV_BASE, cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=50)
    text = out.stdout.decode().strip()
    if text.startswith("unsupported"):
        pytest.skip("kernel without PR_SET_MDWE (Linux < 6.3): %s" % text)
    assert out.returncode == 0, out.stderr.decode()
    assert text == "ok", (text, out.stderr.decode())


@pytest.mark.timeout(10)
def test_the_unit_lets_workers_lower_their_priority():
    """worker_nice (default 5) is os.nice() in each worker, i.e. setpriority(2), which the
    unit's @resources deny list refused (EPERM: a warning per worker start, workers at the
    parent's priority). systemd reads filter lines in order: after a deny list (~), an
    allow line takes calls off it."""
    unit = open(os.path.join(ROOT, "systemd", "emitterd.service")).read()
    filters = [ln.split("=", 1)[1].split() for ln in unit.splitlines()
               if ln.startswith("SystemCallFilter=")]
    deny = [i for i, f in enumerate(filters) if f[0].startswith("~")]
    assert deny and "@resources" in " ".join(filters[deny[0]]), filters
    allowed_after = {c for f in filters[deny[0] + 1:] if not f[0].startswith("~") for c in f}
    assert "setpriority" in allowed_after, filters


# -- scripts ---------------------------------------------------------------------------------------------

def _analyze_unavailable_reason():
    if shutil.which("systemd-analyze"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return None  # check-units installs it
    return "systemd-analyze is absent and cannot be installed (not root or no apt-get)"


@pytest.mark.timeout(900)
def test_check_units():
    reason = _analyze_unavailable_reason()
    if reason:
        pytest.skip(reason)
    out = subprocess.run([os.path.join(ROOT, "scripts", "check-units"),
                          "--emitterd", os.path.join(os.path.dirname(sys.executable), "emitterd")]
                         if os.path.exists(os.path.join(os.path.dirname(sys.executable), "emitterd"))
                         else [os.path.join(ROOT, "scripts", "check-units")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=880)
    text = out.stdout.decode()
    if out.returncode == 0 and text.startswith("skipped:") and not shutil.which("systemd-analyze"):
        pytest.skip(text.strip())
    assert out.returncode == 0, text
    assert "skipped:" not in text.split("sysusers/tmpfiles:")[0], text
    assert "verify: ok" in text, text
    assert "security: ok" in text or "security: skipped" in text, text


@pytest.mark.timeout(60)
def test_install_systemd_into_prefix(tmp_path):
    exe = tmp_path / "bin" / "emitterd"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    script = os.path.join(ROOT, "scripts", "install-systemd")
    prefix = tmp_path / "root"

    dry = subprocess.run([script, "--dry-run", "--prefix", str(prefix), "--emitterd", str(exe)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert dry.returncode == 0, dry.stderr.decode()
    assert "would run:" in dry.stdout.decode()
    assert "systemctl enable --now emitterd.socket emitterd.service" in dry.stdout.decode()
    assert not prefix.exists()

    real = subprocess.run([script, "--prefix", str(prefix), "--emitterd", str(exe)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert real.returncode == 0, real.stderr.decode()
    unit = (prefix / "etc/systemd/system/emitterd.service").read_text()
    exec_lines = [ln for ln in unit.splitlines() if ln.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=%s run" % exe]
    assert (prefix / "etc/systemd/system/emitterd.socket").read_text() == \
        open(os.path.join(ROOT, "systemd", "emitterd.socket")).read()
    assert (prefix / "etc/sysusers.d/emitterd.conf").is_file()
    assert (prefix / "etc/tmpfiles.d/emitterd.conf").is_file()
    env_file = prefix / "etc/emitterd/emitterd.env"
    assert oct(env_file.stat().st_mode & 0o777) == "0o640"
    env_file.write_text("EMITTERD_LOG_LEVEL=debug\n")
    again = subprocess.run([script, "--prefix", str(prefix), "--emitterd", str(exe)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert again.returncode == 0
    assert env_file.read_text() == "EMITTERD_LOG_LEVEL=debug\n"   # never overwritten
    assert "nothing run" in again.stdout.decode()

    bad = subprocess.run([script, "--prefix", str(prefix), "--emitterd", str(tmp_path / "nope")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert bad.returncode != 0
