"""PROTOCOL §3: retry n waits min(initial * 2**(n-1), maximum), then the event comes back
with attempt + 1; after max_retries retries the next nack parks it.

With max_retries above 1024 the 1025th nack retry raises OverflowError in the parent
(initial * 2**1024: an int too large for a float, computed before min() caps it): the
event is neither scheduled again nor parked. It stays in flight for good, the checkpoint
never passes it, and the subscriber never hears of it again."""
import os

import pytest

from raw_subscriber import RawSubscriber

RETRIES_BEFORE_BUG = 1024


@pytest.mark.timeout(60)
def test_retry_past_1024_comes_back(daemon, short_tmp):
    sub = RawSubscriber(os.path.join(short_tmp, "s.sock"))
    try:
        c = daemon.client()
        st = c.start(sub.spec("many-retries", options={"max_retries": 5000,
                                                       "retry_backoff": [0.000001, 0.000001]}))
        hello = sub.accept()
        assert hello["op"] == "hello" and hello["key"] == st["key"]
        c.publish([{"stream": "s", "type": "t"}])
        attempt = 0
        while attempt < RETRIES_BEFORE_BUG + 3:
            try:
                frame = sub.recv(timeout=5.0)
            except TimeoutError:
                status = c.status(st["key"])
                pytest.fail("after attempt %d was nacked with retry, the event never came "
                            "back (max_retries 5000, backoff 1 µs); status: in_flight=%d "
                            "checkpoint=%d parked=%d" % (attempt, status["in_flight"],
                                                        status["checkpoint"], status["parked"]))
            (ev,) = frame["events"]
            assert ev["attempt"] == attempt + 1
            attempt = ev["attempt"]
            sub.send({"op": "nack", "positions": [ev["position"]], "action": "retry"})
    finally:
        sub.close()
