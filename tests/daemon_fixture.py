"""A real `emitterd run` for tests: the Daemon helper and its pytest fixtures.

* ``make_daemon(*extra_args, env=None)`` starts one more daemon for the
  test (any number; each in its own directory) and returns its Daemon;
* ``daemon`` is one started daemon;
* ``short_tmp`` is a fresh directory under /tmp (short socket paths).

Each daemon runs ``python -m emitterd run --socket S --data-dir D`` in a
fresh ``/tmp/emd-*`` directory with a clean environment (no inherited
EMITTERD_*, NOTIFY_SOCKET, LISTEN_*, WATCHDOG_*; XDG_* dirs inside the
directory), its output in ``daemon.log`` there. Teardown always runs:
SIGTERM, up to 10 s, SIGKILL; then SIGKILL by pid (psutil, identity-checked)
of every child process it was seen to have; then the directory is removed.
When a test fails, the tail of each of its daemons' logs is printed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import psutil
import pytest

from emitterd import procs
from emitterd.client import Client

_ENV_DROP_PREFIXES = ("EMITTERD_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_")


def clean_env(root: str, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The caller's environment minus emitterd/systemd variables, XDG dirs under root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
    for sub in ("run", "state", "config", "cache"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    env.update({
        "XDG_RUNTIME_DIR": os.path.join(root, "run"),
        "XDG_STATE_HOME": os.path.join(root, "state"),
        "XDG_CONFIG_HOME": os.path.join(root, "config"),
        "XDG_CACHE_HOME": os.path.join(root, "cache"),
        "PYTHONUNBUFFERED": "1",
    })
    if extra:
        env.update(extra)
    return env


def ctl_argv() -> List[str]:
    """How to run emitterctl: the installed script next to sys.executable, else -m."""
    script = shutil.which("emitterctl", path=os.path.dirname(sys.executable))
    if script:
        return [script]
    return [sys.executable, "-m", "emitterd.cli.ctl"]


def run_ctl(args: Sequence[Any], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
            timeout: float = 60, input: Optional[str] = None) -> Tuple[int, str, str]:
    """Run emitterctl with `args`; (returncode, stdout, stderr)."""
    r = subprocess.run(ctl_argv() + [str(a) for a in args], capture_output=True, text=True,
                       env=env, cwd=cwd, timeout=timeout, input=input,
                       stdin=None if input is not None else subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr


class Daemon:
    """One `emitterd run` owned by a test: .root .socket .data_dir .env .proc
    .client() .ctl(*args) .ctl_json(*args) .track(pid) .collect_children() .cleanup()"""

    def __init__(self, extra_args: Sequence[str] = (), env: Optional[Dict[str, str]] = None) -> None:
        self.root = tempfile.mkdtemp(prefix="emd-", dir="/tmp")
        self.socket = os.path.join(self.root, "ctl.sock")
        self.data_dir = os.path.join(self.root, "data")
        self.log_path = os.path.join(self.root, "daemon.log")
        self.extra_args = [str(a) for a in extra_args]
        self.env = clean_env(self.root, env)
        self.proc: Optional[subprocess.Popen] = None
        self._clients: List[Client] = []
        self._tracked: Dict[int, psutil.Process] = {}

    def argv(self) -> List[str]:
        return [sys.executable, "-m", "emitterd", "run", "--socket", self.socket,
                "--data-dir", self.data_dir] + self.extra_args

    def start(self, timeout: float = 20.0) -> "Daemon":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                         start_new_session=True)
        self.track(self.proc.pid)
        self.wait_ping(timeout)
        self.collect_children()
        return self

    def run_refused(self, timeout: float = 15.0) -> subprocess.CompletedProcess:
        """Run `emitterd run` in the foreground, expecting it to refuse to start."""
        return subprocess.run(self.argv(), env=self.env, cwd=self.root,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def wait_ping(self, timeout: float = 20.0) -> Dict[str, Any]:
        """Poll ping until it answers; AssertionError (with the log) otherwise."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last: Optional[BaseException] = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("emitterd exited with %s before answering ping\n%s"
                                     % (self.proc.returncode, self.log_tail()))
            try:
                with Client(self.socket, timeout=2.0) as c:
                    return c.ping()
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            time.sleep(0.05)
        raise AssertionError("emitterd did not answer ping within %.0fs (last error %r)\n%s"
                             % (timeout, last, self.log_tail()))

    # -- clients and emitterctl
    def client(self, timeout: float = 30.0) -> Client:
        """A Client on this daemon, closed at teardown."""
        c = Client(self.socket, timeout=timeout)
        self._clients.append(c)
        return c

    def ctl(self, *args: Any, timeout: float = 60, input: Optional[str] = None) -> Tuple[int, str, str]:
        """Run `emitterctl --socket S *args` in this daemon's environment."""
        self.collect_children()
        return run_ctl(["--socket", self.socket] + list(args), env=self.env, cwd=self.root,
                       timeout=timeout, input=input)

    def ctl_json(self, *args: Any, timeout: float = 60) -> Any:
        """Run `emitterctl --socket S --json *args`; assert exit 0; return the parsed document."""
        rc, out, err = self.ctl("--json", *args, timeout=timeout)
        assert rc == 0, "emitterctl %s: rc=%s\nstdout=%s\nstderr=%s" % (list(args), rc, out, err)
        try:
            return json.loads(out)
        except ValueError as e:
            raise AssertionError("emitterctl %s: stdout is not one JSON document (%s): %r"
                                 % (list(args), e, out)) from None

    def ctl_popen(self, *args: Any, **kw: Any) -> subprocess.Popen:
        """Start `emitterctl --socket S *args` (text mode pipes; stdin /dev/null unless `kw`
        says otherwise); the caller ends it."""
        opts: Dict[str, Any] = dict(stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=self.env, cwd=self.root)
        opts.update(kw)
        return subprocess.Popen(ctl_argv() + ["--socket", self.socket] + [str(a) for a in args],
                                **opts)

    @contextlib.contextmanager
    def ctl_running(self, *args: Any, **kw: Any) -> Iterator[subprocess.Popen]:
        """ctl_popen() for a `with` block, which kills it at the end if it still runs."""
        p = self.ctl_popen(*args, **kw)
        try:
            yield p
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)

    # -- processes
    def track(self, pid: int) -> None:
        """Remember a process (by pid, identity-checked by psutil) to kill at teardown."""
        try:
            self._tracked.setdefault(pid, psutil.Process(pid))
        except psutil.Error:
            pass

    def collect_children(self) -> List[psutil.Process]:
        """Track every current descendant of the daemon; return them."""
        if self.proc is None:
            return []
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        for k in kids:
            self._tracked.setdefault(k.pid, k)
        return kids

    def pool_workers(self) -> List[psutil.Process]:
        """The daemon's children that are pool workers (not its checkpointer, spare or fork server)."""
        out = []
        for k in self.collect_children():
            try:
                service = procs.service_name(k.cmdline())
            except psutil.Error:
                continue
            if service is None:
                out.append(k)
        return out

    def _alive_tracked(self) -> List[psutil.Process]:
        alive = []
        for p in list(self._tracked.values()):
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        return alive

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no daemon log)"
        return "\n".join(lines[-n:])

    def stop(self, timeout: float = 10.0) -> Optional[int]:
        """SIGTERM, wait up to `timeout`, SIGKILL; return the exit status."""
        if self.proc is None:
            return None
        self.collect_children()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.collect_children()
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def cleanup(self) -> None:
        """Stop the daemon, SIGKILL every tracked child still alive, remove the directory."""
        for c in self._clients:
            try:
                c.close()
            except Exception:  # noqa: BLE001
                pass
        self._clients = []
        try:
            self.stop()
        finally:
            deadline = time.monotonic() + 3.0   # workers notice their parent is gone
            while self._alive_tracked() and time.monotonic() < deadline:
                time.sleep(0.05)
            for p in self._alive_tracked():
                try:
                    p.kill()
                except psutil.Error:
                    pass
            shutil.rmtree(self.root, ignore_errors=True)


