"""Trying again after a start failed (a worker, the fork server, the checkpointer): the delay
backs off from 0.5 to 30 s; a helper's failure is said once a minute, and when it is back."""
from typing import Any, Callable

from emitterd import logs

FIRST_DELAY = 0.5
MAX_DELAY = 30.0


def delay(failures: int) -> float:
    """Seconds before the next try after `failures` in a row (the exponent capped: 2**1024
    is no float)."""
    return min(FIRST_DELAY * 2 ** min(failures - 1, 16), MAX_DELAY)


class StartRetry:
    def __init__(self, loop: Any, log: Any, what: str) -> None:
        self.loop = loop
        self.log = log
        self.what = what
        self.failures = 0
        self._said = logs.Throttle(burst=1, period=60.0)

    def failed(self, error: BaseException, again: Callable[[], Any], consequence: str) -> None:
        """A start failed: `again` is called after the next delay."""
        self.failures += 1
        wait = delay(self.failures)
        extra = self._said.allow()
        if extra is not None:
            self.log.warning("%s not started: %s; trying again" % (self.what, consequence),
                             error=str(error), failures=self.failures, retry_in=wait, **extra)
        self.loop.call_later(wait, again)

    def started(self) -> None:
        if self.failures:
            self.log.info("%s started again" % self.what, after_failures=self.failures)
            self.failures = 0
            self._said.reset()
