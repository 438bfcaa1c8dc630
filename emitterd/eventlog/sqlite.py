"""SQLite backend of the event log: one file in the data dir, WAL, single writer."""
import contextlib
import ctypes
import functools
import os
import re
import secrets
import sqlite3
import stat
import time
import uuid
from collections import OrderedDict
from itertools import count
from typing import Any, Callable, Iterable, Iterator, Optional

import msgpack
import msgspec

from emitterd import logs
from emitterd.errors import CONFLICT, UNAVAILABLE, ProtocolError, invalid
from emitterd.eventlog import EVENT_MAP_HEADER, FIRST_ATTEMPT, NO_TAGS, EventLog, EventRecord
from emitterd.paths import ensure_private_dir

# Events are stored by the chunk: the consecutive events one transaction appends, their bodies
# concatenated in one row, so an event costs a share of a row instead of a row of its own (SQLite's
# cost is mostly per row). Stream heads live in `streams` (one upsert per stream per transaction)
# and client ids in `event_ids` (written only for events that carry one), so publishers without
# ids pay nothing for idempotency. A chunk holds positions first..last, every one of them.
# The stream heads are saved lazily (with the checkpoints, about once a second, and on close):
# `streams` holds every stream's version as of position meta.streams_through, and opening the
# log reads the versions of the events after it back from their chunks (each event carries
# its version), so a crash loses nothing and a publish does not rewrite the table's page.
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    first   INTEGER PRIMARY KEY,
    last    INTEGER NOT NULL,
    bodies  BLOB NOT NULL
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
    created_at INTEGER NOT NULL,
    subscriber_rights BLOB
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
_packer = msgpack.Packer(use_bin_type=True)
_pack = _packer.pack


