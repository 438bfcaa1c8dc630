"""emitterd as a service (DESIGN §1, §6; PROTOCOL §2, §6, §7): sd_notify, socket
activation, shutdown under load, SIGHUP reload, metrics, RSS recycling, log formats
and `emitterctl top` -- each against a real daemon, real sockets and real signals."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from emitterd import procs, settings
from emitterd.client import Client, Unavailable, Unreachable
from service_helpers import (ActivatedDaemon, NotifyReceiver, Subscriber, has_line,
                             proc_fd_links, read_log, wait_log, wait_until, worker_pids)
from daemon_fixture import clean_env


def _sub(name, path=None, **kw):
    spec = {"name": name, "type": "stream", "selector": "$all", "start_from": "origin"}
    if path is not None:
        spec["subscriber"] = "unix:" + path
    spec.update(kw)
    return spec


def _events(n, stream="s-1", start=0):
    return [{"stream": stream, "type": "t", "data": {"i": start + i}} for i in range(n)]


def _wait_workers_ready(c, key, n, timeout=15.0):
    def ready():
        st = c.status(key)
        ws = [w for w in st["workers"] if w["state"] == "ready"]
        return st if len(ws) >= n else None
    return wait_until(ready, timeout, "%d ready workers of %s" % (n, key))


# ---- 1. sd_notify ---------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_notify_ready_status_watchdog_reload_stopping(make_daemon, short_tmp):
    d = make_daemon(start=False)
    nsock = os.path.join(short_tmp, "notify.sock")
    rx = NotifyReceiver(nsock, watch_path=d.socket)
    try:
        d.env.update({"NOTIFY_SOCKET": nsock, "WATCHDOG_USEC": "400000"})
        d.start()
        i_ready, (t_ready, text, sock_existed) = rx.wait_for(lambda t: has_line(t, "READY=1"), 10)
        assert sock_existed, "READY=1 arrived before the control socket file existed"
        # READY=1 means the socket listens: a ping answers.
        with Client(d.socket, timeout=5) as c:
            assert c.ping()["pid"] == d.proc.pid
        assert all(not has_line(m, "READY=1") for m in rx.texts()[:i_ready])

        # WATCHDOG=1 every WATCHDOG_USEC/2 = 0.2 s: at least 3 within 1.5 s.
        time.sleep(1.5)
        dogs = [m for m in rx.messages if m[0] >= t_ready and has_line(m[1], "WATCHDOG=1")
                and m[0] <= t_ready + 1.6]
        assert len(dogs) >= 3, rx.texts()

        # A STATUS= line: with READY and then on its own every 5 s.
        assert any(line.startswith("STATUS=") and len(line) > len("STATUS=")
                   for line in text.split("\n")), text
        rx.wait_for(lambda t: t.startswith("STATUS=") and "READY=1" not in t, 7, after=i_ready + 1)

        # SIGHUP: RELOADING=1 (with MONOTONIC_USEC, as systemd requires) then READY=1.
        n = rx.count()
        d.proc.send_signal(signal.SIGHUP)
        i_rel, (_, rel, _) = rx.wait_for(lambda t: has_line(t, "RELOADING=1"), 5, after=n)
        assert re.search(r"^MONOTONIC_USEC=\d+$", rel, re.M), rel
        rx.wait_for(lambda t: has_line(t, "READY=1"), 5, after=i_rel + 1)
        with Client(d.socket, timeout=5) as c2:
            c2.ping()

        # SIGTERM: STOPPING=1, exit 0.
        n = rx.count()
        d.proc.send_signal(signal.SIGTERM)
        rx.wait_for(lambda t: has_line(t, "STOPPING=1"), 5, after=n)
        assert d.proc.wait(15) == 0
    finally:
        rx.close()


@pytest.mark.timeout(30)
def test_watchdog_pid_of_another_process_sends_no_watchdog(make_daemon, short_tmp):
    nsock = os.path.join(short_tmp, "notify.sock")
    rx = NotifyReceiver(nsock)
    try:
        d = make_daemon(env={"NOTIFY_SOCKET": nsock, "WATCHDOG_USEC": "200000",
                             "WATCHDOG_PID": "1"})
        rx.wait_for(lambda t: has_line(t, "READY=1"), 10)
        time.sleep(0.8)
        assert not any(has_line(t, "WATCHDOG=1") for t in rx.texts()), rx.texts()
    finally:
        rx.close()


# ---- 2. socket activation -------------------------------------------------------------------

@pytest.mark.timeout(45)
def test_socket_activation_fd3_workers_close_it_file_kept(short_tmp):
    path = os.path.join(short_tmp, "act.sock")
    data_dir = os.path.join(short_tmp, "data")
    log_path = os.path.join(short_tmp, "daemon.log")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(16)
    ino_file = os.stat(path).st_ino
    ino_sock = os.fstat(lsock.fileno()).st_ino
    want_link = "socket:[%d]" % ino_sock
    sub_path = os.path.join(short_tmp, "sub.sock")
    sub = Subscriber(sub_path)
    d = ActivatedDaemon(lsock, path, data_dir, log_path, clean_env(short_tmp), short_tmp)
    try:
        ping = d.wait_ping()
        assert ping["pid"] == d.proc.pid
        wait_log(log_path, r"listening .*activated=True", timeout=5)
        # The daemon serves on the inherited socket (no file of its own).
        assert os.stat(path).st_ino == ino_file
        assert want_link in proc_fd_links(d.proc.pid).values()

        with Client(path, timeout=20) as c:
            st = c.start(_sub("act", sub_path, pool_size=2))
            key = st["key"]
            st = _wait_workers_ready(c, key, 2)
            pids = worker_pids(st)
            assert len(pids) == 2
            for pid in pids:
                d.track(pid)
            c.publish(_events(10))
            wait_until(lambda: c.status(key)["checkpoint"] == c.status(key)["head"], 10,
                       "delivery through the activated daemon")
            for pid in pids:
                links = proc_fd_links(pid)
                assert want_link not in links.values(), (
                    "worker %d holds the inherited listening socket: %r" % (pid, links))
                assert not any(data_dir in l for l in links.values()), (
                    "worker %d holds files of the data dir: %r" % (pid, links))
                # stdio, its socketpair, its own selector and consumer connections only
                assert all(fd <= 2 or l.startswith(("socket:", "anon_inode:", "pipe:"))
                           for fd, l in links.items()), links
        d.collect_children()

        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(15) == 0
        # The daemon neither created nor removed the socket file.
        assert os.path.exists(path), "the socket-activated daemon removed the socket file"
        assert os.stat(path).st_ino == ino_file
        log = read_log(log_path)
        assert "Traceback" not in log, log[-3000:]
    finally:
        d.cleanup()
        sub.close()
        lsock.close()


# ---- 3. SIGTERM under load ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_sigterm_under_load_drains_refuses_publish_and_keeps_checkpoint(make_daemon, short_tmp):
    drain = 2.0
    max_in_flight, batch = 100, 10
    d = make_daemon("--drain-timeout", drain)
    sub_path = os.path.join(short_tmp, "slow.sock")
    sub = Subscriber(sub_path, delay=0.005)      # ~50 ms per batch of 10
    sub2 = None
    try:
        c = d.client()
        st = c.start(_sub("slow", sub_path, options={"batch_size": batch,
                                                     "max_in_flight": max_in_flight}))
        key = st["key"]
        total = 2000
        for i in range(4):
            c.publish(_events(500, start=i * 500))
        assert c.ping()["head"] == total
        sub.wait_count(300, 20)

        other = d.client(timeout=10)
        other.ping()
        before = sub.count()
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        wait_log(d.log_path, r"shutting down", timeout=5)
        for what, call in (("publish", lambda: other.publish(_events(1, stream="late"))),
                           ("start", lambda: other.start(_sub("late-pool")))):
            try:
                call()
            except Unavailable:
                pass
            except Unreachable:
                time.sleep(0.5)
                assert d.proc.poll() is not None, (
                    "the connection was closed during the drain instead of answering unavailable")
                break
            else:
                pytest.fail("a %s during the shutdown drain was accepted" % what)

        rc = d.proc.wait(drain + 5)
        elapsed = time.monotonic() - t0
        assert rc == 0
        assert elapsed < drain + 5
        time.sleep(0.2)
        sub.close()
        got = sub.positions()
        # Dispatching stopped: only what was in flight at SIGTERM came after it.
        assert len(got) - before <= max_in_flight + batch, (before, len(got))
        acked_max = max(got)
        assert acked_max < total, "the whole log was delivered before SIGTERM: test too slow"

        # Restart on the same data dir, subscriber down: the persisted checkpoint.
        d.start()
        with Client(d.socket, timeout=20) as c2:
            st = c2.status(key)
            assert st["head"] == total, "the late publish was appended during the drain"
            cp = st["checkpoint"]
            assert 0 < cp <= st["head"]
            # The drain (well under drain_timeout) acked everything in flight.
            assert cp >= acked_max, (cp, acked_max)
            sub2 = Subscriber(sub_path)
            wait_until(lambda: c2.status(key)["checkpoint"] == total, 30,
                       "checkpoint reaching head after the restart")
            after = sub2.positions()
            assert set(range(cp + 1, total + 1)) <= set(after)
            assert min(after) == cp + 1, "delivery did not resume right after the checkpoint"
            assert c2.status(key)["state"] == "running"
    finally:
        sub.close()
        if sub2 is not None:
            sub2.close()


@pytest.mark.timeout(60)
def test_sigterm_drain_timeout_expires_then_second_signal_cuts_drain(make_daemon, short_tmp):
    """A consumer that never acks: the drain gives up after drain_timeout, exit 0, the
    checkpoint of what was acked is kept; a second signal ends a long drain at once."""
    import threading
    d = make_daemon("--drain-timeout", 1)
    sub_path = os.path.join(short_tmp, "stuck.sock")
    release = threading.Event()
    block_after = {"pos": 50}

    def stuck(event):
        if event["position"] > block_after["pos"]:
            release.wait(30)
    sub = Subscriber(sub_path, handler=stuck)
    sub2 = None
    try:
        c = d.client()
        key = c.start(_sub("stuck", sub_path, options={"batch_size": 10}))["key"]
        c.publish(_events(50))
        wait_until(lambda: c.status(key)["checkpoint"] == 50, 15, "checkpoint 50")
        c.publish(_events(50, start=50))
        wait_until(lambda: max(sub.positions()) > 50, 15, "a blocked delivery")
        assert c.status(key)["in_flight"] > 0

        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(1 + 5) == 0
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.9, "exited after %.2fs without waiting for the drain" % elapsed
        wait_log(d.log_path, r"drain timed out", timeout=1)
        release.set()
        sub.close()

        # Restart with a long drain; everything blocks now.
        block_after["pos"] = 0
        release.clear()
        sub2 = Subscriber(sub_path, handler=stuck)
        d.extra_args += ["--drain-timeout", "30"]     # the last flag wins
        d.start()
        c2 = d.client()
        st = c2.status(key)
        assert st["checkpoint"] == 50, st
        wait_until(lambda: sub2.count() > 0, 15, "redelivery after restart")
        assert min(sub2.positions()) == 51
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        wait_log(d.log_path, r"shutting down", count=2, timeout=5)
        time.sleep(0.3)
        assert d.proc.poll() is None, "did not wait for the 30 s drain"
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(5) == 0
        assert time.monotonic() - t0 < 6
        wait_log(d.log_path, r"second stop request", timeout=1)
    finally:
        release.set()
        sub.close()
        if sub2 is not None:
            sub2.close()


@pytest.mark.timeout(45)
def test_ready_only_after_stored_pools_started(make_daemon, short_tmp):
    d = make_daemon()
    with Client(d.socket, timeout=20) as c:
        key = c.start(_sub("stored", pool_size=2))["key"]
        _wait_workers_ready(c, key, 2)
    assert d.stop() == 0
    nsock = os.path.join(short_tmp, "notify.sock")
    box = {}

    def children_at_ready(text):
        if has_line(text, "READY=1") and "pid" in box:
            return [k.pid for k in psutil.Process(box["pid"]).children()]
        return None

    rx = NotifyReceiver(nsock, watch_path=d.socket, probe=children_at_ready)
    try:
        d.env["NOTIFY_SOCKET"] = nsock
        with open(d.log_path, "ab") as log:
            d.proc = subprocess.Popen(d.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, env=d.env, cwd=d.root,
                                      start_new_session=True)
        box["pid"] = d.proc.pid
        d.track(d.proc.pid)
        i, (_, text, existed) = rx.wait_for(lambda t: has_line(t, "READY=1"), 15)
        d.collect_children()
        kids = rx.probes.get(i)
        assert existed
        assert isinstance(kids, list) and len(kids) >= 2, (
            "READY=1 before the stored pool's workers were started: children %r" % (kids,))
        d.wait_ping()
        with Client(d.socket, timeout=20) as c:
            assert c.status(key)["state"] == "running"
        assert re.search(r"^STATUS=.*2 workers", text, re.M), text
    finally:
        rx.close()


# ---- 4. SIGHUP reload -----------------------------------------------------------------------

def _write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.mark.timeout(45)
def test_sighup_reload_applies_reloadable_refuses_invalid(make_daemon, short_tmp):
    cfg = os.path.join(short_tmp, "emitterd.toml")
    _write(cfg, 'log_level = "info"\ndefault_batch_size = 64\nstore_id = "one"\n')
    d = make_daemon("--config", cfg)
    c = d.client()
    assert c.ping()["store_id"] == "one"
    assert c.start(_sub("before"))["subscription"]["options"]["batch_size"] == 64

    _write(cfg, 'log_level = "debug"\ndefault_batch_size = 5\nstore_id = "two"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d.log_path, r"configuration reloaded", timeout=10)
    log = read_log(d.log_path)
    assert re.search(r"setting reloaded setting=log_level old=info new=debug", log), log[-3000:]
    assert re.search(r"setting reloaded setting=default_batch_size old=64 new=5", log), log[-3000:]
    assert re.search(r"WARNING .*needs a restart.* setting=store_id old=one new=two", log), log[-3000:]
    assert not re.search(r"setting reloaded setting=store_id", log)
    assert c.ping()["store_id"] == "one"
    st = c.start(_sub("after"))
    assert st["subscription"]["options"]["batch_size"] == 5
    # an explicit option still wins over the default
    assert c.start(_sub("explicit", options={"batch_size": 9}))["subscription"]["options"][
        "batch_size"] == 9

    bad_files = [
        'log_level = "info"\ndefault_batch_size = 7\nstore_id = "two\n',          # invalid TOML
        'log_level = "info"\ndefault_batch_size = 7\nmax_frame_bytes = "x"\n',    # bad value
    ]
    for i, text in enumerate(bad_files, 1):
        _write(cfg, text)
        d.proc.send_signal(signal.SIGHUP)
        wait_log(d.log_path, r"reload refused", count=i, timeout=10)
        assert d.proc.poll() is None
        assert c.ping()["store_id"] == "one"
        st = c.start(_sub("bad-%d" % i))
        assert st["subscription"]["options"]["batch_size"] == 5, text
        with Client(d.socket, timeout=10) as fresh:
            fresh.ping()
    log = read_log(d.log_path)
    assert not re.search(r"setting reloaded setting=(default_batch_size old=5|log_level old=debug)",
                         log), log[-3000:]
    # still at debug level: the refused files' log_level = "info" was not applied
    assert len(wait_log(d.log_path, r"configuration reloaded")) == 1


@pytest.mark.timeout(45)
def test_reload_shows_values_as_written_and_warns_of_a_recycling_loop(make_daemon, short_tmp):
    """The reload log shows socket_mode as the octal string it is written as (not 432), and
    a max_worker_rss below a fresh worker's size is a warning, at start and at reload."""
    cfg = os.path.join(short_tmp, "emitterd.toml")
    _write(cfg, 'socket_mode = "0660"\n')
    d = make_daemon("--config", cfg)
    _write(cfg, 'socket_mode = "0600"\nmax_worker_rss = 1000\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d.log_path, r"configuration reloaded", timeout=10)
    log = read_log(d.log_path)
    assert re.search(r"needs a restart.* setting=socket_mode old=0660 new=0600", log), log[-3000:]
    assert re.search(r"WARNING .*max_worker_rss 1000 is below 32 MiB: a fresh worker takes about 13 MiB", log), \
        log[-3000:]


# ---- 5. metrics -----------------------------------------------------------------------------

def _families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


@pytest.mark.timeout(30)
def test_a_metrics_address_in_use_is_one_line_not_a_traceback(make_daemon):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        listen = "127.0.0.1:%d" % taken.getsockname()[1]
        d = make_daemon("--metrics-listen", listen, start=False)
        r = d.run_refused()
    finally:
        taken.close()
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "cannot start" in out and "cannot listen for metrics on %s" % listen in out, out
    assert "Traceback" not in out, out
    assert not os.path.exists(d.socket), out     # the control socket went with it


def _with_fd_limit(d, n, hard=None):
    """Run d's `emitterd run` under an open-files limit of n (soft; hard the same unless
    given, so that the daemon cannot raise it)."""
    argv = d.argv()
    code = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d)); "
            "os.execv(sys.executable, [sys.executable] + sys.argv[1:])" % (n, hard or n))
    d.argv = lambda: [argv[0], "-c", code] + argv[1:]


