"""A child process that runs SQLite's WAL checkpoints, so their page copying and fsyncs
never stall the parent's loop (the parent's own connection has autocheckpoint off).

PASSIVE checkpoints run beside the single writer without blocking it. The child is a fresh
interpreter (procs.spawn_module), not a fork of the parent: SQLite keeps a process-wide table
of open files and their locks, which a fork would copy with the parent's file descriptors
in it, and the child's own connection would then lock through descriptors it does not have
(it did: every checkpoint failed with EBADF). It exits when its pipe to the parent reaches
EOF.

Keeping the WAL short: SQLite starts writing the WAL from its beginning again only when a
write transaction begins with every frame already checkpointed. Under a steady stream of
publishes that never happens by itself (a commit always lands while a checkpoint runs), so
the WAL would grow without end, and every commit would extend the file, which makes each
fdatasync commit file-system metadata as well (measured: about 45 % slower than rewriting
blocks the file already has). So the child reports how long the WAL is after every
checkpoint; once it passes wal_rewind_bytes the parent asks for one checkpoint at once (it
catches up on most of the WAL while publishes go on), then holds publishes back for a last,
short one, after which its next commit rewinds the WAL to its start.
"""
import select
import signal
import socket
import sqlite3
import sys
from typing import Any, Optional

from emitterd import framing, logs, procs
from emitterd.channel import Channel
from emitterd.loop import monotonic
from emitterd.retry import StartRetry

log = logs.get("checkpointer")
INTERVAL = 0.5
HOLD_MAX = 0.2                 # publishes are never held back longer than this
CATCH_UP_FRAMES = 64           # a round that copied at most this much: hold and finish
CATCH_UP_ROUNDS = 8
MAX_FRAME = 1 << 16
STUCK_WARN_AFTER = 5.0         # the WAL not rewound for this long: a warning, and then
STUCK_WARN_EVERY = 60.0        # every this many seconds while it lasts


def _main(sock: socket.socket, path: str) -> None:
    db = None
    page_size = 0
    failures = 0
    while True:
        ready, _, _ = select.select([sock], [], [], INTERVAL)
        asked = False
        if ready:
            if not sock.recv(4096):
                return                           # the parent is gone
            asked = True                         # any request means "checkpoint now"
        frames = done = -1
        try:
            if db is None:
                # a short busy timeout: never sit on a lock long enough to outlive a dead parent
                db = sqlite3.connect(path, isolation_level=None, timeout=0.2)
                db.execute("PRAGMA synchronous=FULL")   # a checkpoint fsyncs what it copies
                page_size = db.execute("PRAGMA page_size").fetchone()[0]
            _, frames, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            failures = 0
        except sqlite3.Error as e:
            # usually transient: e.g. "locking protocol" while a restarted daemon recovers the
            # WAL index; the next round tries again. Said louder when it lasts: a checkpointer
            # that never succeeds leaves the WAL growing without end.
            failures += 1
            if failures == 10 or failures % 120 == 0:
                log.warning("WAL checkpoints keep failing: the WAL grows until one succeeds",
                            error=str(e), failures=failures)
            else:
                log.debug("checkpoint skipped", error=str(e))
        if frames >= 0 or asked:
            sock.sendall(framing.encode({"frames": frames, "done": done,
                                         "frame_bytes": page_size + 24, "asked": asked}))


