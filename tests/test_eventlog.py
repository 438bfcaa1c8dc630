"""The SQLite event log, used directly: a real file in a temp dir, no daemon."""
import os
import sqlite3
import uuid

import hypothesis
import msgpack
import pytest
from hypothesis import strategies as st

from emitterd import settings
from emitterd.control.events import validate_publish
from emitterd.errors import ProtocolError
from emitterd.eventlog import PublishBatch, open_log
from emitterd.eventlog import sqlite as sqlite_log
from emitterd.eventlog.sqlite import generated_id, generated_position

HERE = os.path.dirname(__file__)
CFG = settings.load(env={})


def batch(events, expected_version=None):
    args = {"events": events}
    if expected_version is not None:
        args["expected_version"] = expected_version
    return validate_publish(args, CFG)


def ev(stream, type="T", **kw):
    return dict(stream=stream, type=type, **kw)


# the property tests below: each example opens a log of its own in a fresh temp dir
PROPERTY = dict(deadline=None, suppress_health_check=[
    hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.function_scoped_fixture])
NAMES = st.sampled_from(["a", "b", "c", "ü-d"])


def event_maps(ints, ids):
    """Events as publishers send them: any mix of the optional fields."""
    return st.fixed_dictionaries({"stream": NAMES, "type": NAMES}, optional={
        "data": st.one_of(st.none(), ints, st.text(max_size=20),
                          st.dictionaries(st.text(max_size=5), ints, max_size=3)),
        "metadata": st.dictionaries(st.text(max_size=5), ints, max_size=2),
        "tags": st.lists(NAMES, max_size=3),
        "id": ids})


def draw_publishes(data, event, max_events):
    """Up to 3 publishes, each a drawn pattern of events repeated up to a drawn length."""
    return [[pattern[i % len(pattern)] for i in range(n)] for pattern, n in data.draw(
        st.lists(st.tuples(st.lists(event, min_size=1, max_size=6),
                           st.integers(1, max_events)), min_size=1, max_size=3))]


def as_if_preceded(log, head):
    """Set the log's head as if `head` events preceded (the next append starts after it)."""
    log.head = head
    log._tail, log._tail_off, log._tail_start = [], 0, head + 1


@pytest.mark.timeout(20)
def test_positions_versions_and_full_event_maps(tmp_path):
    log = open_log(str(tmp_path))
    b1, b2 = batch([ev("a"), ev("a"), ev("b")]), batch([ev("b", data={"x": 1}, tags=["t"], id="c-1")])
    records = log.append([b1, b2])
    assert b1.result == {"positions": [1, 2, 3], "versions": [0, 1, 0]}
    assert b2.result == {"positions": [4], "versions": [1]}
    assert [r.position for r in records] == [1, 2, 3, 4] and log.head == 4
    e = records[3].decode()
    assert (e["id"], e["stream"], e["version"], e["type"], e["data"], e["tags"]) == (
        "c-1", "b", 1, "T", {"x": 1}, ["t"])
    full = msgpack.unpackb(records[0].encoded(3), raw=False)
    assert full["attempt"] == 3 and full["position"] == 1 and full["metadata"] == {}
    uuid.UUID(full["id"])
    assert records[3].data == {"x": 1}


@pytest.mark.timeout(20)
def test_idempotent_ids_client_and_generated(tmp_path):
    log = open_log(str(tmp_path))
    b = batch([ev("s", id="x"), ev("s")])
    log.append([b])
    generated = log.read(2, 1)[0].decode()["id"]
    again = batch([ev("s", id="x"), ev("s", id=generated), ev("s", id="y"), ev("s", id="y")])
    log.append([again])
    assert again.result == {"positions": [1, 2, 3, 3], "versions": [0, 1, 2, 2]}
    assert log.head == 3


@pytest.mark.timeout(20)
@pytest.mark.parametrize("cold", [False, True])
def test_an_id_of_generated_form_is_a_hit_only_where_that_id_was_given(tmp_path, cold):
    """Position 2 carries a client id, so the generated id of position 2 was never given
    out: a publish with it is a new event, not a duplicate of position 2."""
    log = open_log(str(tmp_path), tail_events=1 if cold else 65536)
    log.append([batch([ev("s"), ev("s", id="client-abc")])])
    unused = generated_id(log._salt, 2)
    b = batch([ev("other", id=unused)])
    log.append([b])
    assert b.result == {"positions": [3], "versions": [0]} and log.head == 3
    assert log.read(3, 1)[0].decode()["id"] == unused
    again = batch([ev("other", id=unused), ev("s", id=generated_id(log._salt, 1))])
    log.append([again])
    assert again.result == {"positions": [3, 1], "versions": [0, 0]} and log.head == 3


@pytest.mark.timeout(20)
def test_a_client_id_of_generated_form_for_a_later_position_is_refused(tmp_path):
    """The event appended at that later position would be given the same id."""
    log = open_log(str(tmp_path))
    log.append([batch([ev("s")])])
    future = generated_id(log._salt, 4)
    ok1, bad, ok2 = batch([ev("s")]), batch([ev("s"), ev("t", id=future)]), batch([ev("s")])
    log.append([ok1, bad, ok2])
    assert isinstance(bad.result, ProtocolError) and bad.result.code == "invalid"
    assert bad.result.details == {"field": "events.1.id"}
    assert ok1.result["positions"] == [2] and ok2.result["positions"] == [3] and log.head == 3
    ids = [r.decode()["id"] for r in log.read(1, 3)]
    assert len(set(ids)) == 3 and future not in ids


@pytest.mark.timeout(20)
def test_expected_version_conflict_leaves_other_batches_alone(tmp_path):
    log = open_log(str(tmp_path))
    ok1, bad, ok2 = (batch([ev("acct")], expected_version=-1), batch([ev("acct")], expected_version=-1),
                     batch([ev("acct")], expected_version=0))
    log.append([ok1, bad, ok2])
    assert ok1.result["versions"] == [0] and ok2.result["versions"] == [1]
    assert isinstance(bad.result, ProtocolError) and bad.result.code == "conflict"
    assert log.head == 2