@pytest.mark.timeout(30)
def test_the_soft_open_files_limit_is_raised_to_the_hard_one(make_daemon):
    d = make_daemon(start=False)
    _with_fd_limit(d, 512, hard=4096)
    d.start()
    assert psutil.Process(d.proc.pid).rlimit(psutil.RLIMIT_NOFILE) == (4096, 4096)
    assert "open-files limit" not in read_log(d.log_path)      # 4096 >= 1024 + 256


def _exhaust_fds_with_control_connections(d, most=300):
    """Open control connections until the daemon stops taking them (it is out of file
    descriptors and its backlog stays full for a second); the caller closes them."""
    held = []
    refused_since = None
    while len(held) < most:
        so = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        so.setblocking(False)
        try:
            so.connect(d.socket)
        except BlockingIOError:                   # the backlog is full for now
            so.close()
            refused_since = refused_since or time.monotonic()
            if time.monotonic() - refused_since > 1.0:
                break
            time.sleep(0.01)
            continue
        refused_since = None
        held.append(so)
    return held


@pytest.mark.timeout(60)
def test_a_worker_that_cannot_be_respawned_for_now_is_tried_again(make_daemon):
    """A worker dies while the daemon has no file descriptor to spare: the respawn fails;
    it used to leave the slot empty for good (an unhandled error), now it is retried,
    backing off, until the descriptors are back."""
    d = make_daemon(start=False)
    _with_fd_limit(d, 160)
    d.start()
    c = d.client()
    key = c.start(_sub("respawned"))["key"]
    wait_until(lambda: [w["state"] for w in c.status(key)["workers"]] == ["ready"], 15,
               "one ready worker")
    (old,) = [w["pid"] for w in c.status(key)["workers"]]
    c.close()
    held = _exhaust_fds_with_control_connections(d)
    try:
        assert len(held) > 100, len(held)
        os.kill(old, signal.SIGKILL)
        wait_log(d.log_path, "could not start a worker, trying again", timeout=10)
    finally:
        for so in held:
            so.close()
    c = Client(d.socket, timeout=5)
    try:
        wait_until(lambda: [(w["state"], w["pid"] != old) for w in c.status(key)["workers"]]
                   == [("ready", True)], 20, "a new worker in the slot")
        assert c.status(key)["state"] == "running"
    finally:
        c.close()
    assert "Traceback" not in read_log(d.log_path)


