"""The parent process: one thread, one selector loop; this module only wires the parts."""
import os
import resource
import signal
import socket
import sqlite3
import time
from typing import Any, Optional

from emitterd import datalock, logs, monitor, procs, settings, subscription
from emitterd import systemd as sd
from emitterd.control.events import Committer
from emitterd.control.ops import OPS
from emitterd.control.publish_decode import RequestDecoder
from emitterd.control.server import ControlServer
from emitterd.eventlog import open_log
from emitterd.loop import Loop, monotonic, tune_gc
from emitterd.registry import Registry
from emitterd.forkserver import ForkServer
from emitterd.spare import Spare
from emitterd.checkpointer import Checkpointer

log = logs.get("daemon")
SAMPLE_INTERVAL = 1.0
STATUS_INTERVAL = 5.0


class Context:
    """What the parts share: settings, loop, log, registry, server; no behaviour of its own."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.loop = Loop()
        self.log: Any = None
        self.registry: Any = None
        self.server: Any = None
        self.committer: Any = None
        self.notifier: Any = None
        self.children: dict = {}       # pid -> callable(wait status), run when it is reaped
        self.spare: Any = None
        self.forkserver: Any = None
        self.started = monotonic()
        self.shutting_down = False
        self.respawn_seconds: list = []

    def pool_name(self, key: str) -> str:
        return subscription.pool_name(self.cfg.store_id, key)

    def metrics_respawn(self, seconds: float) -> None:
        self.respawn_seconds.append(seconds)
        del self.respawn_seconds[:-1000]


class Daemon:
    """Signal handling and shutdown around the loop."""

    def __init__(self, cfg: Any) -> None:
        # first, before this process opens any fd of its own: a LISTEN_FDS larger than what
        # was passed would otherwise take our own descriptors for inherited sockets
        stale = os.environ.get("LISTEN_FDS") and os.environ.get("LISTEN_PID") != str(os.getpid())
        self._listen_pid_of_another = os.environ.get("LISTEN_PID") if stale else None
        self._inherited = sd.listen_fds_with_names()
        self.ctx = Context(cfg)
        self._wake_r, self._wake_w = socket.socketpair()
        self._stop_waiting = 0
        self.exit_code = 0
        self.exporter: Any = None
        self.checkpointer: Any = None
        self._lock_fd = -1

    def start(self) -> None:
        ctx = self.ctx
        cfg = ctx.cfg
        # files we create (log, WAL, SHM) are private from their first byte; the socket's
        # mode is set explicitly
        os.umask(0o077)
        _raise_fd_limit(cfg.max_connections)
        ctx.notifier = sd.Notifier()
        if self._listen_pid_of_another is not None:
            log.warning("socket activation not used: LISTEN_FDS was passed for LISTEN_PID=%s, "
                        "not this process (a wrapper in ExecStart= that forks instead of exec?)"
                        % self._listen_pid_of_another, pid=os.getpid())
        inherited = control_socket(self._inherited, cfg.socket)
        self._inherited = []
        self._lock_fd = datalock.lock(cfg.data_dir)     # before anything opens the log
        ctx.log = open_log(cfg.data_dir, cfg.synchronous, wal_bytes=cfg.wal_rewind_bytes)
        self.checkpointer = Checkpointer(ctx, ctx.log.path)
        ctx.committer = Committer(ctx)
        ctx.registry = Registry(ctx)
        ctx.forkserver = ForkServer(ctx)
        ctx.spare = Spare(ctx)
        ctx.server = ControlServer(ctx, OPS, decode=RequestDecoder(ctx))
        self._install_signals()
        ctx.server.listen(inherited)
        loop = ctx.loop
        loop.at_turn_end(ctx.committer.commit)
        loop.at_turn_end(self._pump)
        loop.every(lambda: ctx.cfg.checkpoint_interval, ctx.registry.flush_checkpoints)
        loop.every(SAMPLE_INTERVAL, lambda: monitor.sample(ctx))
        loop.every(lambda: min(0.5, ctx.cfg.heartbeat_interval), lambda: ctx.registry.tick(monotonic()))
        loop.every(STATUS_INTERVAL, self._status)
        loop.every(0.5, lambda: ctx.server.cut_off_stalled(monotonic()))
        wd = ctx.notifier.watchdog_interval()
        if wd:
            loop.every(wd, ctx.notifier.watchdog)
        if cfg.metrics_listen:
            from emitterd.control.metrics import render
            from emitterd.exporter import Exporter
            self.exporter = Exporter(loop, cfg.metrics_listen, lambda: render(ctx))
        ctx.forkserver.start()
        self.checkpointer.start()
        ctx.log.external_checkpoints()
        ctx.registry.load()
        tune_gc()
        ctx.notifier.ready(self._summary())
        log.info("emitterd ready", pid=os.getpid(), socket=ctx.server.path, data_dir=cfg.data_dir,
                 store_id=cfg.store_id, head=ctx.log.head)

    def _pump(self) -> None:
        if self.ctx.registry.pump_all():
            self.ctx.loop.again()

    def _summary(self) -> str:
        pools = self.ctx.registry.pools.values()
        running = sum(1 for p in pools if p.state == "running")
        workers = sum(len(p.slots) for p in pools)
        return "%d pools (%d running), %d workers, head %d" % (len(pools), running, workers,
                                                              self.ctx.log.head)

    def _status(self) -> None:
        self.ctx.notifier.status(self._summary())

    # ---- signals -------------------------------------------------------------
    def _install_signals(self) -> None:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        # SIGUSR1/2 too: their default action would end the daemon with no drain and no
        # trace; it says it ignores them instead
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD,
                    signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, _ignore)
        # a file size limit must turn into a failed write (answered as an error), not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.ctx.loop.add_reader(self._wake_r, self._on_signal)

    def _on_signal(self, mask: int) -> None:
        try:
            data = self._wake_r.recv(4096)
        except BlockingIOError:
            return
        for signum in set(data):
            if signum == signal.SIGCHLD:
                self._reap()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.shutdown(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGUSR1, signal.SIGUSR2):
                log.warning("signal ignored: SIGTERM or SIGINT stops the daemon, SIGHUP reloads "
                            "its configuration", signal=signal.Signals(signum).name)

    def _reap(self) -> None:
        for pid, status in procs.reap():
            on_exit = self.ctx.children.pop(pid, None)
            if on_exit is not None:
                on_exit(status)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; apply what can change live, log the rest."""
        ctx = self.ctx
        if ctx.shutting_down:
            # STOPPING=1 is sent: no RELOADING/READY after it, nor settings changed mid-drain
            log.warning("reload ignored: the daemon is shutting down")
            return
        ctx.notifier.reloading()
        try:
            cfg, applied, pending = ctx.cfg.reload()
        except Exception as e:
            log.error("reload refused: the configuration could not be read or is invalid, "
                      "nothing changed", error=str(e))
            ctx.notifier.ready(self._summary())
            return
        ctx.cfg = cfg
        logs.configure(cfg.log_level, cfg.log_format)     # the lines below in the new format
        for name, (old, new) in applied.items():
            fmt = settings.BY_NAME[name].format          # as written: socket_mode 0660
            log.info("setting reloaded", setting=name, old=fmt(old), new=fmt(new))
        for name, (old, new) in pending.items():
            fmt = settings.BY_NAME[name].format
            log.warning("setting needs a restart to change", setting=name, old=fmt(old),
                        new=fmt(new))
        if applied.keys() & {"log_level", "log_format", "max_frame_bytes", "output_buffer_bytes"}:
            # the workers take these from a configure message (a spare when it is activated)
            for pool in ctx.registry.pools.values():
                pool.configure_workers()
            ctx.server.apply_limits()
        if "log_level" in applied or "log_format" in applied:
            # every process writes the log; the helpers take it when they start, so they are
            # replaced (the fork server's absence only means the daemon forks meanwhile)
            ctx.forkserver.replace()
            self.checkpointer.replace()
        for warning in cfg.warnings:
            log.warning(warning)
        if cfg.config_path is None:
            log.warning("reload: no config file to re-read (give --config FILE or "
                        "EMITTERD_CONFIG); flags and the environment are read at start only")
        log.info("configuration reloaded", config=cfg.config_path or "", changed=len(applied),
                 need_restart=len(pending))
        ctx.notifier.ready(self._summary())

    # ---- shutdown ------------------------------------------------------------
    def shutdown(self, why: str) -> None:
        ctx = self.ctx
        if ctx.shutting_down:
            log.warning("second stop request: not waiting for the drain any longer", signal=why)
            for pool in list(ctx.registry.pools.values()):
                if pool.stopping is not None:
                    pool.stopping["deadline"] = 0.0
                    pool.poll_stop()
            return
        ctx.shutting_down = True
        ctx.spare.close()
        ctx.forkserver.close()
        ctx.notifier.stopping()
        log.info("shutting down: draining pools", signal=why, drain_timeout=ctx.cfg.drain_timeout)
        pools = [p for p in ctx.registry.pools.values()]
        self._stop_waiting = len(pools) + 1
        for pool in pools:
            pool.stop(ctx.cfg.drain_timeout, self._one_stopped, persist_state=False)
        self._one_stopped()

    def _one_stopped(self) -> None:
        self._stop_waiting -= 1
        if self._stop_waiting == 0:
            self.ctx.committer.commit()
            self.ctx.registry.flush_checkpoints()
            self.ctx.loop.running = False

    def run(self) -> int:
        try:
            self.start()
        except (RuntimeError, OSError, sqlite3.Error) as e:
            self.close()
            log.error("cannot start", error=_why_not(e, self.ctx.cfg))
            return 1
        except BaseException:
            self.close()
            raise
        try:
            self.ctx.loop.run()
        finally:
            self.close()
        log.info("emitterd stopped", exit_code=self.exit_code)
        return self.exit_code

    def close(self) -> None:
        ctx = self.ctx
        if self.checkpointer is not None:
            self.checkpointer.close()
        for pid in list(ctx.children):
            procs.kill(pid, signal.SIGKILL)
        # reap them before we go, so none lingers as a zombie handed to init
        waiting = set(ctx.children)
        deadline = monotonic() + 2.0
        while waiting and monotonic() < deadline:
            waiting.difference_update(pid for pid, _ in procs.reap())
            if waiting:
                time.sleep(0.005)
        if ctx.server is not None:
            ctx.server.close()
        if self.exporter is not None:
            self.exporter.close()
        if ctx.log is not None:
            ctx.log.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)     # the last thing: the log is closed
            self._lock_fd = -1
        signal.set_wakeup_fd(-1)