@pytest.mark.timeout(20)
def test_state_survives_reopen(tmp_path):
    log = open_log(str(tmp_path))
    log.append([batch([ev("a", id="k"), ev("a")])])
    log.close()
    log = open_log(str(tmp_path))
    b = batch([ev("a"), ev("a", id="k")])
    log.append([b])
    assert b.result == {"positions": [3, 1], "versions": [2, 0]} and log.head == 3
    assert [r.position for r in log.read(1, 10)] == [1, 2, 3]


@pytest.mark.timeout(20)
def test_tail_is_bounded_and_reads_fall_back_to_sqlite(tmp_path):
    log = open_log(str(tmp_path), tail_events=1024, tail_bytes=64 * 1024)
    for i in range(20):
        log.append([batch([ev("s-%d" % j, data="x" * 200) for j in range(256)])])
    assert log._tail_bytes <= 64 * 1024 and log._tail_len() <= 1024
    assert log._tail_start > 1
    got = log.read(1, 5000)
    assert [r.position for r in got] == list(range(1, 5001))
    assert got[0].decode()["stream"] == "s-0" and list(got[0].tags) == []


@pytest.mark.timeout(20)
def test_tail_is_trimmed_a_little_at_a_time(tmp_path):
    # freeing tens of thousands of records in one go stalls the loop: once the tail is
    # full, each append drops about as many records as it adds, never a pile at once
    log = open_log(str(tmp_path), tail_events=4096, tail_bytes=1 << 30)
    drops = []
    for i in range(100):
        start = log._tail_start
        log.append([batch([ev("s-%d" % j) for j in range(100)])])
        drops.append(log._tail_start - start)
        assert log._tail_len() == min(4096, log.head)
        assert log._tail_start + log._tail_len() - 1 == log.head
        assert [r.position for r in log.read(log.head - 5, 10)] == list(range(log.head - 5,
                                                                            log.head + 1))
    assert sum(drops) == 100 * 100 - 4096 and max(drops) == 100
    assert len(log._tail) < 2 * 4096          # the dropped slots are compacted away
    # the same by bytes
    log2 = open_log(str(tmp_path / "b"), tail_events=1 << 20, tail_bytes=256 * 1024)
    drops = []
    for i in range(100):
        start = log2._tail_start
        log2.append([batch([ev("s-%d" % j, data="x" * 200) for j in range(100)])])
        drops.append(log2._tail_start - start)
        live = log2._tail[log2._tail_off:]
        assert log2._tail_bytes <= 256 * 1024
        if log2._tail_start > 1:      # trimming: down to the bound, not far below it
            assert log2._tail_bytes > 256 * 1024 - 400
        assert log2._tail_bytes == sum(len(r.body) for r in live)
        assert [r.position for r in live] == list(range(log2._tail_start, log2.head + 1))
    assert log2._tail_start > 1 and max(drops) <= 101
    assert [r.position for r in log2.read(1, 10000)] == list(range(1, 10001))
    got = log2.get([1, 5000, log2._tail_start, log2.head])
    assert sorted(got) == [1, 5000, log2._tail_start, log2.head]
    assert all(r.position == p for p, r in got.items())


@pytest.mark.timeout(20)
def test_generated_ids_round_trip():
    salt = 0xABCDEF0123456 & ((1 << 60) - 1)
    for pos in (1, 255, 1 << 40, (1 << 62) - 1):
        text = generated_id(salt, pos)
        assert uuid.UUID(text).version == 8
        assert generated_position(salt, text) == pos
        assert generated_position(salt ^ 1, text) is None
    assert generated_position(salt, str(uuid.uuid4())) is None


@pytest.mark.timeout(20)
def test_a_version_1_file_is_migrated(tmp_path):
    db = sqlite3.connect(str(tmp_path / "emitterd.db"), isolation_level=None)
    db.executescript(open(os.path.join(HERE, "data_v1_schema.sql")).read())
    pack = msgpack.packb
    for pos, stream, version, cid in ((1, "a", 0, "id-1"), (2, "a", 1, None), (3, "b", 0, None)):
        body = b"".join(pack(x) for x in ("position", pos, "id", cid or str(uuid.uuid4()), "stream",
                                           stream, "version", version, "type", "T", "data", None,
                                           "metadata", {}, "tags", [], "timestamp", 1))
        db.execute("INSERT INTO events VALUES (?, ?, ?, 'T', NULL, ?, ?)", (pos, stream, version, cid, body))
    db.close()
    log = open_log(str(tmp_path))
    assert log.head == 3
    b = batch([ev("a"), ev("a", id="id-1"), ev("b")])
    log.append([b])
    assert b.result == {"positions": [4, 1, 5], "versions": [2, 0, 1]}


# ---- stored layout, chunks, the v2 -> v3 migration ----------------------------------------

def _v2_body(pos, event_id, stream, version, type_, data, metadata, tags, ts):
    """A body as version 2 wrote it: the 9 entries without map header and attempt, this order."""
    pack = msgpack.Packer(use_bin_type=True).pack
    return b"".join(pack(k) + pack(v) for k, v in (
        ("position", pos), ("id", event_id), ("stream", stream), ("version", version),
        ("type", type_), ("data", data), ("metadata", metadata), ("tags", tags),
        ("timestamp", ts)))