@pytest.mark.timeout(60)
def test_connection_floods_cannot_take_the_daemons_file_descriptors(make_daemon):
    """The metrics port takes anyone on the machine: idle connections there stay bounded.
    Control connections past the open-files limit make accept() pause (a few warnings),
    where it used to fail in a tight loop; the daemon serves again once they go."""
    d = make_daemon("--metrics-listen", "127.0.0.1:0", start=False)
    _with_fd_limit(d, 160)
    d.start()
    line = wait_log(d.log_path, r"metrics exporter listening address=127\.0\.0\.1:\d+", timeout=5)[0]
    port = int(re.search(r"address=127\.0\.0\.1:(\d+)", line).group(1))
    assert "the open-files limit is low for max_connections" in read_log(d.log_path)
    daemon_proc = psutil.Process(d.proc.pid)
    base = daemon_proc.num_fds()
    held = []
    try:
        for _ in range(300):                      # twice the daemon's whole limit
            so = socket.socket()
            so.settimeout(2)
            so.connect(("127.0.0.1", port))
            held.append(so)
        time.sleep(0.5)
        assert daemon_proc.num_fds() <= base + 16, (base, daemon_proc.num_fds())
        assert d.client().ping()["pid"] == d.proc.pid
    finally:
        for so in held:
            so.close()
    held = _exhaust_fds_with_control_connections(d)
    try:
        assert len(held) > 160, len(held)         # more than the daemon's whole limit
        wait_log(d.log_path, "out of file descriptors: not accepting control connections",
                 timeout=10)
        time.sleep(1.0)
    finally:
        for so in held:
            so.close()
    wait_until(lambda: Client(d.socket, timeout=2).ping()["pid"] == d.proc.pid, 15,
               "ping answered again")
    log_text = read_log(d.log_path)
    assert log_text.count("out of file descriptors") < 20, log_text[-2000:]
    assert "accept failed" not in log_text and "Traceback" not in log_text, log_text[-2000:]
    assert d.proc.poll() is None