class Checkpointer:
    """Keeps one checkpointer child alive for the event log at `path`, and has the WAL
    rewound when it grows long (see the module's docstring)."""

    def __init__(self, ctx: Any, path: str) -> None:
        self.ctx = ctx
        self.path = path
        self.pid = 0
        self.channel: Optional[Channel] = None
        self.closing = False
        self._replacing = False
        self.phase = 0            # 0 idle, 1 catching up, 2 publishes held for the last one
        self._rounds = 0
        self._last_frames = 0
        self._held_at = 0.0
        self._stuck_since = 0.0   # since when rewinds find frames they may not copy (a reader)
        self._stuck_warned: Optional[float] = None
        self._retry = StartRetry(ctx.loop, log, "checkpointer")

    def _start_again(self) -> None:
        if self.channel is None and not self.closing:
            self.start()

    def start(self) -> None:
        cfg = self.ctx.cfg
        try:
            self.pid, sock = procs.spawn_module("emitterd.checkpointer", self.path,
                                                cfg.log_level, cfg.log_format)
        except OSError as e:
            self._retry.failed(e, self._start_again, "the WAL grows until it is")
            return
        self._retry.started()
        self.channel = Channel(self.ctx.loop, sock, MAX_FRAME, self._on_report, self._on_close)
        self.phase = 0
        self.ctx.children[self.pid] = self.on_exit

    def _on_report(self, msg: dict) -> None:
        frames, asked = msg.get("frames", -1), msg.get("asked", False)
        if self.phase == 0:
            if frames * msg.get("frame_bytes", 0) >= self.ctx.cfg.wal_rewind_bytes:
                self.phase, self._rounds, self._last_frames = 1, 0, frames
                self._ask()
        elif not asked:
            return                    # a periodic report, sent before our request arrived
        elif self.phase == 1:
            # catch up while publishes go on, until a round has little left to copy: then
            # the round with publishes held back is short
            grown, self._last_frames = frames - self._last_frames, frames
            self._rounds += 1
            if frames >= 0 and grown > CATCH_UP_FRAMES and self._rounds < CATCH_UP_ROUNDS:
                self._ask()
                return
            self.phase = 2
            self._held_at = monotonic()
            self.ctx.committer.hold(HOLD_MAX, self._release)
            self._ask()
        else:
            self._release()
            done = msg.get("done", -1)
            if 0 <= done < frames:
                self._not_rewound(frames * msg.get("frame_bytes", 0))
                return
            # all copied (frames == done): the next commit rewinds
            if self._stuck_warned is not None:
                log.info("WAL rewound again: the read transaction that held it has ended",
                         stuck_s=round(monotonic() - self._stuck_since, 1))
            self._stuck_since, self._stuck_warned = 0.0, None
            log.debug("WAL rewound", frames=frames, checkpointed=done,
                      rounds=self._rounds, held_ms=round((monotonic() - self._held_at) * 1e3, 2))

    def _not_rewound(self, wal_bytes: int) -> None:
        """The last round could not copy every frame: SQLite copies none that a reader of an
        older snapshot may still need, and such a reader can only be another process with the
        database open (an sqlite3 shell left in a transaction, a long backup). The WAL then
        grows with every publish until it ends, so say so, now and then, not at every try."""
        now = monotonic()
        if not self._stuck_since:
            self._stuck_since = now
        if now - self._stuck_since < STUCK_WARN_AFTER or (
                self._stuck_warned is not None and now - self._stuck_warned < STUCK_WARN_EVERY):
            return
        self._stuck_warned = now
        log.warning("the WAL cannot be rewound: another process holds a read transaction open "
                    "on the event log (an sqlite3 shell, a backup?); the WAL grows until it ends",
                    wal=self.path + "-wal", wal_mib=round(wal_bytes / (1 << 20), 1),
                    for_s=round(now - self._stuck_since, 1))

    def _ask(self) -> None:
        if self.channel is not None:
            self.channel.send_raw(b"c")

    def _release(self) -> None:
        if self.phase == 2:
            self.ctx.committer.release()
        self.phase = 0

    def _on_close(self, reason: str) -> None:
        self._release()

    def on_exit(self, status: int) -> None:
        if self.channel is not None:
            self.channel.close("checkpointer exited")
            self.channel = None
        self._release()
        if self._replacing and not self.closing:
            self._replacing = False
            self.start()
        elif not self.closing:
            log.warning("checkpointer died, starting another", how=procs.describe_status(status))
            self.ctx.loop.call_later(1.0, self._start_again)

    def replace(self) -> None:
        """A new checkpointer once this one exits (it takes its log settings at start)."""
        if self.channel is not None and not self.closing:
            self._replacing = True
            self._release()
            self.channel.close("replaced")
            self.channel = None
            procs.kill(self.pid, signal.SIGTERM)

    def close(self) -> None:
        self.closing = True
        self._release()
        if self.channel is not None:
            self.channel.close("shutdown")
            self.channel = None
            procs.kill(self.pid, signal.SIGTERM)


def main(argv: list) -> None:
    fd, path, level, fmt = int(argv[0]), argv[1], argv[2], argv[3]
    sock = procs.helper_main(fd, procs.SERVICE_TITLES["checkpointer"])
    logs.configure(level, fmt)
    try:
        _main(sock, path)
    except OSError:
        pass                  # the parent is gone (a report could not be sent)


if __name__ == "__main__":
    main(sys.argv[1:])