def _write_v2_file(path, events, salt=0x123456789ABCDEF):
    """A version 2 file holding `events` (dicts of stream, type, data, metadata, tags, id or
    None), positions from 1, written as version 2 did: ids of its own for events without one."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(open(os.path.join(HERE, "data_v2_schema.sql")).read())
    db.execute("INSERT INTO meta (name, value) VALUES ('id_salt', ?)", (salt.to_bytes(8, "big"),))
    versions = {}
    expected = []
    for pos, e in enumerate(events, 1):
        version = versions[e["stream"]] = versions.get(e["stream"], -1) + 1
        event_id = e["id"] or generated_id(salt, pos)
        full = {"position": pos, "id": event_id, "stream": e["stream"], "version": version,
                "type": e["type"], "data": e["data"], "metadata": e["metadata"],
                "tags": e["tags"], "timestamp": 1_700_000_000_000_000 + pos}
        body = _v2_body(pos, event_id, e["stream"], version, e["type"], e["data"], e["metadata"],
                        e["tags"], full["timestamp"])
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)",
                   (pos, e["stream"], version, e["type"],
                    msgpack.packb(e["tags"]) if e["tags"] else None, body))
        if e["id"]:
            db.execute("INSERT INTO event_ids VALUES (?, ?, ?)", (e["id"], pos, version))
        expected.append(full)
    db.executemany("INSERT INTO streams VALUES (?, ?)", versions.items())
    db.close()
    return expected


@pytest.mark.timeout(30)
def test_a_version_2_file_is_migrated_to_chunks(tmp_path):
    n = 1500          # more than one chunk of CHUNK_EVENTS
    events = [{"stream": "s-%d" % (i % 7), "type": "T%d" % (i % 3),
               "data": {"i": i, "x": "é" * (i % 5)}, "metadata": {"m": i} if i % 4 == 0 else {},
               "tags": ["t", str(i)] if i % 2 else [],
               "id": "client-%d" % i if i % 10 == 0 else None} for i in range(n)]
    expected = _write_v2_file(str(tmp_path / "emitterd.db"), events)
    log = open_log(str(tmp_path), tail_events=1024, tail_bytes=64 * 1024)
    assert log.head == n
    db = sqlite3.connect(str(tmp_path / "emitterd.db"))
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "events" not in tables and "chunks" in tables
    rows = db.execute("SELECT first, last FROM chunks ORDER BY first").fetchall()
    assert rows[0][0] == 1 and rows[-1][1] == n and len(rows) == 2
    assert all(b[0] == a[1] + 1 for a, b in zip(rows, rows[1:]))
    db.close()

    got = log.read(1, n)
    assert [r.position for r in got] == list(range(1, n + 1))
    for r, full in zip(got, expected):
        assert r.decode() == full
        assert (r.stream, r.type, list(r.tags)) == (full["stream"], full["type"], full["tags"])
        assert msgpack.unpackb(r.encoded(1), raw=False) == dict(full, attempt=1)
        assert msgpack.unpackb(r.encoded(5), raw=False) == dict(full, attempt=5)
    some = log.get([n, 3, 1025, 1024, 0, n + 1])
    assert sorted(some) == [3, 1024, 1025, n] and some[1025].decode() == expected[1024]

    # idempotent republish of an old client id and of an old generated id; new events go on
    b = batch([ev("s-0", id="client-10"), ev("s-0", id=expected[4]["id"]), ev("s-0"),
               ev("new", id="client-new")])
    log.append([b])
    last_s0 = max(e["version"] for e in expected if e["stream"] == "s-0")
    assert b.result == {"positions": [11, 5, n + 1, n + 2],
                        "versions": [expected[10]["version"], expected[4]["version"],
                                     last_s0 + 1, 0]}
    assert log.read(n + 1, 5)[0].decode()["version"] == last_s0 + 1
    log.close()

    log = open_log(str(tmp_path))      # migrated once: opens as version 3
    assert log.head == n + 2
    assert log.read(n + 2, 1)[0].decode()["id"] == "client-new"
    again = batch([ev("new", id="client-new"), ev("s-0", id=expected[4]["id"])])
    log.append([again])
    assert again.result == {"positions": [n + 2, 5], "versions": [0, expected[4]["version"]]}


@pytest.mark.timeout(20)
def test_stored_body_is_the_delivered_map_with_attempt_1_last(tmp_path):
    log = open_log(str(tmp_path))
    b = batch([ev("a", data={"k": [1, 2]}, tags=["x"]), ev("a", id="mine", metadata={"m": 1})])
    r1, r2 = log.append([b])
    for r in (r1, r2):
        assert r.body[0] == 0x8a and r.body.endswith(msgpack.packb("attempt") + b"\x01")
        assert r.encoded(1) is r.body
        full = msgpack.unpackb(r.body, raw=False)
        assert list(full)[-1] == "attempt" and len(full) == 10
        assert r.decode() == {k: v for k, v in full.items() if k != "attempt"}
        for attempt in (2, 127, 128, 255, 70_000, 1 << 40):
            assert msgpack.unpackb(r.encoded(attempt), raw=False) == dict(full, attempt=attempt)
    assert r2.decode()["id"] == "mine" and r2.decode()["metadata"] == {"m": 1}
    assert r1.decode()["metadata"] == {} and r1.data == {"k": [1, 2]}


@pytest.mark.timeout(20)
def test_new_files_use_16k_pages(tmp_path):
    open_log(str(tmp_path)).close()
    db = sqlite3.connect(str(tmp_path / "emitterd.db"))
    assert db.execute("PRAGMA page_size").fetchone()[0] == 16384


@pytest.mark.timeout(30)
def test_a_transaction_is_split_into_bounded_chunks_and_read_back_cold(tmp_path):
    from emitterd.eventlog.sqlite import CHUNK_BYTES, CHUNK_EVENTS
    log = open_log(str(tmp_path), tail_events=1024, tail_bytes=1024)
    small = [batch([ev("s-%d" % (i % 3)) for i in range(1000)]) for _ in range(3)]
    big = batch([ev("big", data="b" * 300_000) for _ in range(10)])
    log.append(small + [big])          # one transaction: 3010 events
    assert log.head == 3010
    db = sqlite3.connect(str(tmp_path / "emitterd.db"))
    rows = db.execute("SELECT first, last, length(bodies) FROM chunks ORDER BY first").fetchall()
    assert rows[0][0] == 1 and rows[-1][1] == 3010
    assert all(b[0] == a[1] + 1 for a, b in zip(rows, rows[1:]))
    assert all(last - first + 1 <= CHUNK_EVENTS and (size <= CHUNK_BYTES or first == last)
               for first, last, size in rows)
    assert [last - first + 1 for first, last, _ in rows][:2] == [1024, 1024]
    assert len(rows) >= 6          # the 300 KB events fill a chunk by size, not by count
    assert log._tail_start > 3000            # what follows reads the chunks

    got = log.read(1000, 2011)               # across chunk boundaries, from mid-chunk
    assert [r.position for r in got] == list(range(1000, 3011))
    assert got[0].stream == "s-0" and got[-1].data == "b" * 300_000
    positions = [1, 1024, 1025, 2048, 2049, 3001, 3005, 3010]
    some = log.get(reversed(positions))
    assert sorted(some) == positions
    assert all(some[p].decode()["position"] == p for p in positions)
    generated = some[2049].decode()["id"]
    again = batch([ev("x", id=generated)])
    log.append([again])
    assert again.result == {"positions": [2049], "versions": [some[2049].decode()["version"]]}


@pytest.mark.timeout(20)
def test_fast_validation_agrees_with_validate_event():
    """The control socket's decoder (publish_decode) makes the same events as validate_event;
    a nil metadata or tags (= the default) is left to the generic path."""
    from types import SimpleNamespace
    from emitterd.control.events import validate_event
    from emitterd.control.publish_decode import RequestDecoder
    events = [
        ev("s"), ev("s", data=None), ev("s", data={"a": [1, 2.5, b"\x00"]}), ev("s", id="x" * 128),
        ev("s", id=None), ev("s", metadata={"k": "v"}),
        ev("s", tags=[]), ev("s", tags=["a", "ü"]), ev("ß" * 256, type="τ" * 256, id="ид"),
        {"data": 1, "tags": ["t"], "type": "T", "id": "i", "metadata": {}, "stream": "s"},
    ]
    decoder = RequestDecoder(SimpleNamespace(cfg=CFG))
    frame = msgpack.packb({"id": 1, "op": "publish", "args": {"events": events}})
    fast = decoder.publish(frame)["args"].events
    assert len(fast) == len(events)
    for nil in (ev("s", metadata=None), ev("s", tags=None)):
        assert decoder.publish(msgpack.packb({"id": 1, "op": "publish",
                                              "args": {"events": [nil]}})) is None
        assert batch([nil]).events[0].tags == []
    for i, (e, got) in enumerate(zip(events, fast)):
        slow = validate_event(e, "events.%d" % i, CFG.max_event_bytes)
        # all but the head, whose keys may come in another order
        assert (got.stream, got.type, got.id, got.tags) == (slow.stream, slow.type, slow.id,
                                                            slow.tags)
        n = 6 if got.id is not None else 5
        assert msgpack.unpackb(bytes([0x80 | n]) + got.head, raw=False) == msgpack.unpackb(
            bytes([0x80 | n]) + slow.head, raw=False)
    for bad, field in (({"stream": "s", "type": "T", "colour": 1}, "events.0.colour"),
                       (ev("s", tags=["a", 1]), "events.0.tags.1"), (ev(""), "events.0.stream"),
                       (ev("s", metadata=[]), "events.0.metadata"), ([], "events.0"),
                       (ev("s", id=""), "events.0.id"), (ev("s", data={1, 2}), "events.0.data")):
        with pytest.raises(ProtocolError) as err:
            batch([bad])
        assert err.value.code == "invalid" and err.value.details == {"field": field}


@pytest.mark.timeout(20)
def test_max_event_bytes_bounds_the_delivered_event(tmp_path):
    class Cfg:
        max_publish_events = 10
        max_event_bytes = 1000
    log = open_log(str(tmp_path))
    for client_id in (None, "i" * 20):
        largest = 0
        for n in range(700, 1000):
            e = ev("s", data="d" * n, id=client_id and "%s%03d" % (client_id, n))
            try:
                b = validate_publish({"events": [e]}, Cfg)
            except ProtocolError as err:
                assert err.details == {"field": "events.0"}
                break
            rec, = log.append([b])
            assert len(rec.encoded(1)) <= len(rec.encoded(1 << 40)) <= 1000
            largest = len(rec.encoded(1))
        assert 1000 - 40 < largest    # refused near the limit, not far below it


@pytest.mark.timeout(20)
def test_generated_ids_in_stored_events(tmp_path):
    log = open_log(str(tmp_path))
    log.append([batch([ev("s")] * 5000)])
    as_if_preceded(log, (1 << 48) - 2)
    log.append([batch([ev("s")] * 3)])
    salt = log._salt
    for p in (1, 4095, 4096, 4097, 5000, (1 << 48) - 1, 1 << 48, (1 << 48) + 1):
        rec, = log.get([p]).values()
        assert rec.decode()["id"] == generated_id(salt, p) and rec.decode()["position"] == p


def _synchronous(log) -> int:
    return log._db.execute("PRAGMA synchronous").fetchone()[0]


@pytest.mark.timeout(20)
def test_a_deferred_sync_commits_unsynced_then_syncs_the_wal(tmp_path):
    """append(defer_sync=True) commits without SQLite's fsync (just that commit: the connection
    is back at FULL for every other write); sync() fdatasyncs the WAL; close() syncs too."""
    log = open_log(str(tmp_path))
    assert _synchronous(log) == 2                        # FULL
    recs = log.append([batch([ev("a"), ev("b")])], defer_sync=True)
    assert [r.position for r in recs] == [1, 2]
    assert log._unsynced and _synchronous(log) == 2
    wal = os.path.join(str(tmp_path), "emitterd.db-wal")
    assert os.fstat(log._wal_fd).st_ino == os.stat(wal).st_ino
    log.sync()
    assert not log._unsynced
    log.sync()                                           # nothing pending: a no-op
    log.append([batch([ev("c")])])                       # not deferred: synced by SQLite
    assert not log._unsynced
    log.append([batch([ev("d")])], defer_sync=True)
    log.close()                                          # syncs what is pending
    log = open_log(str(tmp_path))
    assert [r.stream for r in log.read(1, 10)] == ["a", "b", "c", "d"]
    log.close()


@pytest.mark.timeout(20)
def test_synchronous_normal_never_defers(tmp_path):
    log = open_log(str(tmp_path), "normal")
    log.append([batch([ev("a")])], defer_sync=True)
    assert not log._unsynced and _synchronous(log) == 1  # NORMAL, as configured
    log.close()


@pytest.mark.timeout(20)
def test_a_failed_deferred_commit_restores_full(tmp_path):
    """A commit that fails (here: the database is read-only) leaves FULL in place."""
    log = open_log(str(tmp_path))
    log.append([batch([ev("a")])])
    log._db.execute("PRAGMA query_only=1")
    b = batch([ev("b")])
    assert log.append([b], defer_sync=True) == []
    assert isinstance(b.result, ProtocolError) and b.result.code == "unavailable"
    assert _synchronous(log) == 2 and not log._unsynced
    log._db.execute("PRAGMA query_only=0")
    log.close()


@pytest.mark.timeout(20)
def test_a_missing_chunk_is_reported_as_damage_on_a_cold_read(tmp_path):
    log = open_log(str(tmp_path), tail_events=1024)
    for i in range(3):
        log.append([batch([ev("s", data=i) for _ in range(1500)])])
    first = log._db.execute("SELECT first FROM chunks ORDER BY first LIMIT 1 OFFSET 1").fetchone()[0]
    log._db.execute("DELETE FROM chunks WHERE first = ?", (first,))
    assert [r.position for r in log.read(1, 100)] == list(range(1, 101))     # before the gap
    with pytest.raises(sqlite3.DatabaseError) as err:
        log.read(1, 3000)
    assert "damaged: position %d" % first in str(err.value)
    log.close()


CRASH_SCRIPT = r"""
import os, sys
from emitterd.eventlog import open_log, PublishBatch
sys.path.insert(0, sys.argv[2])
from test_eventlog import batch, ev
log = open_log(sys.argv[1])
log.append([batch([ev("a"), ev("b")])])
log.save_checkpoints({})                  # heads saved through position 2
log.append([batch([ev("a"), ev("c"), ev("a")])], defer_sync=True)
log.sync()                                # on disk, heads not saved
print(log.head, flush=True)
os._exit(0)                               # no close: as if killed
"""


@pytest.mark.timeout(30)
def test_stream_heads_not_saved_before_a_crash_are_read_back_from_the_log(tmp_path):
    """Stream heads are saved lazily (with the checkpoints); after a crash the versions of
    the events after the last save come back from the events themselves."""
    import subprocess
    import sys
    data = str(tmp_path / "data")
    out = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, data, os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["5"]
    log = open_log(data)
    assert log.unsaved_heads                # read back: a 2, b 0, c 0
    b = batch([ev("a"), ev("b"), ev("c"), ev("d")])
    log.append([b])
    assert b.result["versions"] == [3, 1, 1, 0]
    wrong = batch([ev("a")], expected_version=2)
    right = batch([ev("a")], expected_version=3)
    log.append([wrong, right])
    assert isinstance(wrong.result, ProtocolError) and right.result["versions"] == [4]
    log.close()                             # saves them: nothing to read back next time
    log = open_log(data)
    assert not log.unsaved_heads
    b = batch([ev("a"), ev("c")])
    log.append([b])
    assert b.result["versions"] == [5, 2]
    log.close()


@pytest.mark.timeout(20)
def test_tail_records_leave_nothing_for_the_cyclic_gc(tmp_path):
    """The in-memory tail holds a record per recent event (65,536 by default): records the
    cyclic GC tracked made every gen-0 collection while the tail filled scan tens of
    thousands of them (9-17 ms pauses in the parent). A record is not tracked, and an event
    without tags shares one immutable empty tags object; tags given are kept as given."""
    import gc
    log = open_log(str(tmp_path))
    b = batch([ev("a"), ev("b", tags=["x", "y"])])
    plain, tagged = log.append([b])
    assert not gc.is_tracked(plain) and not gc.is_tracked(tagged)
    assert plain.tags == () and not gc.is_tracked(plain.tags)
    assert list(tagged.tags) == ["x", "y"]
    (cold,) = [r for r in log._cold_records(1, 1)]
    assert not gc.is_tracked(cold) and cold.tags == ()
    log.close()


@pytest.mark.timeout(20)
def test_a_deferred_trim_waits_for_trim_tail(tmp_path):
    # the daemon answers the publishers first and frees the records that fell out after
    log = open_log(str(tmp_path), tail_events=1024)
    for i in range(8):
        log.append([batch([ev("s-%d" % j) for j in range(256)])], defer_trim=True)
    assert log._tail_len() == 8 * 256 and log._tail_start == 1
    log.trim_tail()
    assert log._tail_len() == 1024 and log._tail_start == 8 * 256 - 1024 + 1
    assert [r.position for r in log.read(1, 2048)] == list(range(1, 2049))
    log.append([batch([ev("s-0")])])       # not deferred: trimmed at once
    assert log._tail_len() == 1024


@pytest.mark.timeout(20)
def test_the_committer_answers_first_and_then_trims_the_tail(tmp_path):
    """The group commit (control/events.py) with a real log and loop: each publish is answered
    while the records that fell out of the tail are still held, and freed right after; the
    answers are written before the workers' batches (marked for writing earlier, by routing)."""
    from types import SimpleNamespace

    from emitterd.control.events import Committer
    from emitterd.loop import Loop

    log = open_log(str(tmp_path), tail_events=1024)
    loop = Loop()
    writes = []

    class Channel:
        def __init__(self, name):
            self.name = name
            self.pending = False

        def send(self):
            self.pending = True
            loop.mark_dirty(self)

        def flush(self):
            if self.pending:
                writes.append(self.name)
                self.pending = False

    class Conn:                       # hashable by identity, as a control connection is
        channel = Channel("answer")

    worker = Channel("worker")
    publisher = Conn()

    def pump_all():
        worker.send()                 # routing marks the worker's channel first
        return False

    ctx = SimpleNamespace(log=log, loop=loop, shutting_down=False,
                          registry=SimpleNamespace(pump_all=pump_all))
    committer = Committer(ctx)
    seen = []

    class Req:
        conn = publisher

        def reply(self, result):
            seen.append((result["positions"][-1], log._tail_len()))
            publisher.channel.send()

        def fail(self, err):
            raise AssertionError(err)
    try:
        for i in range(8):
            committer.submit(batch([ev("s-%d" % j) for j in range(256)]), Req())
            committer.commit()
            assert log._tail_len() == min(1024, log.head)
    finally:
        loop.close()
        log.close()
    assert [p for p, _ in seen] == [256 * (i + 1) for i in range(8)]
    assert [n for _, n in seen] == [256, 512, 768, 1024, 1280, 1280, 1280, 1280]
    assert writes == ["answer", "worker"] * 8