@pytest.mark.timeout(45)
def test_metrics_op_and_http_exporter(make_daemon, short_tmp):
    d = make_daemon("--metrics-listen", "127.0.0.1:0")
    line = wait_log(d.log_path, r"metrics exporter listening address=127\.0\.0\.1:\d+", timeout=5)[0]
    port = int(re.search(r"address=127\.0\.0\.1:(\d+)", line).group(1))
    assert port > 0
    sub_path = os.path.join(short_tmp, "m.sock")
    sub = Subscriber(sub_path)
    try:
        c = d.client()
        key = c.start(_sub("metered", sub_path))["key"]
        c.publish(_events(20))
        wait_until(lambda: c.status(key)["delivered"] >= 20, 15, "20 delivered")
        wait_until(lambda: all(w["rss"] > 0 for w in c.status(key)["workers"]), 5, "rss sampled")

        fams = _families(c.metrics()["text"])
        assert fams["emitterd_log_head"].samples[0].value == 20
        delivered = [s for s in fams["emitterd_pool_delivered"].samples
                     if s.name == "emitterd_pool_delivered_total"]
        assert [s.labels.get("key") for s in delivered] == [key]
        assert delivered[0].value == 20
        rss = fams["emitterd_worker_rss_bytes"].samples
        assert rss and all(s.labels.get("key") == key and s.value > 0 for s in rss)
        # an operator alerts on a worker with nobody to deliver to
        consumers = fams["emitterd_worker_consumers"].samples
        assert [(s.labels, s.value) for s in consumers] == [({"key": key, "index": "0"}, 1)]

        # A slow HTTP client holding an unfinished request must not block the daemon.
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        slow.sendall(b"GET /metrics HTTP/1.0\r\n")
        try:
            t = time.monotonic()
            other = d.client(timeout=5)
            other.ping()
            other.publish(_events(1, stream="x"))
            assert time.monotonic() - t < 2.0

            h = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            h.request("GET", "/metrics")
            r = h.getresponse()
            body = r.read().decode()
            assert r.status == 200
            assert r.getheader("Content-Type", "").startswith("text/plain")
            h.close()
            hf = _families(body)
            for name in ("emitterd_log_head", "emitterd_pool_delivered", "emitterd_worker_rss_bytes"):
                assert name in hf, name
            assert set(hf) == set(_families(c.metrics()["text"]))

            h = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            h.request("GET", "/nope")
            r = h.getresponse()
            r.read()
            assert r.status == 404
            h.close()
        finally:
            slow.close()
        assert c.ping()["head"] == 21
        sub.close()

        def consumers_now() -> list:
            fams = _families(c.metrics()["text"])
            return [s.value for s in fams["emitterd_worker_consumers"].samples]
        wait_until(lambda: consumers_now() == [0], 10, "the closed subscriber counted as gone")

        # max_connections counts attached consumers beside control connections: a gauge
        # of its own (a unix: subscriber's connection is not one)
        def attached_now() -> float:
            fams = _families(c.metrics()["text"])
            return fams["emitterd_attached_consumers"].samples[0].value
        assert attached_now() == 0
        other = c.start({"name": "attached", "type": "stream", "selector": "att"})["key"]
        with c.attach(other):
            wait_until(lambda: attached_now() == 1, 10, "the attached consumer counted")
        wait_until(lambda: attached_now() == 0, 10, "the consumer gone")
        assert d.proc.poll() is None
    finally:
        sub.close()


