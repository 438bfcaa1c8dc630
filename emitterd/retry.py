"""Starting a helper process (fork server, checkpointer) again after it could not be started:
back off, and say so seldom, then say when it is back."""
from typing import Any, Callable

from emitterd.loop import monotonic

FIRST_DELAY = 0.5
MAX_DELAY = 30.0
SAY_EVERY = 60.0      # seconds between reminders while it keeps failing


class StartRetry:
    def __init__(self, loop: Any, log: Any, what: str) -> None:
        self.loop = loop
        self.log = log
        self.what = what
        self.failures = 0
        self._said_at = -SAY_EVERY

    def failed(self, error: BaseException, again: Callable[[], Any], consequence: str) -> None:
        """A start failed: `again` is called after the next delay."""
        self.failures += 1
        delay = min(FIRST_DELAY * 2 ** min(self.failures - 1, 16), MAX_DELAY)
        now = monotonic()
        if now - self._said_at >= SAY_EVERY:
            self._said_at = now
            self.log.warning("%s not started: %s; trying again" % (self.what, consequence),
                             error=str(error), failures=self.failures, retry_in=delay)
        self.loop.call_later(delay, again)

    def started(self) -> None:
        if self.failures:
            self.log.info("%s started again" % self.what, after_failures=self.failures)
            self.failures = 0
            self._said_at = -SAY_EVERY
