"""Commit 21a8f86: subscriber_access.check() compares a subscriber path with
ctx.server.path too, which for an inherited socket is os.fsdecode(getsockname()). A
systemd socket unit may listen in the abstract namespace (ListenStream=@name): the path is
then '\\0name', os.path.samefile() raises ValueError ("embedded null byte", not OSError)
and every `start` naming a unix: subscriber answers "internal error" (before the commit
it was accepted)."""
import os
import socket
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_systemd_edges import Launched  # noqa: E402
from emitterd.client import Client  # noqa: E402


@pytest.mark.timeout(60)
def test_start_with_a_subscriber_under_an_abstract_inherited_socket(short_tmp):
    name = "\0emitterd-review2-%s" % uuid.uuid4().hex[:12]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(name)
    s.listen(16)
    named = os.path.join(short_tmp, "named.sock")     # what --socket says
    d = Launched(short_tmp, [s], named, names="control")
    s.close()
    try:
        assert d.wait_log(r"emitterd ready|cannot start", 20), d.log()[-3000:]
        assert d.proc.poll() is None, d.log()[-3000:]
        with Client(name, timeout=10) as c:
            assert c.ping()["head"] == 0
            sub = "unix:" + os.path.join(short_tmp, "sub.sock")
            st = c.start({"name": "abs", "type": "stream", "selector": "s",
                          "subscriber": sub})
            assert st["state"] == "running", st
    finally:
        d.cleanup()