def _ignore(signum: int, frame: Optional[Any]) -> None:
    """Python-level handler so the C handler writes the signal number to the wakeup fd."""


FD_RESERVE = 256     # descriptors besides connections: log files, workers' sockets, helpers
FD_MARGIN = 24       # of those, what even a small daemon holds beyond what it has at start
FD_LIMIT_MAX = 1 << 20   # Linux's default fs.nr_open; no need for more


def _raise_fd_limit(max_connections: int) -> None:
    """Raise the soft open-files limit to the hard one (a shell's soft 1024 is less than
    max_connections' default alone), as Redis does for maxclients; warn if even that is
    short. Past it, accept() pauses instead of failing in a loop (loop.pause_reader)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT_MAX if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_MAX)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError) as e:
            log.warning("could not raise the open-files limit", soft=soft, hard=hard,
                        error=str(e))
    if soft != resource.RLIM_INFINITY and soft < max_connections + FD_RESERVE:
        # the reserve is what a busy daemon may need besides connections; the estimate is
        # what this one has left now, less a margin for the log, helpers and a few workers
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 16
        left = max(0, soft - in_use - FD_MARGIN)
        log.warning("the open-files limit is low for max_connections: past about %d "
                    "connections (fewer by 2 for each worker) new ones wait" % left,
                    limit=soft, max_connections=max_connections)


def control_socket(inherited: list, path: str) -> Optional[socket.socket]:
    """The control socket among those socket activation passed (name, socket): the one named
    "control" (the unit's FileDescriptorName), else the only one, else the one bound to
    `path`; it must be a listening Unix stream socket. The others are closed (systemd keeps
    its own copies). RuntimeError when there is none fit to serve."""
    if not inherited:
        return None
    named = [s for name, s in inherited if name == "control"]
    if named:
        chosen = named[0]
    elif len(inherited) == 1:
        chosen = inherited[0][1]
    else:
        chosen = next((s for _, s in inherited if _bound_to(s, path)), None)
    for name, s in inherited:
        if s is not chosen:
            log.warning("inherited socket not used: the control socket is the one named "
                        "'control' (or bound to the socket path)", name=name, fd=s.fileno())
            s.close()
    if chosen is None:
        raise RuntimeError("socket activation passed %d sockets, none named 'control' or bound "
                           "to %s" % (len(inherited), path))
    why = _unfit(chosen)
    if why is not None:
        chosen.close()
        raise RuntimeError("the socket passed by socket activation %s; it must be a listening "
                           "Unix stream socket (Accept=no, ListenStream=)" % why)
    return chosen


def _bound_to(s: socket.socket, path: str) -> bool:
    try:
        return s.family == socket.AF_UNIX and os.fsdecode(s.getsockname()) == path
    except OSError:
        return False


def _unfit(s: socket.socket) -> Optional[str]:
    """Why `s` cannot be the control socket, or None."""
    try:
        if s.family != socket.AF_UNIX:
            return "is no Unix socket (family %s)" % socket.AddressFamily(s.family).name
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) != socket.SOCK_STREAM:
            return "is no stream socket"
        if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return "is not listening (a connection, as Accept=yes passes, or never listen()ed)"
    except OSError as e:
        return "cannot be examined (%s)" % e.strerror
    return None


def _why_not(e: BaseException, cfg: Any) -> str:
    """A start failure in words: the path and the reason, without a traceback."""
    if isinstance(e, sqlite3.Error):
        return "the event log in %s cannot be opened: %s" % (cfg.data_dir, e)
    if isinstance(e, OSError) and e.strerror:
        return "%s%s" % (e.strerror, " (%s)" % e.filename if e.filename else "")
    return str(e)


def run(cfg: Any) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; return the exit status
    (1 when it cannot start, with the reason logged)."""
    return Daemon(cfg).run()
