"""Under socket activation the control socket is the inherited one, wherever it is bound
(control_socket() in daemon.py takes the only socket, or the one named 'control', and
ControlServer now records its real path), but subscriber_access.check() still compares a
subscriber path with cfg.socket only. A subscriber naming the daemon's real control socket
is then accepted (README/this check: 'the subscriber is the daemon's own control socket' is
invalid), and the workers connect to the daemon's own control socket."""
import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_systemd_edges import Launched, _listening  # noqa: E402
from emitterd.client import Client, Invalid  # noqa: E402


@pytest.mark.timeout(60)
def test_subscriber_is_the_inherited_control_socket(short_tmp):
    real = os.path.join(short_tmp, "real.sock")
    named = os.path.join(short_tmp, "named.sock")     # what --socket says
    s = _listening(real)
    d = Launched(short_tmp, [s], named, names="control")
    s.close()
    try:
        assert d.wait_log(r"emitterd ready|cannot start", 20), d.log()[-3000:]
        assert d.proc.poll() is None, d.log()[-3000:]
        with Client(real, timeout=10) as c:
            try:
                st = c.start({"name": "loop", "type": "stream", "selector": "s",
                              "subscriber": "unix:" + real})
            except Invalid as e:
                assert e.details == {"field": "subscription.subscriber"}, e.details
                return
            time.sleep(2)
            log = d.log()
            raise AssertionError("a subscription delivering to the daemon's own (inherited) "
                                 "control socket %s was accepted (%s); log tail:\n%s"
                                 % (real, st["state"], log[-1500:]))
    finally:
        d.cleanup()