# ---- 6. recycling by RSS --------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_recycling_by_rss_is_planned_and_loses_nothing(make_daemon, short_tmp):
    d = make_daemon("--max-worker-rss", 1)
    sub_path = os.path.join(short_tmp, "r.sock")
    sub = Subscriber(sub_path)
    try:
        c = d.client()
        key = c.start(_sub("recycled", sub_path, pool_size=1))["key"]
        pids = set()
        positions = []
        t_end = time.monotonic() + 3.0
        i = 0
        while time.monotonic() < t_end:
            positions += c.publish(_events(5, stream="s-%d" % (i % 3), start=i))["positions"]
            i += 5
            st = c.status(key)
            pids.update(worker_pids(st))
            for p in worker_pids(st):
                d.track(p)
            time.sleep(0.05)
        head = c.ping()["head"]
        assert head == len(positions)
        wait_until(lambda: c.status(key)["checkpoint"] == head, 20, "checkpoint reaching head")
        st = c.status(key)
        pids.update(worker_pids(st))
        assert len(pids) >= 2, "worker never recycled: pids %r" % pids
        assert st["restarts"] == 0, st
        assert all(w["restarts"] == 0 for w in st["workers"]), st
        assert st["state"] == "running"
        assert set(positions) <= set(sub.positions())
        wait_log(d.log_path, r"recycling worker", timeout=1)
        assert "Traceback" not in read_log(d.log_path)
    finally:
        sub.close()


