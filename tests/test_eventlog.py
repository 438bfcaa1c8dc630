"""The SQLite event log, used directly: a real file in a temp dir, no daemon."""
import os
import sqlite3
import uuid

import msgpack
import pytest

from emitterd import settings
from emitterd.control.events import validate_publish
from emitterd.errors import ProtocolError
from emitterd.eventlog import PublishBatch, open_log
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
    assert log._tail_bytes <= 64 * 1024 and len(log._tail) <= 2 * 1024
    assert log._tail_start > 1
    got = log.read(1, 5000)
    assert [r.position for r in got] == list(range(1, 5001))
    assert got[0].decode()["stream"] == "s-0" and got[0].tags == []


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
