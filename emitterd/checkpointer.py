"""A child process that runs SQLite's WAL checkpoints, so their page copying and fsyncs
never stall the parent's loop (the parent's own connection has autocheckpoint off).

PASSIVE checkpoints run beside the single writer without blocking it; the child opens its
own connection after the fork (a SQLite handle must never cross a fork) and exits when
its pipe to the parent reaches EOF.
"""
import select
import signal
import socket
import sqlite3
from typing import Any

from emitterd import logs, procs

log = logs.get("checkpointer")
INTERVAL = 0.5


def _main(sock: socket.socket, path: str) -> None:
    procs.die_with_parent()
    db = None
    while True:
        ready, _, _ = select.select([sock], [], [], INTERVAL)
        if ready and not sock.recv(4096):
            return                           # the parent is gone
        try:
            if db is None:
                # a short busy timeout: never sit on a lock long enough to outlive a dead parent
                db = sqlite3.connect(path, isolation_level=None, timeout=0.2)
                db.execute("PRAGMA synchronous=FULL")   # a checkpoint fsyncs what it copies
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            # transient: e.g. "locking protocol" while a restarted daemon recovers the WAL
            # index; the next round tries again
            log.debug("checkpoint skipped", error=str(e))


class Checkpointer:
    """Keeps one checkpointer child alive for the event log at `path`."""

    def __init__(self, ctx: Any, path: str) -> None:
        self.ctx = ctx
        self.path = path
        self.pid = 0
        self.sock: Any = None
        self.closing = False

    def start(self) -> None:
        self.pid, self.sock = procs.spawn("emitterd: checkpointer", lambda s: _main(s, self.path))
        self.ctx.children[self.pid] = self.on_exit

    def on_exit(self, status: int) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if not self.closing:
            log.warning("checkpointer died, starting another", how=procs.describe_status(status))
            self.ctx.loop.call_later(1.0, self.start)

    def close(self) -> None:
        self.closing = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            procs.kill(self.pid, signal.SIGTERM)