# ---- 7. logs --------------------------------------------------------------------------------

_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


@pytest.mark.timeout(60)
def test_client_strings_reach_the_log_escaped(daemon):
    """A subscription name or a nack reason is the client's text: a NUL ends a journald
    record (a forged entry after it), CR and ESC rewrite a terminal line, TAB splits a
    key=value field. None reaches a log line raw."""
    c = daemon.client(timeout=10)
    evil = "n\x00<3>emitterd.control:\tFORGED\r\x1b[2K\u2028"
    key = c.start({"name": evil, "type": "stream", "selector": "inj",
                   "options": {"max_retries": 0}})["key"]
    c.publish([{"stream": "inj", "type": "t"}])
    with Client(daemon.socket, timeout=10).attach(key) as consumer:
        consumer.nack([e["position"] for e in consumer.recv(10)["events"]], "park",
                      reason="r" + evil)
        wait_until(lambda: c.parked(key)["events"], 10, "the event parked")
    wait_until(lambda: "events parked" in read_log(daemon.log_path), 10, "the park logged")
    with open(daemon.log_path, "rb") as f:
        lines = [ln for ln in f.read().split(b"\n")
                 if b"pool started" in ln or b"events parked" in ln]
    assert len(lines) == 2, lines
    for ln in lines:
        assert not re.search(rb"[\x00-\x1f\x7f]|\xe2\x80\xa8", ln), ln
        assert b'n\\x00<3>emitterd.control:\\tFORGED\\r\\x1b[2K\\u2028"' in ln, ln


@pytest.mark.timeout(45)
def test_log_formats_json_and_journald(make_daemon, short_tmp):
    # json, with a JOURNAL_STREAM that names another file: plain JSON lines
    cfg = os.path.join(short_tmp, "j.toml")
    _write(cfg, 'store_id = "one"\n')
    dj = make_daemon("--log-format", "json", "--config", cfg, env={"JOURNAL_STREAM": "1:1"})
    cj = dj.client()
    cj.start(_sub("json-pool", pool_size=1))
    _write(cfg, 'store_id = "two"\n')
    dj.proc.send_signal(signal.SIGHUP)
    wait_log(dj.log_path, r"configuration reloaded", timeout=10)
    lines = [ln for ln in read_log(dj.log_path).splitlines() if ln.strip()]
    assert len(lines) >= 3
    levels = set()
    for ln in lines:
        obj = json.loads(ln)          # every line is one JSON object
        assert isinstance(obj, dict), ln
        assert isinstance(obj.get("level"), str) and isinstance(obj.get("msg"), str), ln
        levels.add(obj["level"])
    assert {"info", "warning"} <= levels, levels

    # text under journald: JOURNAL_STREAM = dev:ino of the file that is its stderr
    cfg2 = os.path.join(short_tmp, "t.toml")
    _write(cfg2, 'store_id = "one"\n')
    dt = make_daemon("--config", cfg2, start=False)
    open(dt.log_path, "ab").close()
    st = os.stat(dt.log_path)
    dt.env["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
    dt.start()
    dt.client().start(_sub("journal-pool", pool_size=1))
    _write(cfg2, 'store_id = "two"\nlog_format = "json"\n')
    dt.proc.send_signal(signal.SIGHUP)
    wait_log(dt.log_path, r"configuration reloaded", timeout=10)
    lines = [ln for ln in read_log(dt.log_path).splitlines() if ln.strip()]
    assert lines
    prefixes = set()
    for ln in lines:
        m = re.match(r"<([0-7])>", ln)
        assert m, "line without a syslog priority prefix: %r" % ln
        prefixes.add(m.group(1))
        if not ln[3:].startswith("{"):     # text lines (json keeps its "ts" field)
            assert not _TS.search(ln[:40]), "timestamp under journald: %r" % ln
    assert {"6", "4"} <= prefixes, prefixes
    assert any(ln.startswith("<4>") and "needs a restart" in ln for ln in lines)
    assert any(ln.startswith("<6>") and "emitterd ready" in ln for ln in lines)
    # log_format reloaded to json: from then on "<6>{json}" lines
    last = json.loads(lines[-1][3:])
    assert lines[-1].startswith("<6>") and last["msg"] == "configuration reloaded", lines[-1]


@pytest.mark.timeout(30)
def test_text_log_times_carry_their_utc_offset(make_daemon):
    """Text log lines are in local time, so they say which: +03:00, or Z for UTC (the json
    format's "ts" is always UTC)."""
    for tz, offset in (("XYZ-3", "+03:00"), ("UTC", "Z")):
        d = make_daemon(env={"TZ": tz})
        line = [ln for ln in read_log(d.log_path).splitlines() if "emitterd ready" in ln][0]
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}%s INFO " % re.escape(offset),
                        line), (tz, line)
        d.stop()


