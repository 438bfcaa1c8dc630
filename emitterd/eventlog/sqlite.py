"""SQLite backend of the event log: one file in the data dir, WAL, single writer."""
import os
import secrets
import sqlite3
import time
import uuid
from typing import Iterable, Optional

import msgpack

from emitterd import logs
from emitterd.errors import CONFLICT, UNAVAILABLE, ProtocolError
from emitterd.eventlog import EventLog, EventRecord
from emitterd.paths import ensure_private_dir

# The events table has no secondary index: every event pays only for its own row.
# Stream heads live in `streams` (one upsert per stream per transaction) and client ids in
# `event_ids` (written only for events that carry one), so publishers without ids pay nothing
# for idempotency.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    position  INTEGER PRIMARY KEY,
    stream    TEXT NOT NULL,
    version   INTEGER NOT NULL,
    type      TEXT NOT NULL,
    tags      BLOB,
    body      BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS streams (
    stream  TEXT PRIMARY KEY,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_ids (
    id       TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    version  INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    key        TEXT PRIMARY KEY,
    spec       BLOB NOT NULL,
    desired    TEXT NOT NULL,
    checkpoint INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS parked (
    key      TEXT NOT NULL,
    position INTEGER NOT NULL,
    reason   TEXT NOT NULL,
    PRIMARY KEY (key, position)
) WITHOUT ROWID;
"""

# Version 1 (before 0.1.0 was tagged) indexed every event twice; move it to the tables above.
MIGRATE_FROM_V1 = """
BEGIN IMMEDIATE;
CREATE TABLE streams (stream TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO streams SELECT stream, MAX(version) FROM events GROUP BY stream;
CREATE TABLE event_ids (id TEXT PRIMARY KEY, position INTEGER NOT NULL, version INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO event_ids SELECT client_id, position, version FROM events WHERE client_id IS NOT NULL;
DROP INDEX IF EXISTS events_stream_version;
DROP INDEX IF EXISTS events_client_id;
ALTER TABLE events DROP COLUMN client_id;
COMMIT;
"""

log = logs.get("eventlog")
_pack = msgpack.Packer(use_bin_type=True).pack
K_POSITION, K_ID, K_STREAM, K_VERSION, K_TYPE, K_TIMESTAMP = (
    _pack(k) for k in ("position", "id", "stream", "version", "type", "timestamp"))

_POS_MASK = (1 << 62) - 1
_STREAM_CACHE_MAX = 200_000


def generated_id(salt: int, position: int) -> str:
    """A UUIDv8 that encodes this store's salt and the position, so that a republished
    generated id is recognised without indexing generated ids (only client ids are indexed)."""
    return _id_prefix(salt) + "%04x-%012x" % (0x8000 | (position >> 48), position & 0xFFFFFFFFFFFF)


def _id_prefix(salt: int) -> str:
    """The first three groups of a generated id: they depend on the salt only."""
    hi = salt >> 12
    return "%08x-%04x-8%03x-" % (hi >> 16, hi & 0xFFFF, salt & 0xFFF)


def generated_position(salt: int, text: str) -> Optional[int]:
    """The position encoded in an id made by generated_id() with this salt, else None."""
    if len(text) != 36:
        return None
    try:
        n = uuid.UUID(text).int
    except ValueError:
        return None
    if (n >> 76) & 0xF != 8 or (n >> 62) & 0b11 != 0b10:
        return None
    if (((n >> 80) << 12) | ((n >> 64) & 0xFFF)) != salt or generated_id(salt, n & _POS_MASK) != text:
        return None
    return n & _POS_MASK


class SqliteLog(EventLog):
    def __init__(self, data_dir: str, synchronous: str = "full", tail_events: int = 65536,
                 tail_bytes: int = 64 << 20) -> None:
        ensure_private_dir(data_dir)
        self.path = os.path.join(data_dir, "emitterd.db")
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=%s" % ("FULL" if synchronous == "full" else "NORMAL"))
        self._db.execute("PRAGMA busy_timeout=2000")
        cols = [r[1] for r in self._db.execute("PRAGMA table_info(events)")]
        if "client_id" in cols:
            self._db.executescript(MIGRATE_FROM_V1)
        self._db.executescript(SCHEMA)
        os.chmod(self.path, 0o600)
        salt = self.meta("id_salt")
        if salt is None:
            salt = secrets.randbits(60).to_bytes(8, "big")
            self._db.execute("INSERT INTO meta (name, value) VALUES ('id_salt', ?)", (salt,))
        self._salt = int.from_bytes(salt, "big")
        self._id_prefix = _id_prefix(self._salt)
        row = self._db.execute("SELECT MAX(position) FROM events").fetchone()
        self.head = row[0] or 0
        self._stream_versions: dict = {}
        self._tail: list = []
        self._tail_start = self.head + 1
        # recent events stay in memory so live pools never query SQLite; bounded twice
        self._tail_max = max(1024, tail_events)
        self._tail_bytes_max = tail_bytes
        self._tail_bytes = 0

    # ---- events --------------------------------------------------------------
    def _stream_version(self, stream: str, overlay: dict) -> int:
        v = overlay.get(stream)
        if v is not None:
            return v
        v = self._stream_versions.get(stream)
        if v is None:
            row = self._db.execute("SELECT version FROM streams WHERE stream = ?",
                                   (stream,)).fetchone()
            v = -1 if row is None else row[0]
            if len(self._stream_versions) >= _STREAM_CACHE_MAX:
                self._stream_versions.clear()
            self._stream_versions[stream] = v
        return v

    def _lookup_id(self, event_id: str) -> Optional[tuple]:
        pos = generated_position(self._salt, event_id)
        if pos is not None and pos <= self.head:
            row = self._db.execute("SELECT position, version FROM events WHERE position = ?",
                                   (pos,)).fetchone()
        else:
            row = self._db.execute("SELECT position, version FROM event_ids WHERE id = ?",
                                   (event_id,)).fetchone()
        return tuple(row) if row else None

    def append(self, batches: list) -> list:
        ts = _pack(int(time.time() * 1_000_000))
        pos = self.head
        overlay: dict = {}
        ids: dict = {}     # client id -> (position, version), new in this transaction
        rows = []
        records = []
        prefix = self._id_prefix
        for b in batches:
            if b.expected_version is not None:
                stream = b.events[0].stream
                current = self._stream_version(stream, overlay)
                if current != b.expected_version:
                    b.result = ProtocolError(CONFLICT, "stream %r is at version %d, expected %d"
                                             % (stream, current, b.expected_version),
                                             {"stream": stream, "current_version": current})
                    continue
            positions = []
            versions = []
            for e in b.events:
                eid = e.id
                if eid is not None:
                    hit = ids.get(eid) or self._lookup_id(eid)
                    if hit is not None:
                        positions.append(hit[0])
                        versions.append(hit[1])
                        continue
                pos += 1
                stream = e.stream
                version = overlay.get(stream)
                version = (self._stream_version(stream, overlay) if version is None else version) + 1
                overlay[stream] = version
                if eid is not None:
                    ids[eid] = (pos, version)
                    gen = eid
                else:
                    gen = prefix + "%04x-%012x" % (0x8000 | (pos >> 48), pos & 0xFFFFFFFFFFFF)
                body = b"".join((K_POSITION, _pack(pos), K_ID, _pack(gen), K_STREAM, _pack(stream),
                                 K_VERSION, _pack(version), K_TYPE, _pack(e.type), e.payload,
                                 K_TIMESTAMP, ts))
                tags = e.tags
                rows.append((pos, stream, version, e.type, _pack(tags) if tags else None, body))
                records.append(EventRecord(pos, stream, e.type, tags, body))
                positions.append(pos)
                versions.append(version)
            b.result = {"positions": positions, "versions": versions}
        if not rows:
            return []
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT INTO events (position, stream, version, type, tags, body) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", rows)
            self._db.executemany("INSERT INTO streams (stream, version) VALUES (?, ?) ON CONFLICT "
                                 "(stream) DO UPDATE SET version = excluded.version",
                                 overlay.items())
            if ids:
                self._db.executemany("INSERT INTO event_ids (id, position, version) VALUES (?, ?, ?)",
                                     [(i, p, v) for i, (p, v) in ids.items()])
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            log.error("publish failed: the event log could not store the events", error=str(e),
                      events=len(rows))
            err = ProtocolError(UNAVAILABLE, "the event log could not store the events: %s" % e)
            for b in batches:
                if isinstance(b.result, dict):
                    b.result = err
            return []
        self.head = pos
        self._stream_versions.update(overlay)
        self._tail.extend(records)
        self._tail_bytes += sum(len(r.body) for r in records)
        if len(self._tail) > self._tail_max * 2 or self._tail_bytes > self._tail_bytes_max:
            drop = max(0, len(self._tail) - self._tail_max)
            kept_bytes = self._tail_bytes - sum(len(r.body) for r in self._tail[:drop])
            while kept_bytes > self._tail_bytes_max // 2 and drop < len(self._tail):
                kept_bytes -= len(self._tail[drop].body)
                drop += 1
            del self._tail[:drop]
            self._tail_start += drop
            self._tail_bytes = kept_bytes
        return records

    def read(self, start: int, limit: int) -> list:
        if start > self.head or limit <= 0:
            return []
        if start >= self._tail_start:
            i = start - self._tail_start
            return self._tail[i:i + limit]
        rows = self._db.execute("SELECT position, stream, type, tags, body FROM events "
                                "WHERE position >= ? ORDER BY position LIMIT ?",
                                (start, limit)).fetchall()
        return [EventRecord(p, s, t, msgpack.unpackb(tg) if tg else [], body)
                for p, s, t, tg, body in rows]

    def get(self, positions: Iterable[int]) -> dict:
        out = {}
        wanted = []
        for p in positions:
            if self._tail_start <= p <= self.head:
                out[p] = self._tail[p - self._tail_start]
            else:
                wanted.append(p)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            q = "SELECT position, stream, type, tags, body FROM events WHERE position IN (%s)" % (
                ",".join("?" * len(chunk)))
            for p, s, t, tg, body in self._db.execute(q, chunk):
                out[p] = EventRecord(p, s, t, msgpack.unpackb(tg) if tg else [], body)
        return out

    # ---- subscriptions and checkpoints ---------------------------------------
    def load_subscriptions(self) -> list:
        rows = self._db.execute("SELECT key, spec, desired, checkpoint, created_at "
                                "FROM subscriptions ORDER BY created_at, key").fetchall()
        return [{"key": k, "spec": msgpack.unpackb(s, raw=False, strict_map_key=False),
                 "desired": d, "checkpoint": c, "created_at": t} for k, s, d, c, t in rows]

    def save_subscription(self, key: str, spec: dict, desired: str, checkpoint: int,
                          created_at: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO subscriptions (key, spec, desired, checkpoint, "
                         "created_at) VALUES (?, ?, ?, ?, ?)",
                         (key, _pack(spec), desired, checkpoint, created_at))

    def delete_subscription(self, key: str) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        self._db.execute("DELETE FROM subscriptions WHERE key = ?", (key,))
        self._db.execute("DELETE FROM parked WHERE key = ?", (key,))
        self._db.execute("COMMIT")

    def save_checkpoints(self, checkpoints: dict) -> None:
        if not checkpoints:
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._db.executemany("UPDATE subscriptions SET checkpoint = ? WHERE key = ?",
                             [(c, k) for k, c in checkpoints.items()])
        self._db.execute("COMMIT")

    # ---- parked events -------------------------------------------------------
    def park(self, key: str, items: list) -> None:
        self._db.executemany("INSERT OR REPLACE INTO parked (key, position, reason) VALUES (?, ?, ?)",
                             [(key, p, r) for p, r in items])

    def parked(self, key: str, limit: int) -> list:
        return [tuple(r) for r in self._db.execute(
            "SELECT position, reason FROM parked WHERE key = ? ORDER BY position LIMIT ?",
            (key, limit))]

    def unpark(self, key: str, positions: list) -> int:
        n = 0
        for p in positions:
            n += self._db.execute("DELETE FROM parked WHERE key = ? AND position = ?",
                                  (key, p)).rowcount
        return n

    def parked_count(self, key: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM parked WHERE key = ?", (key,)).fetchone()[0]

    def external_checkpoints(self) -> None:
        """Another connection (the checkpointer process) runs the WAL checkpoints from now on."""
        self._db.execute("PRAGMA wal_autocheckpoint=0")

    def meta(self, name: str) -> Optional[bytes]:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self._db.close()