@pytest.mark.timeout(30)
def test_the_wal_is_written_ahead_at_open_and_a_crashed_wal_is_kept(tmp_path):
    """Commits never grow a prefilled WAL (a growing file syncs slower); the zeros are not
    taken for frames, and the frames a crash left in the WAL are recovered, not overwritten."""
    import shutil
    a = str(tmp_path / "a")
    log = open_log(a, wal_bytes=4 << 20)
    wal = os.path.join(a, "emitterd.db-wal")
    assert os.path.getsize(wal) == 4 << 20
    for i in range(5):
        log.append([batch([ev("s-%d" % (j % 3), data="x" * 300) for j in range(256)])])
    assert os.path.getsize(wal) == 4 << 20          # rewritten, not grown
    used = log._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1] * 16384
    assert 0 < used < 4 << 20
    # a crash: the files as they are now, the WAL's frames not all in the database file
    b = str(tmp_path / "b")
    os.makedirs(b)
    for name in ("emitterd.db", "emitterd.db-wal"):
        shutil.copyfile(os.path.join(a, name), os.path.join(b, name))
    more = [ev("late", data=i) for i in range(10)]
    log.append([batch(more)])                       # in the WAL only, after the copy
    log.close()
    crashed = open_log(b, wal_bytes=8 << 20)
    assert os.path.getsize(os.path.join(b, "emitterd.db-wal")) == 8 << 20
    assert crashed.head == 5 * 256
    assert [r.position for r in crashed.read(1, 2000)] == list(range(1, 1281))
    crashed.append([batch([ev("s-0", data="after")])])
    crashed.close()
    again = open_log(b, wal_bytes=8 << 20)
    assert again.head == 1281 and again.read(1281, 1)[0].decode()["data"] == "after"
    assert again.read(1, 1)[0].decode()["data"] == "x" * 300
    again.close()
    reopened = open_log(a)
    assert reopened.head == 1290 and reopened.read(1290, 1)[0].decode()["stream"] == "late"
    reopened.close()


