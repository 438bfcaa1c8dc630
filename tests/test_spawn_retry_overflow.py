"""Pool._spawn_failed() (and emitterd/retry.py's StartRetry, same formula) computes
(before its fix) min(0.5 * 2 ** (failures - 1), 30) with failures counted per pool,
in a row, across every slot and every start, reset only by a successful spawn. At the
1025th failure 0.5 * 2**1024 raises OverflowError. A pool of 64 slots during an fd
shortage gets there after 17 start/stop rounds (or ~16 retry rounds, ~8 minutes, on its
own): `start` then answers "internal error ... OverflowError", and a slot whose retry
timer raises it is never tried again."""
import resource

import psutil
import pytest

from emitterd.client import Internal


@pytest.mark.timeout(120)
def test_many_spawn_failures_do_not_overflow(make_daemon):
    d = make_daemon()
    c = d.client()
    spec = {"name": "big", "type": "stream", "selector": "$all", "pool_size": 64}
    key = c.start(spec)["key"]
    c.stop(key)
    soft, hard = resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE)
    nfds = psutil.Process(d.proc.pid).num_fds()
    resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (nfds + 1, hard))  # no socketpair
    try:
        for rnd in range(18):
            try:
                st = c.start(spec)
            except Internal as e:
                pytest.fail("round %d: start answered %r after %d spawn failures in a row"
                            % (rnd + 1, e, rnd * 64))
            assert st["state"] == "running"
            c.stop(key)
    finally:
        resource.prlimit(d.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
    with open(d.log_path, encoding="utf-8", errors="replace") as f:
        assert "could not start a worker" in f.read()