# ---- fixtures ----------------------------------------------------------------

def _daemons_of(item: pytest.Item) -> List[Daemon]:
    """The daemons a test used: fixture values that are, or made, Daemons."""
    found: List[Daemon] = []
    for value in (getattr(item, "funcargs", None) or {}).values():
        for d in [value] + list(getattr(value, "daemons", [])):
            if isinstance(d, Daemon) and d not in found:
                found.append(d)
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """On a failure, add the tail of each daemon's log to the report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for d in _daemons_of(item):
            rep.sections.append(("emitterd log tail (%s)" % d.root, d.log_tail(60)))


@pytest.fixture
def make_daemon() -> Any:
    """Factory: make_daemon(*extra_args, env=None, start=True) -> a (started) Daemon."""
    made: List[Daemon] = []

    def factory(*extra_args: Any, env: Optional[Dict[str, str]] = None,
                start: bool = True) -> Daemon:
        d = Daemon(extra_args, env=env)
        made.append(d)
        return d.start() if start else d

    factory.daemons = made  # type: ignore[attr-defined]
    try:
        yield factory
    finally:
        for d in made:
            d.cleanup()


@pytest.fixture
def daemon(make_daemon: Any) -> Daemon:
    """A running emitterd on a fresh socket and data dir."""
    return make_daemon()


@pytest.fixture
def short_tmp() -> Any:
    """A fresh directory under /tmp, removed afterwards."""
    d = tempfile.mkdtemp(prefix="emd-t-", dir="/tmp")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
