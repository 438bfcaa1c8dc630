"""Helpers for tests/test_service.py: an sd_notify receiver, a threaded unix
subscriber, a socket-activated daemon launcher and log polling."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil

from emitterd.client import Client, serve_subscriber
from waits import wait_until  # noqa: E402


# ---- sd_notify ------------------------------------------------------------------------------

class NotifyReceiver:
    """A datagram socket bound at `path`, read by a thread.

    Each datagram is recorded as (monotonic time, text, socket_file_existed) where
    socket_file_existed tells whether `watch_path` existed when it arrived.
    """

    def __init__(self, path: str, watch_path: Optional[str] = None,
                 probe: Optional[Callable[[str], Any]] = None) -> None:
        self.path = path
        self.watch_path = watch_path
        self.probe = probe
        self.probes: Dict[int, Any] = {}      # message index -> probe(text) at its arrival
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.1)
        self.messages: List[Tuple[float, str, bool]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            exists = bool(self.watch_path) and os.path.exists(self.watch_path)
            text = data.decode("utf-8", "replace")
            extra = None
            if self.probe is not None:
                try:
                    extra = self.probe(text)
                except Exception as e:  # noqa: BLE001
                    extra = e
            with self._cond:
                self.probes[len(self.messages)] = extra
                self.messages.append((time.monotonic(), text, exists))
                self._cond.notify_all()

    def texts(self) -> List[str]:
        with self._cond:
            return [m[1] for m in self.messages]

    def wait_for(self, pred: Callable[[str], bool], timeout: float, after: int = 0
                 ) -> Tuple[int, Tuple[float, str, bool]]:
        """The first message (index, record) at index >= `after` for which pred(text)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for i in range(after, len(self.messages)):
                    if pred(self.messages[i][1]):
                        return i, self.messages[i]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("no matching sd_notify message within %.1fs; got %r"
                                         % (timeout, [m[1] for m in self.messages]))
                self._cond.wait(left)

    def count(self) -> int:
        with self._cond:
            return len(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def has_line(text: str, line: str) -> bool:
    return line in text.split("\n")


# ---- a unix subscriber in a thread ----------------------------------------------------------

class Subscriber:
    """serve_subscriber() on `path` in a thread; records every delivered event."""

    def __init__(self, path: str, delay: float = 0.0,
                 handler: Optional[Callable[[dict], Any]] = None) -> None:
        self.path = path
        self.delay = delay
        self.events: List[dict] = []
        self.hellos: List[dict] = []
        self._lock = threading.Lock()
        self._extra = handler
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: List[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise AssertionError("subscriber did not start: %r" % (self._error,))

    def _handle(self, event: dict) -> Any:
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.events.append(event)
        return self._extra(event) if self._extra else None

    def _run(self) -> None:
        try:
            serve_subscriber(self.path, self._handle, stop=self._stop, ready=self._ready,
                             on_hello=self.hellos.append)
        except BaseException as e:  # noqa: BLE001
            self._error.append(e)
            self._ready.set()

    def positions(self) -> List[int]:
        with self._lock:
            return [e["position"] for e in self.events]

    def count(self) -> int:
        with self._lock:
            return len(self.events)

    def wait_count(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise AssertionError("subscriber got %d events, wanted %d" % (self.count(), n))
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


# ---- logs ---------------------------------------------------------------------------------

def read_log(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def wait_log(path: str, pattern: str, count: int = 1, timeout: float = 10.0) -> List[str]:
    """Wait until at least `count` lines of the log at `path` match the regex `pattern`."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for ln in read_log(path).splitlines() if rx.search(ln)]
        if len(lines) >= count:
            return lines
        if time.monotonic() > deadline:
            raise AssertionError("log %s: %d lines match %r within %.1fs, wanted %d\n%s"
                                 % (path, len(lines), pattern, timeout, count,
                                    "\n".join(read_log(path).splitlines()[-40:])))
        time.sleep(0.05)


# ---- a socket-activated daemon --------------------------------------------------------------

class ActivatedDaemon:
    """`emitterd run` started like systemd does for a .socket unit: the socket `lsock` (or
    each of a list of them) on fd 3 (4, ...), LISTEN_FDS=<their count> (unless `listen_fds`
    says otherwise), LISTEN_FDNAMES=`names` if given, LISTEN_PID=<the daemon's pid>.

    Runs through /bin/sh so that LISTEN_PID is the pid that execs emitterd (after `prefix`,
    a wrapper such as strace, if any).
    """

    def __init__(self, lsock: Any, socket_path: str, data_dir: str, log_path: str,
                 env: Dict[str, str], cwd: str, extra_args: Sequence[str] = (),
                 listen_fds: Optional[str] = None, names: Optional[str] = None,
                 prefix: Sequence[str] = ()) -> None:
        self.socket = socket_path
        self.log_path = log_path
        fds = [s.fileno() for s in (lsock if isinstance(lsock, (list, tuple)) else [lsock])]

        def place() -> None:      # in the child, before exec: fds[i] -> 3 + i, inheritable
            dups = [os.dup(f) for f in fds]
            for i, f in enumerate(dups):
                os.dup2(f, 3 + i, inheritable=True)
                os.close(f)

        script = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
        argv = ["/bin/sh", "-c", script, "sh"] + list(prefix) + [
            sys.executable, "-m", "emitterd", "run", "--socket", socket_path,
            "--data-dir", data_dir] + list(extra_args)
        env = dict(env)
        env["LISTEN_FDS"] = str(len(fds)) if listen_fds is None else listen_fds
        env.pop("LISTEN_FDNAMES", None)
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        # close_fds=False: fds 3... are made in preexec_fn (Python's own are non-inheritable)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                         close_fds=False, preexec_fn=place,
                                         start_new_session=True)
        self._tracked: Dict[int, psutil.Process] = {}
        self.track(self.proc.pid)

    def track(self, pid: int) -> None:
        try:
            self._tracked.setdefault(pid, psutil.Process(pid))
        except psutil.Error:
            pass

    def collect_children(self) -> List[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        for k in kids:
            self._tracked.setdefault(k.pid, k)
        return kids

    def wait_ping(self, timeout: float = 20.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("activated emitterd exited with %s\n%s"
                                     % (self.proc.returncode, read_log(self.log_path)[-4000:]))
            try:
                with Client(self.socket, timeout=2.0) as c:
                    return c.ping()
            except Exception as e:  # noqa: BLE001
                last = e
            time.sleep(0.05)
        raise AssertionError("activated emitterd did not answer ping (%r)\n%s"
                             % (last, read_log(self.log_path)[-4000:]))

    def cleanup(self) -> None:
        self.collect_children()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            alive = [p for p in self._tracked.values() if _alive(p)]
            if not alive:
                break
            time.sleep(0.05)
        for p in self._tracked.values():
            if _alive(p):
                try:
                    p.kill()
                except psutil.Error:
                    pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def proc_fd_links(pid: int) -> Dict[int, str]:
    """fd number -> readlink of /proc/PID/fd/N."""
    out: Dict[int, str] = {}
    base = "/proc/%d/fd" % pid
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(os.path.join(base, name))
        except OSError:
            pass
    return out


def worker_pids(status: Dict[str, Any]) -> List[int]:
    return [w["pid"] for w in status.get("workers") or []]


def sh_quote(args: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)