# ---- 8. emitterctl top ----------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_emitterctl_top_once_and_json(make_daemon):
    d = make_daemon()
    c = d.client()
    key = c.start(_sub("topped", pool_size=2))["key"]
    st = _wait_workers_ready(c, key, 2)
    pids = worker_pids(st)
    for p in pids:
        d.track(p)

    rc, out, err = d.ctl("top", "--once")
    assert rc == 0, err
    assert key in out, out
    for p in pids:
        assert re.search(r"\b%d\b" % p, out), (p, out)

    rc, out, err = d.ctl("--json", "top", "--once")
    assert rc == 0, err
    frame = json.loads(out)
    pools = {p["key"]: p for p in frame["pools"]}
    assert key in pools
    assert sorted(w["pid"] for w in pools[key]["worker_rows"]) == sorted(pids)
    assert frame["daemon"]["pid"] == d.proc.pid


@pytest.mark.timeout(60)
def test_metrics_keep_one_series_per_worker_and_restarts_never_go_back(make_daemon):
    """A retiring (draining) worker and the new worker of its index after a shrink and a
    grow gave two samples with one label set, which Prometheus rejects; and a stop and start
    set emitterd_pool_restarts_total back to 0 (status' restarts is "since the pool started",
    a counter is not)."""
    d = make_daemon()
    c = d.client()
    key = c.start({"name": "churn", "type": "stream", "selector": "$all", "pool_size": 2,
                   "options": {"strategy": "round_robin"}})["key"]
    wait_until(lambda: [w["state"] for w in c.status(key)["workers"]] == ["ready"] * 2, 15,
               "two ready workers")
    holders = [d.client().attach(key) for _ in range(2)]
    try:
        c.publish(_events(4))
        held = [next(h.batches(timeout=10)) for h in holders]     # never acked: #1 drains
        assert sum(map(len, held)) == 4
        c.update(key, pool_size=1)
        c.update(key, pool_size=2)
        wait_until(lambda: sorted((w["index"], w["state"]) for w in c.status(key)["workers"])
                   == [(0, "ready"), (1, "draining"), (1, "ready")], 15, "old and new #1")
        for fam in _families(c.metrics()["text"]).values():
            label_sets = [tuple(sorted(s.labels.items())) + (s.name,) for s in fam.samples]
            assert len(label_sets) == len(set(label_sets)), (fam.name, label_sets)
    finally:
        for h in holders:
            h.close()
    pid = c.status(key)["workers"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: c.status(key)["restarts"] == 1, 15, "the restart counted")
    c.stop(key)
    c.start({"name": "churn", "type": "stream", "selector": "$all", "pool_size": 2})
    assert c.status(key)["restarts"] == 0
    (restarts,) = [s.value for s in _families(c.metrics()["text"])[
        "emitterd_pool_restarts"].samples if s.name == "emitterd_pool_restarts_total"]
    assert restarts == 1


