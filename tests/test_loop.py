"""The loop every process runs: a periodic callback that raises once runs again (the
heartbeat, the watchdog ping and the checkpoint flush are such callbacks: one exception
used to stop them for good, and systemd's watchdog then killed a daemon that was fine)."""
from typing import List

import pytest

from emitterd.loop import Loop


@pytest.mark.timeout(10)
def test_a_periodic_callback_that_raises_runs_again() -> None:
    loop = Loop()
    calls: List[int] = []

    def tick() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("a bug, once")
    loop.every(0.001, tick)
    try:
        for _ in range(500):            # turns of at most 10 ms each
            loop.run_once(max_wait=0.01)
            if len(calls) >= 3:
                break
    finally:
        loop.close()
    assert len(calls) >= 3, "the callback ran %d time(s), then never again" % len(calls)
