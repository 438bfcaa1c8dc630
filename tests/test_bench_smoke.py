"""scripts/bench --quick --no-peer --json runs end to end and reports every figure.

No timing thresholds: the machine may be slow or busy; only the shape of the
report and that every figure is a positive number are checked.
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "scripts", "bench")

EXPECTED = [
    "emitterd_eps_pool1", "emitterd_eps_pool2", "emitterd_eps_pool4",
    "limit_eps",
    "ratio_emitterd_limit_pool1", "ratio_emitterd_limit_pool2", "ratio_emitterd_limit_pool4",
    "emitterd_publish_eps_pool1", "emitterd_drain_eps_pool1", "emitterd_drain_eps_pool4",
    "latency_p50_ms", "latency_p99_ms", "latency_max_ms", "latency_rate_eps",
    "disk_fdatasync_p50_ms", "disk_fdatasync_p99_ms",
    "respawn_median_ms", "respawn_p99_ms",
    "ping_median_us", "ping_p99_us", "status_median_us", "status_p99_us",
    "pool_start_ms",
    "worker_rss_mib", "worker_uss_mib", "parent_rss_mib", "parent_uss_mib",
    "emitterd_runq_pct_parent_pool2", "emitterd_runq_pct_producer_pool2",
    "emitterd_cpu_busiest_pct_pool2", "emitterd_cpu_least_busy_pct_pool2",
    "limit_cpu_busiest_pct", "limit_cpu_least_busy_pct",
]
# scheduling shares (unit "%"): 0 when nothing had to wait; the CPUs' busy shares come in
# /proc/stat clock ticks (10 ms), so a --quick run's may be 0 or 100


@pytest.mark.timeout(300)
def test_bench_quick_json() -> None:
    r = subprocess.run([sys.executable, BENCH, "--quick", "--no-peer", "--json"],
                       capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, "bench failed (%d):\n%s" % (r.returncode, r.stderr[-4000:])
    doc = json.loads(r.stdout)
    assert {"meta", "settings", "results", "notes"} <= set(doc)
    meta = doc["meta"]
    for k in ("date", "nproc", "cpu", "python", "command", "daemon_command"):
        assert meta.get(k), k
    assert "--quick" in meta["command"]
    res = doc["results"]
    missing = [k for k in EXPECTED if k not in res]
    assert not missing, "missing figures: %s" % missing
    for k, v in res.items():
        assert {"median", "runs", "unit"} <= set(v), k
        assert isinstance(v["median"], (int, float)) and math.isfinite(v["median"]), k
        assert v["runs"], (k, v)
        if v["unit"] == "%":
            assert all(0 <= x <= 100 for x in v["runs"]), (k, v)
            continue
        if k.startswith("emitterd_cpu_us_checkpointer_"):
            # it wakes every 0.5 s: a --quick run may well end before it does anything
            assert v["median"] >= 0 and all(x >= 0 for x in v["runs"]), (k, v)
            continue
        assert v["median"] > 0, (k, v)
        assert all(x > 0 for x in v["runs"]), (k, v)
    for n in (1, 2, 4):
        for role in ("parent", "workers", "checkpointer", "subscribers", "producer"):
            assert "emitterd_cpu_us_%s_pool%d" % (role, n) in res, (role, n)
    assert not any(k.startswith(("redis_", "ratio_emitterd_redis")) for k in res)
    assert doc["raw"]["respawn"]["kills"] >= 1
    # the bench removes its temporary directory
    assert meta["tmp_dir"].startswith("/tmp/") and not os.path.exists(meta["tmp_dir"])