@pytest.mark.timeout(20)
def test_the_wal_prefill_is_capped(tmp_path, monkeypatch):
    # wal_rewind_bytes may be set very high (to rewind rarely): the start writes no more
    # than the cap (256 MiB; lowered here to keep the test small)
    from emitterd.eventlog import sqlite as backend
    monkeypatch.setattr(backend, "WAL_PREFILL_MAX", 2 << 20)
    log = open_log(str(tmp_path), wal_bytes=1 << 40)
    assert os.path.getsize(os.path.join(str(tmp_path), "emitterd.db-wal")) == 2 << 20
    log.append([batch([ev("s")])])
    assert log.read(1, 1)[0].decode()["stream"] == "s"
    log.close()


@hypothesis.settings(max_examples=40, **PROPERTY)
@hypothesis.given(data=st.data())
@pytest.mark.timeout(240)
def test_every_stored_body_is_the_event_map_in_its_documented_order(tmp_path_factory, data):
    """Whatever mix of publishes one append takes (with and without client ids, tags,
    metadata, across a 4096-position boundary of the generated ids), each stored body is the
    delivered event map, entries in their fixed order, with the version the stream is at."""
    log = open_log(str(tmp_path_factory.mktemp("log")))
    # often just below a multiple of 4096, where a generated id's prefix changes
    start = data.draw(st.integers(0, 3)) * 4096 + data.draw(
        st.one_of(st.integers(0, 4095), st.integers(3600, 4095)))
    as_if_preceded(log, start)
    salt = log._salt
    versions: dict = {}
    seen_ids: dict = {}
    pos = start
    event = event_maps(st.integers(-(1 << 40), 1 << 40),
                       st.sampled_from(["id-1", "id-2", "id-3", "id-4"]))
    for _ in range(data.draw(st.integers(1, 3))):
        publishes = draw_publishes(data, event, 600)
        batches = [batch(evs) for evs in publishes]
        records = iter(log.append(batches))
        for evs, b in zip(publishes, batches):
            positions, vs = [], []
            for e in evs:
                eid = e.get("id")
                if eid is not None and eid in seen_ids:      # the same id again: not stored
                    positions.append(seen_ids[eid][0])
                    vs.append(seen_ids[eid][1])
                    continue
                pos += 1
                v = versions[e["stream"]] = versions.get(e["stream"], -1) + 1
                if eid is not None:
                    seen_ids[eid] = (pos, v)
                positions.append(pos)
                vs.append(v)
                rec = next(records)
                assert (rec.position, rec.stream, rec.type, list(rec.tags)) == (
                    pos, e["stream"], e["type"], e.get("tags", []))
                stored = msgpack.unpackb(rec.body, raw=False)
                want = {"stream": e["stream"], "type": e["type"], "data": e.get("data"),
                        "metadata": e.get("metadata", {}), "tags": e.get("tags", [])}
                if eid is not None:
                    want.update(id=eid, position=pos)
                else:
                    want.update(position=pos, id=generated_id(salt, pos))
                want.update(version=v, timestamp=stored["timestamp"], attempt=1)
                assert rec.body == msgpack.packb(want)
            assert b.result == {"positions": positions, "versions": vs}
        assert next(records, None) is None and log.head == pos
    log.close()