def _find_sync_file_range() -> Optional[Callable[[int], Any]]:
    """Linux's sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE): start writing a file's dirty
    pages back without waiting. Not in the os module; None where libc lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return lambda fd: fn(fd, 0, 0, 2)


_start_writeback = _find_sync_file_range()

# Bounds of one chunk row: few enough events that a cold read of one position decodes little,
# large enough that the per-row cost vanishes.
CHUNK_EVENTS = 1024
CHUNK_BYTES = 1 << 20
# Larger pages hold a chunk in fewer overflow pages; SQLite applies it to new files only.
PAGE_SIZE = 16384
_INSERT_CHUNK = "INSERT INTO chunks (first, last, bodies) VALUES (?, ?, ?)"
_CHUNK_AT = "SELECT first, last, bodies FROM chunks WHERE first <= ? ORDER BY first DESC LIMIT 1"
# chunks are in position order: the last one ends at the head (MAX(last) would scan)
HEAD_SQL = "SELECT last FROM chunks ORDER BY first DESC LIMIT 1"
TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))


# PRAGMA user_version of the log this code writes; a log with a higher one is a newer
# emitterd's (refused: there is no downgrade). Logs before it carry 0 and are migrated.
# Raised only for a change an older emitterd could not live with: a column that it leaves
# alone (subscriptions.subscriber_rights) is found by PRAGMA table_info instead.
SCHEMA_VERSION = 3


class LogUnusable(RuntimeError):
    """The event log's files are there but cannot be used as they are; the message says why
    and what to do."""


def _check_usable(path: str) -> None:
    """Refuse, in words, what SQLite would open wrongly (read-only, or as a new empty log)
    or report only as "unable to open database file"."""
    if not os.path.lexists(path) and os.path.lexists(path + ".restoring"):
        # backup.restore moves the old log aside, then renames this in: killed between the
        # two, a start here would begin a new, empty log
        raise LogUnusable("%s is missing and %s.restoring is there: a restore was interrupted; "
                          "run `emitterd restore` again (the log it replaced is in a "
                          "replaced-* directory beside it)" % (path, path))
    for p in (path, path + "-wal", path + "-shm"):
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            raise LogUnusable("%s is a directory, not the event log" % p)
        if not stat.S_ISREG(st.st_mode):
            # a FIFO would block the open below (and SQLite's) for good, without a word
            raise LogUnusable("%s is not a regular file (mode %06o), not the event log"
                              % (p, st.st_mode))
        if not os.access(p, os.R_OK | os.W_OK):
            # SQLite would open the log read-only: the daemon would start, and every
            # publish would fail
            raise LogUnusable("%s is not readable and writable by uid %d (mode %04o, owner "
                              "uid %d): the daemon writes the event log"
                              % (p, os.geteuid(), stat.S_IMODE(st.st_mode), st.st_uid))


def _sync_left_over(path: str) -> None:
    """fdatasync the log and its WAL as an earlier run left them: killed between a commit's
    write and its fdatasync, that run left events the kernel holds but the disk may not.
    Everything in the log at open is taken for durable (delivered, and a publish retried by
    id answered with its position), so it is made so first. Raises OSError."""
    for name in (path + "-wal", path):
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
        except OSError as e:
            raise OSError(e.errno, "what an earlier run wrote to the event log cannot be made "
                          "durable: %s" % e.strerror, name) from None
        finally:
            os.close(fd)


def tables_of(db: sqlite3.Connection) -> set:
    """The names of the tables in a database."""
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
_UPSERT_MAX = 256
# The WAL is written ahead at open to at most this much (wal_rewind_bytes may be set far
# higher to rewind rarely), and only where that leaves at least as much free space again.
WAL_PREFILL_MAX = 256 << 20


@functools.lru_cache(maxsize=None)
def _upsert_streams(n: int) -> str:
    return ("INSERT INTO streams (stream, version) VALUES %s ON CONFLICT (stream) "
            "DO UPDATE SET version = excluded.version" % ", ".join(["(?, ?)"] * n))


K_POSITION, K_ID, K_VERSION, K_TIMESTAMP = (_pack(k) for k in ("position", "id", "version",
                                                                 "timestamp"))
_LOW_HEX = [b"%03x" % i for i in range(4096)]
_POS_MASK = (1 << 62) - 1
_STREAM_CACHE_MAX = 200_000
TAIL_COMPACT_MIN = 4096


def _chunked(first: int, bodies: list) -> list:
    """Chunk rows (first, last, bodies) for consecutive bodies from position `first` on."""
    rows = []
    i = 0
    n = len(bodies)
    while i < n:
        j = i + 1           # a body over CHUNK_BYTES gets a chunk of its own
        size = len(bodies[i])
        while j < n and j - i < CHUNK_EVENTS and size + len(bodies[j]) <= CHUNK_BYTES:
            size += len(bodies[j])
            j += 1
        rows.append((first + i, first + j - 1, b"".join(bodies[i:j])))
        i = j
    return rows


class _StoredHead(msgspec.Struct, gc=False):
    """What a record holds of a stored event map; decoding skips the rest (data, metadata, the
    ids) without building it."""
    position: int
    stream: str
    type: str
    tags: list = []


_decode_heads = msgspec.msgpack.Decoder(list[_StoredHead]).decode
_decode_spans = msgspec.msgpack.Decoder(list[msgspec.Raw]).decode
# Chunks decoded for cold reads, kept because a pool catching up reads a chunk in several
# parts (SCAN_CHUNK events at a time, from wherever its window let it stop): a few, so that
# pools catching up at different positions do not evict each other's at every read, and
# bounded in bytes too (a chunk of one event may be as large as max_event_bytes allows).
COLD_CHUNKS_KEPT = 4
COLD_BYTES_KEPT = 4 << 20


def _chunk_records(first: int, last: int, bodies: bytes) -> list:
    """The EventRecords of one chunk row, decoded by msgspec in two passes of C code (the
    headers, then each body's bytes); raises _damaged if the row does not hold exactly
    the events first..last."""
    buf = _packer.pack_array_header(last - first + 1) + bodies     # the chunk as one array
    try:
        heads = _decode_heads(buf)
        spans = _decode_spans(buf)
    except msgspec.MsgspecError:      # not msgpack, not that many maps, a field missing...
        raise _damaged(first, (first, last)) from None
    for h, p in zip(heads, count(first)):
        if h.position != p:
            raise _damaged(p, (first, last))
    return [EventRecord(h.position, h.stream, h.type, h.tags or NO_TAGS, bytes(b))
            for h, b in zip(heads, spans)]


def _record(event: dict, body: bytes) -> EventRecord:
    """The EventRecord of an event decoded from its chunk."""
    return EventRecord(event["position"], event["stream"], event["type"], event["tags"] or NO_TAGS,
                       body)


def _damaged(position: int, chunk: Optional[tuple]) -> sqlite3.DatabaseError:
    where = "in no chunk" if chunk is None else "not in its chunk %d..%d" % chunk
    return sqlite3.DatabaseError("the event log is damaged: position %d is %s" % (position, where))


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
                 tail_bytes: int = 64 << 20, wal_bytes: int = 0) -> None:
        ensure_private_dir(data_dir)
        self.path = os.path.join(data_dir, "emitterd.db")
        _check_usable(self.path)
        _sync_left_over(self.path)
        self._full = synchronous == "full"
        self._unsynced = False        # an append(defer_sync=True) not yet followed by sync()
        self._wal_fd = -1
        self._wal_ino = -1
        self._wal_checked = False     # _wal_fd checked against the file since the last sync()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # checked before anything writes the file (WAL mode does): a refusal changes nothing
        tables = tables_of(self._db)
        if tables and not tables & {"meta", "chunks", "events"}:
            # some other program's database where ours belongs: never add our tables to it
            self._db.close()
            raise sqlite3.DatabaseError("%s is not an emitterd event log (its tables: %s)"
                                        % (self.path, ", ".join(sorted(tables)[:5])))
        stored = self._db.execute("PRAGMA user_version").fetchone()[0]
        if stored > SCHEMA_VERSION:
            self._db.close()
            raise LogUnusable(
                "%s was written by a newer emitterd (log schema %d; this one knows up to %d): "
                "there is no downgrade; run the newer version, or restore a backup taken "
                "before the upgrade" % (self.path, stored, SCHEMA_VERSION))
        # a page size is fixed at creation: before WAL mode writes the file
        self._db.execute("PRAGMA page_size=%d" % PAGE_SIZE)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=%s" % ("FULL" if synchronous == "full" else "NORMAL"))
        self._db.execute("PRAGMA busy_timeout=2000")
        cols = [r[1] for r in self._db.execute("PRAGMA table_info(events)")]
        if cols and "chunks" in tables and self._db.execute(
                "SELECT 1 FROM chunks LIMIT 1").fetchone():
            # an older emitterd (one row per event) opened this migrated log: it does not
            # refuse, but sees no events and writes positions the chunks already hold
            self._db.close()
            raise LogUnusable(
                "%s was written by an older emitterd after this one had converted it (it has "
                "both the old events table and chunks): the two disagree on positions; "
                "restore the backup taken before the upgrade (emitterd restore)" % self.path)
        if "client_id" in cols:
            self._db.executescript(MIGRATE_FROM_V1)
        self._db.executescript(SCHEMA)
        if cols:
            self._migrate_v2()
        if "subscriber_rights" not in {r[1] for r in self._db.execute(
                "PRAGMA table_info(subscriptions)")}:
            # a log from before this column: NULL, the subscriptions stored then were judged at
            # their start only (as are those an older emitterd writes, which leaves it NULL)
            self._db.execute("ALTER TABLE subscriptions ADD COLUMN subscriber_rights BLOB")
        if stored != SCHEMA_VERSION:
            self._db.execute("PRAGMA user_version=%d" % SCHEMA_VERSION)
        os.chmod(self.path, 0o600)
        salt = self.meta("id_salt")
        if salt is None:
            salt = secrets.randbits(60).to_bytes(8, "big")
            self._db.execute("INSERT INTO meta (name, value) VALUES ('id_salt', ?)", (salt,))
        self._salt = int.from_bytes(salt, "big")
        # the salts of this log before a restore drew a new one (emitterd.backup), with the
        # last position each gave ids to
        before = self.meta("id_salts_before")
        self._salts_before = [(int.from_bytes(s, "big"), last)
                              for s, last in (msgpack.unpackb(before) if before else [])]
        row = self._db.execute(HEAD_SQL).fetchone()
        self.head = row[0] if row else 0
        self.durable = self.head      # events up to here are on disk (sync() moves it)
        self._stream_versions: dict = {}
        self._unsaved: dict = {}      # stream -> version, newer than the streams table
        if self.meta("streams_through") is None:
            # An older log (migrated above) saved every stream's version on each commit:
            # its table is complete. Any other log without the mark is new, or was killed
            # before its first save: its streams table may lack what its events say.
            through = self.head if cols else 0
            self._db.execute("INSERT INTO meta (name, value) VALUES ('streams_through', ?)",
                             (through.to_bytes(8, "big"),))
        self._recover_stream_heads()
        # _tail[_tail_off:] are the records from _tail_start on; the slots before _tail_off
        # are already dropped (None), compacted away now and then
        self._tail: list = []
        self._tail_off = 0
        self._tail_start = self.head + 1
        # recent events stay in memory so live pools never query SQLite; bounded twice
        self._tail_max = max(1024, tail_events)
        self._tail_bytes_max = tail_bytes
        self._tail_bytes = 0
        # first -> (last, records, bytes), least recently used first: see COLD_CHUNKS_KEPT
        self._cold: OrderedDict = OrderedDict()
        self._cold_ids: dict = {}     # in append(): position -> (id, version) read ahead
        self._cold_bytes = 0
        if self._full and wal_bytes > 0:
            self._prefill_wal(wal_bytes)
        if self._full:
            # the fd every sync() uses, opened now: opened at the first publish, a daemon out
            # of file descriptors by then could not make that publish durable
            try:
                self._wal()
            except OSError:
                pass           # no WAL yet: the first commit makes it, and sync() opens it

    def _migrate_v2(self) -> None:
        """Version 2 stored one row per event, its body without map header and attempt: move
        them into chunks, in one transaction (a crash leaves version 2, migrated again)."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            n = 0
            cur = db.execute("SELECT position, body FROM events ORDER BY position")
            while True:
                rows = cur.fetchmany(4 * CHUNK_EVENTS)
                if not rows:
                    break
                n += len(rows)
                # runs of consecutive positions, each chunked as append() would
                i = 0
                while i < len(rows):
                    j = i + 1
                    while j < len(rows) and rows[j][0] == rows[j - 1][0] + 1:
                        j += 1
                    db.executemany(_INSERT_CHUNK, _chunked(
                        rows[i][0], [EVENT_MAP_HEADER + body + FIRST_ATTEMPT
                                     for _, body in rows[i:j]]))
                    i = j
            db.execute("DROP TABLE events")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        log.info("event log moved to one row per chunk of events", events=n)

    def _recover_stream_heads(self) -> None:
        """Versions of the streams written after the last save of the heads, from the events
        themselves (only after a crash)."""
        through = int.from_bytes(self.meta("streams_through") or b"", "big")
        if through >= self.head:
            return
        n = 0
        for event, _ in self._cold_events(range(through + 1, self.head + 1)):
            self._unsaved[event["stream"]] = event["version"]
            n += 1
        log.info("stream heads read back from the log", events=n, streams=len(self._unsaved))

    # ---- events --------------------------------------------------------------
    def _stream_version(self, stream: str, overlay: dict) -> int:
        v = overlay.get(stream)
        if v is not None:
            return v
        v = self._unsaved.get(stream)
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

    def _check_ids(self, events: list) -> Optional[ProtocolError]:
        """A client id in the generated form of a position not yet given out is refused:
        the event at that position would be given the same id. The events older than the
        tail that generated-form ids name are read here, each chunk once, for _lookup_id: a
        retry of 10,000 events by their generated ids read a chunk row per id (seconds)."""
        cold = []
        for i, ev in enumerate(events):
            if ev.id is not None:
                pos = generated_position(self._salt, ev.id)
                if pos is not None and pos > self.head:
                    return invalid("events.%d.id" % i, "id %r has the form of the ids this "
                                   "store generates, for a position not yet used" % ev.id)
                if pos is None:
                    pos = self._position_before_restore(ev.id)
                if pos is not None and pos < self._tail_start and pos not in self._cold_ids:
                    cold.append(pos)
        if cold:
            for event, _ in self._cold_events(sorted(set(cold))):
                self._cold_ids[event["position"]] = (event["id"], event["version"])
        return None

    def _all_stored(self, events: list, ids: dict) -> bool:
        """Every event has an id already in the log (or earlier in this transaction)."""
        return all(ev.id is not None and (ev.id in ids or self._lookup_id(ev.id) is not None)
                   for ev in events)

    def _position_before_restore(self, event_id: str) -> Optional[int]:
        """The position in an id generated under a salt this log had before a restore, if
        the restore kept it (one given out after the backup went with the events dropped)."""
        for salt, last in self._salts_before:
            pos = generated_position(salt, event_id)
            if pos is not None:
                return pos if pos <= last else None
        return None

    def _lookup_id(self, event_id: str) -> Optional[tuple]:
        pos = generated_position(self._salt, event_id)
        if pos is None:
            pos = self._position_before_restore(event_id)
        if pos is not None and pos <= self.head:
            if pos >= self._tail_start:
                event = self._tail[pos - self._tail_start + self._tail_off].decode()
                found = (event["id"], event["version"])
            else:
                found = self._cold_ids.get(pos)     # read by _check_ids
                if found is None:
                    for event, _ in self._cold_events([pos]):
                        found = (event["id"], event["version"])
            # the id has the generated form of pos, but the event there may carry a
            # client's id: then this id was never given out, and the index decides
            if found is not None and found[0] == event_id:
                return (pos, found[1])
        row = self._db.execute("SELECT position, version FROM event_ids WHERE id = ?",
                               (event_id,)).fetchone()
        return tuple(row) if row else None

    def append(self, batches: list, defer_sync: bool = False, defer_trim: bool = False) -> list:
        """See EventLog.append. With defer_sync (and synchronous=full) the commit is written
        but not yet on disk: the caller must call sync() before anyone sees the new events
        or is answered, and may do other work meanwhile (the disk is already writing).
        With defer_trim the tail may pass its bounds until the caller calls trim_tail()."""
        ts = int(time.time() * 1_000_000)
        pos = self.head
        overlay: dict = {}
        ids: dict = {}     # client id -> (position, version), new in this transaction
        bodies: list = []
        records: list = []
        add_body = bodies.append
        add_record = records.append
        pack = _pack
        join = b"".join
        closing = K_TIMESTAMP + _pack(ts) + FIRST_ATTEMPT
        salt = self._salt
        low_hex = _LOW_HEX
        high = -1
        id_entry = b""
        self._cold_ids = {}
        for b in batches:
            reserved = self._check_ids(b.events)
            if reserved is not None:
                b.result = reserved
                continue
            if b.expected_version is not None:
                stream = b.events[0].stream
                current = self._stream_version(stream, overlay)
                # a retry of a publish already stored (every event's id in the log) gets its
                # positions back, as any publish by id does, not a conflict with itself
                if current != b.expected_version and not self._all_stored(b.events, ids):
                    b.result = ProtocolError(CONFLICT, "stream %r is at version %d, expected %d"
                                             % (stream, current, b.expected_version),
                                             {"stream": stream, "current_version": current})
                    continue
            positions: list = []
            versions: list = []
            add_position = positions.append
            add_version = versions.append
            for ev in b.events:
                stream = ev.stream
                eid = ev.id
                if eid is not None:
                    hit = ids.get(eid) or self._lookup_id(eid)
                    if hit is not None:
                        add_position(hit[0])
                        add_version(hit[1])
                        continue
                pos += 1
                version = overlay.get(stream)
                version = (self._stream_version(stream, overlay) if version is None else version) + 1
                overlay[stream] = version
                # the entries that depend on the position, joined with the head: two small
                # pack() calls and constant keys beat packing one array of them (measured);
                # the timestamp is the transaction's and "attempt" 1 comes last, where
                # encoded() finds it; a client id is in the head already
                if eid is None:
                    if pos >> 12 != high:
                        high = pos >> 12       # the generated id's entry, but its last 3 digits
                        id_entry = K_ID + pack(generated_id(salt, pos))[:-3]
                    body = join((EVENT_MAP_HEADER, ev.head, K_POSITION, pack(pos), id_entry,
                                 low_hex[pos & 0xFFF], K_VERSION, pack(version), closing))
                else:
                    ids[eid] = (pos, version)
                    body = join((EVENT_MAP_HEADER, ev.head, K_POSITION, pack(pos), K_VERSION,
                                 pack(version), closing))
                add_body(body)
                add_record(EventRecord(pos, stream, ev.type, ev.tags or NO_TAGS, body))
                add_position(pos)
                add_version(version)
            b.result = {"positions": positions, "versions": versions}
        self._cold_ids = {}
        if not records:
            return []
        first = self.head + 1
        size = sum(map(len, bodies))
        if len(bodies) <= CHUNK_EVENTS and size <= CHUNK_BYTES:
            chunks = [(first, pos, b"".join(bodies))]
        else:
            chunks = _chunked(first, bodies)
        # deferred: this one commit skips SQLite's fsync of the WAL; sync() does it
        deferred = defer_sync and self._full
        try:
            if deferred:
                self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("BEGIN IMMEDIATE")
            if len(chunks) == 1:
                self._db.execute(_INSERT_CHUNK, chunks[0])
            else:
                self._db.executemany(_INSERT_CHUNK, chunks)
            if ids:
                self._db.executemany("INSERT INTO event_ids (id, position, version) VALUES (?, ?, ?)",
                                     [(i, p, v) for i, (p, v) in ids.items()])
            self._db.execute("COMMIT")
            if deferred:
                self._unsynced = True
                self._db.execute("PRAGMA synchronous=FULL")
                self._start_writeback()
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if deferred:
                self._db.execute("PRAGMA synchronous=FULL")
            log.error("publish failed: the event log could not store the events", error=str(e),
                      events=len(records))
            self._restart_wal()
            err = ProtocolError(UNAVAILABLE, "the event log could not store the events: %s" % e)
            for b in batches:
                if isinstance(b.result, dict):
                    b.result = err
            return []
        self.head = pos
        if not deferred:
            # SQLite synced this commit, and with it the WAL written before it
            self._unsynced = False
            self.durable = pos
        self._stream_versions.update(overlay)
        self._unsaved.update(overlay)
        self._tail.extend(records)
        self._tail_bytes += size
        if not defer_trim:
            self.trim_tail()
        return records

    def sync(self) -> None:
        """Make every append so far durable (fdatasync of the WAL, if one was deferred).
        Raises OSError: then it is unknown what reached the disk, and the caller must not
        answer or deliver those events (the daemon exits)."""
        if self._unsynced:
            os.fdatasync(self._wal_fd if self._wal_checked else self._wal())
            self._unsynced = False
        self._wal_checked = False
        self.durable = self.head

    def _start_writeback(self) -> None:
        """Let the disk start on the commit now; only a head start for sync(), so a failure
        here is sync()'s to report. The WAL's fd it checks serves that sync() too (one
        stat of the file per commit, not two)."""
        try:
            fd = self._wal()
        except OSError:
            return
        self._wal_checked = True
        if _start_writeback is not None:
            try:
                _start_writeback(fd)
            except OSError:
                pass

    def _prefill_wal(self, nbytes: int) -> None:
        """Write zeros past the end of the WAL up to `nbytes`, once, at open: a commit that
        grows the file makes its fdatasync commit the new size too (measured on ext4: 0.31
        vs 0.19 ms per 80 KB commit), so without this the commits of the first WAL cycle
        after every start are slower than the later ones, which rewrite blocks the file
        has. SQLite reads a WAL only up to its first invalid frame, so the zeros are never
        taken for frames (as after a rewind, old frames past the new ones are not either);
        what is before them, a WAL left by a crash, is not touched. Nothing writes the WAL
        yet. A failure (a full disk) leaves the file as it was: the zeros are only a speed-up."""
        wal = self.path + "-wal"
        try:
            fd = os.open(wal, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as e:
            log.warning("WAL not prefilled", error=str(e))
            return
        try:
            nbytes = min(nbytes, WAL_PREFILL_MAX)
            size = os.fstat(fd).st_size
            if size >= nbytes:
                return
            st = os.fstatvfs(fd)
            if st.f_bavail * st.f_frsize < 2 * (nbytes - size):
                log.info("WAL not prefilled: little free space", bytes=nbytes,
                         free=st.f_bavail * st.f_frsize)
                return
            zeros = bytes(1 << 20)
            at = size
            try:
                while at < nbytes:
                    n = os.pwrite(fd, zeros[:nbytes - at], at)
                    if n <= 0:
                        raise OSError("no room written at offset %d" % at)
                    at += n
                os.fdatasync(fd)
            except OSError as e:
                log.warning("WAL not prefilled", error=str(e), bytes=nbytes)
                try:
                    os.ftruncate(fd, size)
                except OSError:
                    pass        # zeros past the last frame are harmless, just not useful
                return
            log.debug("WAL prefilled", bytes=nbytes, was=size)
        finally:
            os.close(fd)

    def _wal(self) -> int:
        """An fd of the WAL file SQLite writes (its name is fixed: the database's + "-wal");
        reopened should SQLite ever have replaced the file."""
        wal = self.path + "-wal"
        ino = os.stat(wal).st_ino
        if ino != self._wal_ino:
            if self._wal_fd >= 0:
                os.close(self._wal_fd)
            self._wal_fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            self._wal_ino = os.fstat(self._wal_fd).st_ino
        return self._wal_fd

    def trim_tail(self) -> None:
        """Drop the oldest tail records down to the bounds, each append about as many as it
        added: freeing tens of thousands at once stalled the loop for 10+ ms, and even a
        thousand at a time shows in the p99 latency. Dropped slots become None; the list is
        compacted (pointers moved, nothing freed) once they are half of it."""
        if self._tail_len() <= self._tail_max and self._tail_bytes <= self._tail_bytes_max:
            return
        tail = self._tail
        off = self._tail_off
        n = len(tail)
        stop = max(off, n - self._tail_max)
        kept = self._tail_bytes
        for i in range(off, stop):
            kept -= len(tail[i].body)
            tail[i] = None
        while kept > self._tail_bytes_max and stop < n:
            kept -= len(tail[stop].body)
            tail[stop] = None
            stop += 1
        self._tail_start += stop - off
        self._tail_bytes = kept
        if stop > TAIL_COMPACT_MIN and stop * 2 > n:
            del tail[:stop]
            stop = 0
        self._tail_off = stop

    def _tail_len(self) -> int:
        return len(self._tail) - self._tail_off

    def _restart_wal(self) -> None:
        """After a failed commit (a full disk, a file size limit): copy the WAL into the database
        now, so that the next write starts the WAL over from its beginning. A chunk is large (and
        its pages too): the room left behind the last commit may not take even a one-page write,
        such as the subscription saved when a pool stops."""
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            log.warning("checkpoint after a failed commit failed too", error=str(e))

    def _save_stream_versions(self, overlay: dict) -> None:
        """Upsert every stream's new version: many rows per statement (half the cost of one
        statement per row), in groups of a power of two so that few statements are prepared."""
        flat = [x for item in overlay.items() for x in item]
        i = 0
        while i < len(flat):
            n = min(_UPSERT_MAX, 1 << ((len(flat) - i) // 2).bit_length() - 1)
            self._db.execute(_upsert_streams(n), flat[i:i + 2 * n])
            i += 2 * n

    def _chunk_row(self, position: int) -> Optional[tuple]:
        """The row (first, last, bodies) of the chunk holding `position`, or None."""
        row = self._db.execute(_CHUNK_AT, (position,)).fetchone()
        return None if row is None or row[1] < position else row

    def _chunk_at(self, position: int) -> Optional[tuple]:
        """(first, last, unpacker, bodies) of the chunk holding `position`, or None; the
        unpacker stands at that position."""
        row = self._chunk_row(position)
        if row is None:
            return None
        first, last, bodies = row
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False,
                                    max_buffer_size=max(len(bodies), 1 << 20))
        unpacker.feed(bodies)
        for _ in range(position - first):
            unpacker.skip()
        return first, last, unpacker, bodies

    def _cold_events(self, positions: Iterable[int]) -> Iterator[tuple]:
        """(event map, body) at each of the given positions (ascending) that is stored, from
        its chunk; the other events of the chunk are skipped, not decoded."""
        last = 0
        at = 0
        for p in positions:
            if p > last or p < at:
                chunk = self._chunk_at(p)
                if chunk is None:
                    continue
                first, last, unpacker, bodies = chunk
            elif p > at:
                for _ in range(p - at):
                    unpacker.skip()
            start = unpacker.tell()
            event = unpacker.unpack()
            if event.get("position") != p:
                raise _damaged(p, (first, last))
            at = p + 1
            yield event, bodies[start:unpacker.tell()]

    def _cold_records(self, start: int, end: int) -> list:
        """EventRecords of positions start..end (all stored), from their chunks, each chunk
        decoded whole: 0.53 against 1.65 µs per event of decoding them one by one, and
        0.60 against 2.87 when a pool advances by less than it read (in process)."""
        out: list = []
        p = start
        while p <= end:
            first, last, records = self._cold_chunk(p)
            out += records[p - first:end - first + 1]
            p = last + 1
        return out

    def _cold_chunk(self, position: int) -> tuple:
        """(first, last, records) of the chunk holding `position`; raises _damaged."""
        cold = self._cold
        for first, (last, records, _) in cold.items():
            if first <= position <= last:
                cold.move_to_end(first)
                return first, last, records
        row = self._chunk_row(position)
        if row is None:
            raise _damaged(position, None)
        first, last, bodies = row
        records = _chunk_records(first, last, bodies)
        cold[first] = (last, records, len(bodies))
        self._cold_bytes += len(bodies)
        while len(cold) > 1 and (len(cold) > COLD_CHUNKS_KEPT
                                 or self._cold_bytes > COLD_BYTES_KEPT):
            self._cold_bytes -= cold.popitem(last=False)[1][2]
        return first, last, records

    def read(self, start: int, limit: int) -> list:
        start = max(start, 1)
        if start > self.head or limit <= 0:
            return []
        end = min(self.head, start + limit - 1)
        if start >= self._tail_start:
            i = start - self._tail_start + self._tail_off
            return self._tail[i:i + limit]
        cold_end = min(end, self._tail_start - 1)
        out = self._cold_records(start, cold_end)
        if cold_end < end:
            off = self._tail_off
            out.extend(self._tail[off:off + end - cold_end])
        return out

    def get(self, positions: Iterable[int]) -> dict:
        out = {}
        wanted = []
        for p in positions:
            if self._tail_start <= p <= self.head:
                out[p] = self._tail[p - self._tail_start + self._tail_off]
            elif 1 <= p <= self.head:
                wanted.append(p)
        for event, body in self._cold_events(sorted(set(wanted))):
            out[event["position"]] = _record(event, body)
        return out

    # ---- subscriptions and checkpoints ---------------------------------------
    def load_subscriptions(self) -> list:
        rows = self._db.execute("SELECT key, spec, desired, checkpoint, created_at, "
                                "subscriber_rights FROM subscriptions "
                                "ORDER BY created_at, key").fetchall()
        return [{"key": k, "spec": msgpack.unpackb(s, raw=False, strict_map_key=False),
                 "desired": d, "checkpoint": c, "created_at": t,
                 "subscriber_rights": None if r is None else msgpack.unpackb(r)}
                for k, s, d, c, t, r in rows]

    def save_subscription(self, key: str, spec: dict, desired: str, checkpoint: int,
                          created_at: int, subscriber_rights: Optional[list] = None) -> None:
        self._db.execute("INSERT OR REPLACE INTO subscriptions (key, spec, desired, checkpoint, "
                         "created_at, subscriber_rights) VALUES (?, ?, ?, ?, ?, ?)",
                         (key, _pack(spec), desired, checkpoint, created_at,
                          None if subscriber_rights is None else _pack(subscriber_rights)))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing, and one commit (one fsync) however many rows: in autocommit mode
        every row of an executemany is a commit of its own."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def delete_subscription(self, key: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM subscriptions WHERE key = ?", (key,))
            db.execute("DELETE FROM parked WHERE key = ?", (key,))

    @property
    def unsaved_heads(self) -> bool:
        return bool(self._unsaved)

    def save_checkpoints(self, checkpoints: dict) -> None:
        """The subscriptions' checkpoints, and the stream heads not saved yet, in one
        transaction."""
        if not checkpoints and not self._unsaved:
            return
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if checkpoints:
                db.executemany("UPDATE subscriptions SET checkpoint = ? WHERE key = ?",
                               [(c, k) for k, c in checkpoints.items()])
            if self._unsaved:
                self._save_stream_versions(self._unsaved)
                db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('streams_through', ?)",
                           (self.head.to_bytes(8, "big"),))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._unsaved.clear()

    # ---- parked events -------------------------------------------------------
    def park(self, key: str, items: list) -> int:
        """Store (position, reason) items as parked; how many were not parked already (a
        parked event parked again keeps one row, with the new reason)."""
        rows = [(key, p, r) for p, r in items]
        with self._transaction() as db:
            new = db.executemany("INSERT OR IGNORE INTO parked (key, position, reason) "
                                 "VALUES (?, ?, ?)", rows).rowcount
            if new < len(rows):
                db.executemany("UPDATE parked SET reason = ? WHERE key = ? AND position = ?",
                               [(r, k, p) for k, p, r in rows])
        return new

    def parked(self, key: str, limit: int) -> list:
        return [tuple(r) for r in self._db.execute(
            "SELECT position, reason FROM parked WHERE key = ? ORDER BY position LIMIT ?",
            (key, limit))]

    def unpark(self, key: str, positions: list) -> int:
        with self._transaction() as db:
            return db.executemany("DELETE FROM parked WHERE key = ? AND position = ?",
                                  [(key, p) for p in positions]).rowcount

    def parked_count(self, key: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM parked WHERE key = ?", (key,)).fetchone()[0]

    def external_checkpoints(self) -> None:
        """Another connection (the checkpointer process) runs the WAL checkpoints from now on."""
        self._db.execute("PRAGMA wal_autocheckpoint=0")

    def meta(self, name: str) -> Optional[bytes]:
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        try:
            self.save_checkpoints({})
        except sqlite3.Error as e:
            # read back from the log on the next open
            log.warning("stream heads not saved on close", error=str(e))
        self.sync()
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1
        self._db.close()
