"""Chaos, short version (scripts/chaos is the long one; the harness is scripts/harness.py).

A producer process publishes continuously with client ids (retrying unanswered publishes);
five subscriptions (pinned / round_robin / random, pool sizes 1-3) deliver to unix:
subscriber processes that record every delivery (some ack late, some nack retry, one is
killed and comes back). Meanwhile the run SIGKILLs workers, SIGKILLs and restarts the
daemon, SIGSTOPs a worker past worker_timeout (daemon started with --heartbeat-interval 0.2
--worker-timeout 1.5) and resizes pools. Then: every matching published position was
delivered at least once to each subscription, every checkpoint == head, no gap in the log,
stream versions 0..n-1, and pinned per-stream order held (for a pinned subscription, within
a stream, attempt-1 deliveries on one connection come in increasing position order).
"""
from __future__ import annotations

import os
import sys

import pytest

_SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)

import harness  # noqa: E402


@pytest.mark.timeout(120)
def test_chaos_short() -> None:
    lines = []
    cfg = harness.ChaosConfig(worker_kills=30, daemon_kills=2, sigstops=1, resizes=3,
                              bounces=1, helper_kills=2, rate=60.0, kill_interval=0.2, settle_timeout=40.0,
                              log=lines.append)
    report = harness.run_chaos(cfg)
    text = harness.format_report(report)
    print(text)
    f = report["figures"]
    if not report["ok"]:
        pytest.fail("%s\n\nprogress:\n%s\n\ndaemon log tail:\n%s"
                    % (text, "\n".join(lines), report.get("daemon_log_tail", "")),
                    pytrace=False)
    assert f["lost"] == 0
    assert f["worker_kills"] >= 30 and f["daemon_kills"] >= 2 and f["sigstops"] >= 1
    assert f["resizes"] >= 3 and f["subscriber_restarts"] >= 1
    assert f["helper_kills"] >= 2          # the fork server and the checkpointer, once each
    assert f["events"] > 0 and f["deliveries"] >= f["events"]
    assert not os.path.exists(report["root"]), "the run directory was not removed"