def _fields(rec):
    return rec.position, rec.stream, rec.type, list(rec.tags), rec.body


@hypothesis.settings(max_examples=30, **PROPERTY)
@hypothesis.given(data=st.data())
@pytest.mark.timeout(240)
def test_cold_reads_give_what_the_appends_gave_in_any_order(tmp_path_factory, data):
    """A cold read decodes each chunk whole (msgspec) and keeps the last few decoded: any
    range, read in any order (cache hits, misses, evictions; chunks of one publish, of
    several, split at CHUNK_EVENTS), gives exactly the records the appends returned."""
    tail_bytes = data.draw(st.sampled_from([1, 1 << 15]))    # 1: every event is cold
    log = open_log(str(tmp_path_factory.mktemp("cold")), tail_events=1024,
                   tail_bytes=tail_bytes)
    event = event_maps(st.integers(-(1 << 63), (1 << 64) - 1), st.text(min_size=1, max_size=8))
    want = {}
    for _ in range(data.draw(st.integers(1, 4))):
        publishes = draw_publishes(data, event, 1500)     # chunks split at 1,024 events
        for rec in log.append([batch(evs) for evs in publishes]):
            want[rec.position] = _fields(rec)
    head = log.head
    assert sorted(want) == list(range(1, head + 1))
    # the byte bound as it is, and one that a chunk or two of these events pass
    kept_bytes = data.draw(st.sampled_from([sqlite_log.COLD_BYTES_KEPT, 20_000]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sqlite_log, "COLD_BYTES_KEPT", kept_bytes)
        for _ in range(data.draw(st.integers(1, 15))):
            start = data.draw(st.integers(1, head))
            limit = data.draw(st.integers(1, 1200))
            got = log.read(start, limit)
            assert [_fields(r) for r in got] == [
                want[p] for p in range(start, min(head, start + limit - 1) + 1)]
            assert len(log._cold) <= sqlite_log.COLD_CHUNKS_KEPT
            assert log._cold_bytes == sum(size for _, _, size in log._cold.values())
            assert log._cold_bytes <= kept_bytes or len(log._cold) == 1
    positions = data.draw(st.lists(st.integers(1, head), max_size=20))
    assert {p: _fields(r) for p, r in log.get(positions).items()} == {p: want[p] for p in positions}
    log.close()


@pytest.mark.timeout(20)
def test_a_chunk_with_other_events_or_cut_short_is_reported_as_damage(tmp_path):
    """A chunk row must hold exactly its events first..last: another row's bodies, or bodies
    cut short, are a damaged log (sqlite3.DatabaseError), not a decoding error."""
    log = open_log(str(tmp_path), tail_events=1024, tail_bytes=1)    # every read is cold
    for i in range(3):
        log.append([batch([ev("s", data=i) for _ in range(5)])])
    db = log._db
    db.execute("UPDATE chunks SET bodies = (SELECT bodies FROM chunks WHERE first = 6) "
               "WHERE first = 1")
    db.execute("UPDATE chunks SET bodies = substr(bodies, 1, length(bodies) - 3) WHERE first = 11")
    assert [r.position for r in log.read(6, 5)] == [6, 7, 8, 9, 10]
    with pytest.raises(sqlite3.DatabaseError) as err:
        log.read(1, 5)
    assert "damaged: position 1 is not in its chunk 1..5" in str(err.value)
    with pytest.raises(sqlite3.DatabaseError) as err:
        log.read(12, 2)
    assert "damaged: position 11 is not in its chunk 11..15" in str(err.value)
    log.close()


@pytest.mark.timeout(20)
def test_a_cold_read_of_an_event_in_no_chunk_is_reported_as_damage(tmp_path):
    """An event at or below the head whose chunk row is gone is a damaged log
    (sqlite3.DatabaseError naming the position), never a short or shifted read; get() leaves
    such a position out."""
    log = open_log(str(tmp_path), tail_events=1024, tail_bytes=1)    # every read is cold
    for i in range(3):
        log.append([batch([ev("s", data=i) for _ in range(5)])])
    log._db.execute("DELETE FROM chunks WHERE first = 6")
    assert [r.position for r in log.read(11, 5)] == [11, 12, 13, 14, 15]
    with pytest.raises(sqlite3.DatabaseError) as err:
        log.read(4, 4)
    assert "damaged: position 6 is in no chunk" in str(err.value)
    assert sorted(log.get([5, 7, 11])) == [5, 11]
    log.close()


_SYNC_FAILS = r"""
import os, sys
from types import SimpleNamespace
from emitterd import logs
from emitterd.control.events import Committer
from emitterd.eventlog import open_log
from emitterd.loop import Loop
from test_eventlog import batch, ev

logs.configure("info", "text")
log = open_log(sys.argv[1])
ctx = SimpleNamespace(log=log, loop=Loop(), shutting_down=False,
                      registry=SimpleNamespace(pump_all=lambda: False))
committer = Committer(ctx)
answered = []
class Conn:                   # hashable by identity, as a control connection is
    channel = SimpleNamespace(flush=lambda: None)
req = SimpleNamespace(reply=answered.append, fail=answered.append, conn=Conn())
committer.submit(batch([ev("s")]), req)
committer.commit()
print("first", answered, flush=True)
# the next fdatasync fails for real: the WAL's fd is now a pipe's (EINVAL)
r, w = os.pipe()
os.dup2(r, log._wal_fd)
committer.submit(batch([ev("s")]), req)
committer.commit()
print("second answered", answered, flush=True)
"""


@pytest.mark.timeout(30)
def test_a_failed_fdatasync_exits_74_before_anything_is_answered(tmp_path):
    """README "Delivered only once durable": what reached the disk is unknown, so the daemon
    logs it and exits with 74 (EX_IOERR) before it answers the publish."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _SYNC_FAILS, str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=20,
                         env=dict(os.environ, PYTHONPATH=here))
    assert out.returncode == 74, (out.returncode, out.stdout, out.stderr)
    assert "first [{'positions': [1], 'versions': [0]}]" in out.stdout, out.stdout
    assert "second answered" not in out.stdout, out.stdout
    assert "the event log could not be synced to disk: exiting" in out.stderr, out.stderr


@pytest.mark.timeout(30)
def test_park_tells_how_many_rows_are_new_and_a_second_park_keeps_one_row(tmp_path):
    """The pool counts parked rows from what park and unpark return (a COUNT(*) per park
    took 25 ms at a million rows): parking an event parked already adds no row, and takes
    the new reason."""
    log = open_log(str(tmp_path))
    log.append([batch([ev("s")] * 10)])
    assert log.park("k", [(p, "nack") for p in (1, 2, 3)]) == 3
    assert log.park("k", [(2, "max_retries"), (4, "nack")]) == 1
    assert log.parked_count("k") == 4
    assert dict(log.parked("k", 10)) == {1: "nack", 2: "max_retries", 3: "nack", 4: "nack"}
    assert log.park("k", [(3, "again")]) == 0 and dict(log.parked("k", 10))[3] == "again"
    assert log.unpark("k", [1, 9]) == 1 and log.parked_count("k") == 3
    log.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("op", ["park", "unpark"])
def test_parking_and_purging_are_one_transaction(tmp_path, op):
    """All or nothing, and one commit: in autocommit every row was a commit (and an fsync)
    of its own, so a purge of 20,000 held the loop for seconds and a full disk halfway
    left half of it done. A trigger fails the 150th row here."""
    log = open_log(str(tmp_path))
    log.append([batch([ev("s")] * 200)])
    if op == "unpark":
        log.park("k", [(p, "nack") for p in range(1, 201)])
    log._db.execute("CREATE TRIGGER fail150 BEFORE %s ON parked WHEN %s.position = 150 "
                    "BEGIN SELECT RAISE(ABORT, 'no room'); END"
                    % (("INSERT", "new") if op == "park" else ("DELETE", "old")))
    before = log.parked_count("k")
    with pytest.raises(sqlite3.DatabaseError, match="no room"):
        if op == "park":
            log.park("k", [(p, "nack") for p in range(1, 201)])
        else:
            log.unpark("k", list(range(1, 201)))
    assert log.parked_count("k") == before and not log._db.in_transaction
    log._db.execute("DROP TRIGGER fail150")
    if op == "unpark":
        assert log.unpark("k", list(range(1, 201))) == 200 and log.parked_count("k") == 0


@pytest.mark.timeout(20)
def test_open_makes_what_an_earlier_run_left_unsynced_durable(tmp_path, monkeypatch):
    """A run killed between a commit's write and its fdatasync leaves events the disk may not
    hold; a new open treats everything in the log as durable (it delivers it and answers a
    retried publish by id), so it fdatasyncs the WAL and the database before reading them."""
    first = open_log(str(tmp_path))
    first.append([batch([ev("a", id="never-synced")])], defer_sync=True)   # no sync(): killed
    synced = []
    real = os.fdatasync

    def spy(fd):
        synced.append(os.readlink("/proc/self/fd/%d" % fd))
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", spy)
    second = open_log(str(tmp_path))
    db = os.path.realpath(str(tmp_path / "emitterd.db"))
    assert db + "-wal" in synced[:2] and db in synced[:2], synced
    assert second.head == 1 and second.durable == 1
    first.close()
    second.close()


def _publish_one(log, events, expected_version=None):
    b = batch(events, expected_version)
    log.append([b])
    return b.result


@pytest.mark.timeout(60)
@pytest.mark.parametrize("expected_version", [None, 0])
def test_republished_generated_ids_read_each_chunk_once(tmp_path, expected_version):
    """Republishing events by their generated ids (README: recognised as duplicates) reads one
    chunk row (up to 1 MiB) from SQLite per id, twice per id when expected_version no longer
    matches: a publish retrying 10,000 events stalls the daemon's whole loop for seconds
    (measured on this VM: 7 s per such publish, ping from another client waiting 13.5 s behind
    three of them). The number of chunk reads should follow the chunks, not the events."""
    # tail_bytes=0: every event is read back from its chunk, as for a log longer than the tail
    log = sqlite_log.SqliteLog(str(tmp_path), tail_bytes=0)
    try:
        first = _publish_one(log, [{"stream": "s", "type": "t", "data": i} for i in range(2048)])
        assert first["positions"] == list(range(1, 2049))       # two chunks of 1,024
        ids = [r.decode()["id"] for r in log.read(1, 2048)]
        chunk_reads = []
        log._db.set_trace_callback(
            lambda sql: chunk_reads.append(sql) if "FROM chunks" in sql else None)
        # the retry of a publish whose answer was lost, by the ids the first one gave
        again = _publish_one(log, [{"stream": "s", "type": "t", "data": i, "id": eid}
                               for i, eid in enumerate(ids)], expected_version)
        log._db.set_trace_callback(None)
        assert again == first                      # recognised: nothing appended
        assert log.head == 2048
        assert len(chunk_reads) <= 8, (
            "%d chunk rows read to recognise 2,048 generated ids held in 2 chunks"
            % len(chunk_reads))
    finally:
        log.close()
