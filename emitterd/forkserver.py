"""A lean fork server: workers and spares are forked from a small process of their own
instead of from the parent, and handed back to the parent as its children.

Why: a forked child starts with a copy of its parent's page tables, and the kernel must
tear every inherited page down again when the child exits. Forked from a parent that holds
tens of MiB (its event tail, SQLite's cache), a worker costs the parent a millisecond or more
to fork and takes milliseconds to die, and a replacement can only start once the death is
seen. This server is a fresh interpreter (exec'd, so it shares nothing with the parent)
that imported only what a worker needs; forking from it is cheap and so is dying.

How a worker becomes the daemon's child: the daemon is a child subreaper
(PR_SET_CHILD_SUBREAPER). The server forks an intermediate process, which forks the worker,
passes its pid back and exits (procs.fork_orphan): the orphaned worker is re-parented to the
daemon, which then reaps it like any child it forked itself. The daemon waits for the server's
answer (about as long as a fork of its own took), so a spawn still returns (pid, socket).
"""
import signal
import socket
import sys
from typing import Any, Callable, Optional

from emitterd import framing, logs, procs
from emitterd.retry import StartRetry

log = logs.get("forkserver")
REPLY_TIMEOUT = 2.0          # a fork of a small process takes well under a millisecond
MAX_FRAME = 1 << 20


