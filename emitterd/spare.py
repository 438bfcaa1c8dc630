"""One pre-forked, generic worker kept ready so that replacing a dead worker costs a
message, not a fork of the (large) parent: the respawn path stays fast."""
import signal
from typing import Any, Optional

from emitterd import logs, procs

log = logs.get("spare")
REPLENISH_DELAY = 0.0    # a new spare is asked for once the last one's replacement is ready


class Spare:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.pid = 0
        self.sock: Any = None
        self._timer = None
        self.enabled = True

    def ensure(self) -> None:
        """Have a spare (forked later in this turn's timers, never in the caller's path)."""
        if self.enabled and self.sock is None and self._timer is None and not self.ctx.shutting_down:
            self._timer = self.ctx.loop.call_later(REPLENISH_DELAY, self._fork)

    def _fork(self) -> None:
        self._timer = None
        if self.sock is not None or self.ctx.shutting_down:
            return
        title = procs.SERVICE_TITLES["spare"]
        try:
            self.pid, self.sock = self.ctx.forkserver.spawn(title, "spare")
        except OSError as e:
            # only a head start: the next respawn forks its own, and asks for a spare again
            log.warning("could not fork a spare worker", error=e.strerror or str(e))
            return
        pid = self.pid
        self.ctx.children[pid] = lambda status: self.lost(pid, status)

    def take(self) -> Optional[tuple]:
        """(pid, parent socket) of the spare, now the caller's; None when there is none."""
        if self.sock is None:
            return None
        got = (self.pid, self.sock)
        self.ctx.children.pop(self.pid, None)
        self.pid, self.sock = 0, None
        return got

    def lost(self, pid: int, status: int) -> None:
        if pid == self.pid and self.sock is not None:
            log.warning("spare worker died", pid=pid, how=procs.describe_status(status))
            self.sock.close()
            self.pid, self.sock = 0, None
            self.ensure()

    def release_if_idle(self) -> None:
        """No pool runs: no spare either (a stopped daemon state leaves no processes)."""
        if not any(p.state in ("running", "backoff") for p in self.ctx.registry.pools.values()):
            self.close()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock is not None:
            self.sock.close()        # it exits on EOF; SIGTERM in case it is slow to notice
            procs.kill(self.pid, signal.SIGTERM)
            self.pid, self.sock = 0, None
