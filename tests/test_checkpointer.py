"""The checkpointer (emitterd/checkpointer.py) against a real daemon and SQLite file: WAL
checkpoints reach the database file, and under a steady stream of publishes the WAL is
rewound (bounded by wal_rewind_bytes plus what arrives meanwhile) without losing or
reordering a publish.
"""
from __future__ import annotations

import os
import sqlite3
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


@pytest.mark.timeout(120)
def test_a_reader_holding_the_wal_is_named_and_its_end_noticed(make_daemon: Any) -> None:
    """Another process in a read transaction on the event log (an sqlite3 shell, a backup)
    keeps SQLite from copying the WAL's newer frames, so it cannot be rewound and grows with
    every publish: the daemon says so (after a few seconds, not at the first try), goes on
    storing publishes, and says when the WAL is rewound again."""
    d = make_daemon("--wal-rewind-bytes", str(MIB))
    c = d.client()
    path = os.path.join(d.data_dir, "emitterd.db")
    c.publish(batch(16, 0))
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM chunks").fetchone()[0] >= 1  # a snapshot
        positions: List[int] = []
        for k in range(1, 41):            # ~2.5 MiB of WAL past the reader's snapshot
            positions += c.publish(batch(64, k * 64))["positions"]
        assert positions == list(range(17, 17 + 40 * 64))
        wait_for(lambda: "the WAL cannot be rewound" in open(d.log_path).read(), 30,
                 "a warning that the WAL cannot be rewound; log:\n" + d.log_tail())
        line = [ln for ln in open(d.log_path) if "the WAL cannot be rewound" in ln][0]
        assert "emitterd.db-wal" in line and "wal_mib=" in line
        # publishes are still stored and answered while the reader holds on
        assert c.publish(batch(4, 9000))["positions"] == list(range(17 + 40 * 64, 21 + 40 * 64))
    finally:
        reader.execute("COMMIT")
        reader.close()
    wait_for(lambda: "WAL rewound again" in open(d.log_path).read(), 30,
             "the end of the reader noticed; log:\n" + d.log_tail())
    assert open(d.log_path).read().count("the WAL cannot be rewound") == 1, \
        "warned more than once in well under STUCK_WARN_EVERY"
