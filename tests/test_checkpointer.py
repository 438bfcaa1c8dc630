"""The checkpointer (emitterd/checkpointer.py) against a real daemon and SQLite file: WAL
checkpoints reach the database file, and under a steady stream of publishes the WAL is
rewound (bounded by wal_rewind_bytes plus what arrives meanwhile) without losing or
reordering a publish.
"""
from __future__ import annotations

import os
from typing import Any, List

import pytest

from waits import wait_for

MIB = 1 << 20


def batch(n: int, start: int) -> List[dict]:
    pad = "x" * 180
    return [{"stream": "s-%d" % ((start + i) % 16), "type": "t", "data": {"n": start + i, "pad": pad}}
            for i in range(n)]


@pytest.mark.timeout(60)
def test_checkpoints_reach_the_database_file(make_daemon: Any) -> None:
    d = make_daemon()
    c = d.client()
    db = os.path.join(d.data_dir, "emitterd.db")
    before = os.path.getsize(db)
    for k in range(20):
        c.publish(batch(256, k * 256))
    # every 0.5 s the checkpointer copies the WAL into the database file (it once failed
    # every time with EBADF, forked with the parent's SQLite lock table)
    grown = wait_for(lambda: os.path.getsize(db) > before + MIB and os.path.getsize(db), 15,
                     "the WAL checkpointed into %s (%d bytes before)" % (db, before))
    assert grown > before + MIB


@pytest.mark.timeout(120)
def test_wal_is_rewound_under_a_steady_stream_of_publishes(make_daemon: Any) -> None:
    d = make_daemon("--wal-rewind-bytes", str(MIB), "--log-level", "debug")
    c = d.client()
    wal = os.path.join(d.data_dir, "emitterd.db-wal")
    positions: List[int] = []
    biggest = 0
    # back to back, so SQLite never finds the WAL idle and fully checkpointed by itself:
    # about 8 frames of 16 KiB per publish, 192 MiB of WAL written in all
    n = 1536
    for k in range(n):
        positions += c.publish(batch(256, k * 256))["positions"]
        biggest = max(biggest, os.path.getsize(wal))
    assert positions == list(range(1, n * 256 + 1)), "a publish was lost or reordered"
    log = open(d.log_path).read()
    assert "WAL rewound" in log
    # without rewinding the file would hold all 192 MiB; with it, the threshold plus what
    # arrives in the half second between the checkpointer's reports and during the rewind
    # (40-50 MiB on a 2-core VM publishing flat out)
    assert biggest < 96 * MIB, "WAL grew to %.1f MiB" % (biggest / MIB)