class ForkServer:
    """The daemon's side: keeps one fork server running and asks it for children."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.pid = 0
        self.sock: Optional[socket.socket] = None
        self.ready = False
        self.closing = False
        self._replacing = False
        self._decoder = framing.Decoder(MAX_FRAME)
        self._retry = StartRetry(ctx.loop, log, "fork server")

    def _start_again(self) -> None:
        if not self.pid and not self.closing and not self.ctx.shutting_down:
            self.start()

    def start(self) -> None:
        """Exec the server (it becomes ready on its own; until then spawn() returns None)."""
        try:
            # without it the workers would be orphaned to init: then no fork server at all
            procs.become_subreaper()
        except OSError as e:
            log.warning("fork server not used: workers are forked by the daemon", error=str(e))
            return
        cfg = self.ctx.cfg
        try:
            self.pid, ours = procs.spawn_module("emitterd.forkserver", cfg.log_level, cfg.log_format)
        except OSError as e:
            self._retry.failed(e, self._start_again, "workers are forked by the daemon meanwhile")
            return
        self._retry.started()
        self.sock = ours
        self.ready = False
        self._decoder = framing.Decoder(MAX_FRAME)
        pid = self.pid
        self.ctx.children[pid] = lambda status: self._exited(pid, status)

    def spawn(self, title: str, kind: str, spec: Optional[dict] = None) -> tuple:
        """(pid, parent end) of a new child running the worker (`kind` "worker", with `spec`)
        or a spare (`kind` "spare"): forked by the server, or by the daemon itself when the
        server cannot (not started, not ready yet, or failed)."""
        got = self._ask(title, kind, spec)
        return got or procs.spawn(title, _child_main(kind, spec))

    def _ask(self, title: str, kind: str, spec: Optional[dict]) -> Optional[tuple]:
        """The server's (pid, parent end) for the child, or None."""
        if self.sock is None or not (self.ready or self._check_ready()):
            return None
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cfg = self.ctx.cfg
        request = framing.encode({"title": title, "kind": kind, "spec": spec,
                                  "log": [cfg.log_level, cfg.log_format]})
        try:
            self.sock.settimeout(REPLY_TIMEOUT)
            socket.send_fds(self.sock, [request], [child_end.fileno()])
            child_end.close()
            reply = self._read_frame()
        except (OSError, framing.FrameError) as e:
            child_end.close()
            parent_end.close()
            self._fail("no answer from the fork server (%s)" % (e,))
            return None
        finally:
            if self.sock is not None:
                self.sock.setblocking(False)
        pid = reply.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            parent_end.close()
            log.warning("fork server could not fork", error=reply.get("error"))
            return None
        parent_end.setblocking(False)
        return pid, parent_end

    def _check_ready(self) -> bool:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._fail("the fork server closed its socket")
            return False
        self._decoder.feed(data)
        msg = self._decoder.next()
        self.ready = msg is not None and msg.get("op") == "ready"
        return self.ready

    def _read_frame(self) -> dict:
        while True:
            msg = self._decoder.next()
            if msg is not None:
                return msg
            data = self.sock.recv(4096)
            if not data:
                raise OSError("the fork server closed its socket")
            self._decoder.feed(data)

    def _fail(self, why: str) -> None:
        log.warning("fork server dropped: workers are forked by the daemon until it is back",
                    reason=why, pid=self.pid)
        self._drop()
        procs.kill(self.pid, signal.SIGKILL)      # its exit is reaped and restarts it

    def _drop(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.ready = False

    def _exited(self, pid: int, status: int) -> None:
        if pid != self.pid:
            return
        self._drop()
        self.pid = 0
        if self._replacing and not self.closing and not self.ctx.shutting_down:
            self._replacing = False
            self.start()
            return
        if not self.closing and not self.ctx.shutting_down:
            log.warning("fork server exited, starting another", how=procs.describe_status(status))
            self.ctx.loop.call_later(1.0, self._start_again)

    def close(self) -> None:
        self.closing = True
        self._drop()              # it exits on EOF
        if self.pid:
            procs.kill(self.pid, signal.SIGTERM)

    def replace(self) -> None:
        """A new server once this one exits (it takes its log settings at start); workers
        are forked by the daemon itself meanwhile."""
        if self.pid and not self.closing:
            self._replacing = True
            self._drop()
            procs.kill(self.pid, signal.SIGTERM)


# ---- the server process -------------------------------------------------------------------
def _child_main(kind: str, spec: Optional[dict]) -> Callable[[socket.socket], None]:
    from emitterd.worker import main as worker_main
    if kind == "spare":
        return worker_main.standby
    return lambda s: worker_main.main(s, spec)


def serve(sock: socket.socket) -> None:
    """Answer fork requests (a frame with the child's socket attached) until the daemon
    closes its end."""
    decoder = framing.Decoder(MAX_FRAME)
    sock.sendall(framing.encode({"op": "ready"}))
    fds: list = []
    while True:
        msg = decoder.next()
        if msg is None:
            try:
                data, got, _, _ = socket.recv_fds(sock, 65536, 4)
            except ConnectionResetError:
                # the daemon closed its end with our "ready" unread (it forked nothing):
                # gone, as with EOF; not worth the warning every such shutdown logged
                return
            fds.extend(got)
            if not data:
                return                           # the daemon is gone
            decoder.feed(data)
            continue
        if not fds:
            sock.sendall(framing.encode({"error": "a fork request came without its socket"}))
            continue
        _fork_one(sock, msg, fds.pop(0))


def _fork_one(sock: socket.socket, msg: dict, child_fd: int) -> None:
    """Fork the requested child (re-parented to the daemon) and answer with its pid."""
    child = socket.socket(fileno=child_fd)
    try:
        level, fmt = msg.get("log") or ("info", "text")
        pid = procs.fork_orphan(msg["title"], child, _child_main(msg["kind"], msg.get("spec")),
                                lambda: logs.configure(level, fmt))
        reply = {"pid": pid}
    except (OSError, KeyError, TypeError, ValueError) as e:
        reply = {"error": "%s: %s" % (type(e).__name__, e)}
    finally:
        child.close()
    sock.sendall(framing.encode(reply))


def main(argv: list) -> None:
    fd, level, fmt = int(argv[0]), argv[1], argv[2]
    sock = procs.helper_main(fd, procs.SERVICE_TITLES["forkserver"])
    logs.configure(level, fmt)
    _child_main("spare", None)                         # import what workers run, once
    try:
        serve(sock)
    except (OSError, framing.FrameError) as e:
        log.warning("fork server stopped", error=str(e))


if __name__ == "__main__":
    main(sys.argv[1:])
