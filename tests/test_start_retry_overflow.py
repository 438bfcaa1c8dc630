"""emitterd/retry.py (commit 5a2623c, branch s16): StartRetry.failed() computes
min(FIRST_DELAY * 2 ** (failures - 1), MAX_DELAY). At the 1025th failure in a row
(about 8.5 hours at the 30 s cap: a process limit, an fd limit that lasts a night)
0.5 * 2**1024 raises OverflowError ("int too large to convert to float") inside the timer
callback: the loop logs "unhandled error in a timer" and nothing calls start again, so the
fork server / checkpointer is never tried again (what the commit set out to fix).
A unit test: 1025 real failures would take hours against the daemon."""
import pytest

from emitterd.retry import StartRetry


class _Loop:
    def __init__(self):
        self.delays = []

    def call_later(self, delay, cb):
        self.delays.append(delay)


class _Log:
    def warning(self, *a, **k):
        pass

    def info(self, *a, **k):
        pass


@pytest.mark.timeout(30)
def test_start_retry_keeps_retrying_after_many_failures():
    loop = _Loop()
    r = StartRetry(loop, _Log(), "checkpointer")
    err = OSError(24, "Too many open files")
    for i in range(1100):
        try:
            r.failed(err, lambda: None, "the WAL grows until it is")
        except OverflowError as e:
            pytest.fail("failure %d raised %r: no retry is scheduled after it" % (i + 1, e))
    assert len(loop.delays) == 1100 and max(loop.delays) == 30.0
