"""Event logs as older emitterds left them, for the upgrade tests."""
import os
import sqlite3

import msgpack

HERE = os.path.dirname(os.path.abspath(__file__))


def write_v2_log(data_dir: str, n: int, ids: bool = False) -> None:
    """A log as emitterd 0.1 (schema v2: one row per event) left it: `n` events of stream
    "s", type "T", with ids "v2-<position>" (in event_ids too when `ids`)."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    db = sqlite3.connect(os.path.join(data_dir, "emitterd.db"), isolation_level=None)
    with open(os.path.join(HERE, "data_v2_schema.sql")) as f:
        db.executescript(f.read())
    db.execute("INSERT INTO meta (name, value) VALUES ('id_salt', ?)", ((12345).to_bytes(8, "big"),))
    pack = msgpack.Packer(use_bin_type=True).pack
    for pos in range(1, n + 1):
        body = b"".join(pack(k) + pack(v) for k, v in (
            ("position", pos), ("id", "v2-%d" % pos), ("stream", "s"), ("version", pos - 1),
            ("type", "T"), ("data", None), ("metadata", {}), ("tags", []), ("timestamp", 1)))
        db.execute("INSERT INTO events VALUES (?, 's', ?, 'T', NULL, ?)", (pos, pos - 1, body))
        if ids:
            db.execute("INSERT INTO event_ids VALUES (?, ?, ?)", ("v2-%d" % pos, pos, pos - 1))
    db.execute("INSERT INTO streams VALUES ('s', ?)", (n - 1,))
    db.close()