@pytest.mark.timeout(45)
def test_a_log_format_reload_reaches_every_process(make_daemon, short_tmp):
    """log_format / log_level are reloadable: the workers (and the helpers, which take them
    when they start) must change too, or a JSON log pipeline gets text lines from them."""
    cfg = os.path.join(short_tmp, "emitterd.toml")
    _write(cfg, 'log_format = "text"\n')
    d = make_daemon("--config", cfg)
    c = d.client()
    key = c.start(_sub("logged", os.path.join(short_tmp, "nobody-1.sock")))["key"]
    wait_until(lambda: "subscriber not reachable" in read_log(d.log_path), 10, "a worker line")

    def helpers():
        kids = psutil.Process(d.proc.pid).children()
        named = {p.pid: procs.service_name(p.cmdline()) for p in kids}
        return {pid: n for pid, n in named.items() if n in ("checkpointer", "forkserver")}
    before = wait_until(lambda: len(helpers()) == 2 and helpers(), 10, "both helpers")
    mark = len(read_log(d.log_path))
    _write(cfg, 'log_format = "json"\n')
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in read_log(d.log_path)[mark:], 10, "the reload")
    # the worker logs again: its new subscriber cannot be reached either
    c.update(key, subscriber="unix:" + os.path.join(short_tmp, "nobody-2.sock"))
    wait_until(lambda: "nobody-2.sock" in read_log(d.log_path)[mark:], 10, "the worker's line")
    wait_until(lambda: len(helpers()) == 2 and not set(helpers()) & set(before), 10,
               "the helpers replaced")
    lines = [ln for ln in read_log(d.log_path)[mark:].splitlines() if ln.strip()]
    records = [json.loads(ln) for ln in lines]          # every line JSON, the workers' too
    assert any(r.get("logger") == "emitterd.worker" for r in records), lines
    assert not any("died" in r.get("msg", "") or "exited" in r.get("msg", "")
                   for r in records), lines
    c.ping()


@pytest.mark.timeout(30)
def test_reload_refusal_names_the_restart_only_setting_not_the_file(make_daemon, short_tmp):
    """A reload whose only conflict is with a restart-only setting's *running* value.
    
    The file is valid on its own (`emitterd config --config FILE` accepts it, a restart applies
    it): heartbeat_interval 5 -> 1 (restart-only) and worker_timeout 12 -> 3. The reload keeps
    heartbeat_interval at its running 5.0, so worker_timeout 3 cannot go with it and the whole
    reload is refused -- fine -- but the daemon says the configuration "is invalid" and blames
    "config file ...: heartbeat_interval" for a value 5.0 the file does not hold (it says 1.0).
    Nothing says that heartbeat_interval needs a restart, which is the operator's way out."""
    cfg = os.path.join(short_tmp, "emitterd.toml")
    _write(cfg, "heartbeat_interval = 5.0\nworker_timeout = 12.0\n")
    d = make_daemon("--config", cfg)
    new = 'heartbeat_interval = 1.0\nworker_timeout = 3.0\nlog_level = "debug"\n'
    _write(cfg, new)
    settings.load(cfg, {}, {})          # the file itself is valid (no ConfigError)
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d.log_path, r"configuration reloaded|reload refused", timeout=10)
    log = read_log(d.log_path)
    line = [ln for ln in log.splitlines() if "reload" in ln and "daemon" in ln][-1]
    # the file says heartbeat_interval = 1.0: a line that attributes 5.0 to the file misleads
    assert not re.search(r"heartbeat_interval = 5\.0 \(config file", line), line
    # the operator must learn that heartbeat_interval only changes with a restart
    assert re.search(r"heartbeat_interval.*restart|restart.*heartbeat_interval", log), line


@pytest.mark.timeout(30)
def test_an_invalid_value_under_an_override_still_refuses_the_reload(make_daemon, short_tmp):
    """README: "an invalid file changes nothing". A bad value for a key that a flag or the
    environment overrides is never parsed: the reload is not refused, the file's other changes
    are applied, and the only line about that key says the file "sets" it (as if valid). The
    same file makes `emitterd run --config FILE` exit 2 once the override is gone."""
    cfg = os.path.join(short_tmp, "emitterd.toml")
    _write(cfg, "default_batch_size = 64\n")
    d = make_daemon("--config", cfg, env={"EMITTERD_LOG_LEVEL": "info"})
    c = d.client()
    _write(cfg, 'log_level = "verbose"\ndefault_batch_size = 5\n')   # "verbose": no level
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d.log_path, r"configuration reloaded|reload refused", timeout=10)
    log = read_log(d.log_path)
    st = c.start({"name": "n", "type": "stream", "selector": "$all"})
    assert st["subscription"]["options"]["batch_size"] == 64, "the invalid file was applied"
    assert re.search(r"reload refused.*log_level", log), log[-2000:]


@pytest.mark.timeout(30)
def test_a_reload_without_config_file_says_so(make_daemon):
    """A SIGHUP to a daemon that reads no config file (no --config, no EMITTERD_CONFIG: the
    installed unit until emitterd.env names one) logs "configuration reloaded changed=0": an
    operator who edited /etc/emitterd/emitterd.toml and ran `systemctl reload` is told it was
    reloaded. Nothing says that there is no file to re-read (nor which file was)."""
    d = make_daemon()
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d.log_path, r"configuration reloaded|reload refused", timeout=10)
    log = read_log(d.log_path)
    tail = log[log.index("emitterd ready"):]
    assert re.search(r"no config(uration)? file", tail), tail
