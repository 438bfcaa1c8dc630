"""Polling helpers shared by the tests (deadlines, never bare sleeps)."""
import time
from typing import Any, Callable, Dict, List, Optional


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll pred() until it returns something truthy and return it; errors propagate."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out after %.1fs waiting for %s (last %r)" % (timeout, what, last))


def wait_until(pred: Callable[[], Any], timeout: float, what: str = "condition",
               interval: float = 0.02) -> Any:
    """Like wait_for, but exceptions other than AssertionError count as "not yet"."""
    deadline = time.monotonic() + timeout
    last: Any = None
    err: Optional[BaseException] = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001 - not yet
            err = e
        if time.monotonic() >= deadline:
            raise AssertionError("timed out after %.1fs waiting for %s (last value %r, last error %r)"
                                 % (timeout, what, last, err))
        time.sleep(interval)


def ready_status(d: Any, c: Any, key: str, n: int, timeout: float = 10.0,
                 exclude: frozenset = frozenset()) -> Dict[str, Any]:
    """Poll status until the pool runs exactly n ready workers (none with a pid in exclude)."""
    def ready() -> Optional[Dict[str, Any]]:
        st = c.status(key)
        ws = st["workers"]
        if (st["state"] == "running" and len(ws) == n
                and all(w["state"] == "ready" and w["pid"] not in exclude for w in ws)):
            return st
        return None
    st = wait_for(ready, timeout, what="%d ready workers of %s" % (n, key))
    for w in st["workers"]:
        d.track(w["pid"])
    return st


def received(consumer: Any, n: int, timeout: float = 10.0) -> List[int]:
    """Positions of the events an attached consumer receives, until at least n (not acked);
    AssertionError if the frames stop (idle `timeout`) before that."""
    got: List[int] = []
    for batch in consumer.batches(timeout=timeout):
        got += [e["position"] for e in batch]
        if len(got) >= n:
            return got
    raise AssertionError("received %d of %d events: %r" % (len(got), n, got))
