"""Selectors end to end (PROTOCOL §4): one published set of events, one subscription
per selector case (start_from "origin", a unix subscriber), and the delivered set
must be exactly the expected set once the checkpoint has reached the head.

The expected sets are written out by hand from the contract, not computed with
the daemon's matcher. One daemon and one subscriber serve every case; the
subscriber tells the cases apart by the key in each hello/events frame.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from types import SimpleNamespace
from typing import Any, Dict

import pytest

from daemon_fixture import Daemon
from subscriber_helper import Subscriber, sub_spec, wait_until

# label -> event (published in this order, one publish request: positions 1..N)
EVENTS = [
    ("e0", {"stream": "order-1", "type": "order.created", "tags": ["a"],
            "data": {"n": 1, "s": "apple", "flag": True,
                     "nested": {"x": 1, "y": {"z": "deep"}}, "lst": [1, 2]}}),
    ("e1", {"stream": "order-1", "type": "order.paid", "tags": ["b"],
            "data": {"n": 1.0, "s": "banana", "flag": False}}),
    ("e2", {"stream": "order-2", "type": "order.created", "tags": ["a", "b"],
            "data": {"n": True, "s": "cherry"}}),
    ("e3", {"stream": "order-22", "type": "order.shipped", "tags": ["c"],
            "data": {"n": 5, "s": "apricot", "nested": {"x": 1}}}),
    ("e4", {"stream": "user-1", "type": "user.created", "tags": [],
            "data": {"n": 10.5, "s": 5, "nested": {"x": 2, "y": {"z": "deep"}}}}),
    ("e5", {"stream": "user-1", "type": "user.deleted", "tags": ["a", "b", "c"]}),   # data nil
    ("e6", {"stream": "user-2", "type": "order.created", "tags": ["b", "c"], "data": [1, 2, 3]}),
    ("e7", {"stream": "Order-1", "type": "Order.Created", "tags": ["A"], "data": "string data"}),
    ("e8", {"stream": "order-1x", "type": "order.created", "tags": ["a"],
            "data": {"n": -3, "s": "", "lst": [1.0, 2.0]}}),
    ("e9", {"stream": "misc", "type": "x", "data": {"n": "10", "other": None}}),     # no tags
    ("e10", {"stream": "order-3", "type": "order.created", "tags": ["c"],
             "data": {"nested": {"x": 1.0, "extra": 3}, "n": 0}}),
    ("e11", {"stream": "misc", "type": "o?der", "tags": ["?"], "data": {"s": "a*b", "n": 2}}),
    ("e12", {"stream": "bin", "type": "b", "tags": ["x"], "data": {"b": b"\x00\x01", "n": 3}}),
    ("e13", {"stream": "[ab]c", "type": "br", "data": {}}),
]
LABELS = [label for label, _ in EVENTS]

# (case id, type, selector, expected labels)
CASES = [
    # stream
    ("stream-exact", "stream", "order-1", "e0 e1"),
    ("stream-misc", "stream", "misc", "e9 e11"),
    ("stream-all", "stream", "$all", " ".join(LABELS)),
    # event_type (exact, case-sensitive)
    ("type-exact", "event_type", "order.created", "e0 e2 e6 e8 e10"),
    ("type-case", "event_type", "Order.Created", "e7"),
    # event_pattern: glob on the whole stream id
    ("pattern-question", "event_pattern", "order-?", "e0 e1 e2 e10"),
    ("pattern-star", "event_pattern", "order-*", "e0 e1 e2 e3 e8 e10"),
    ("pattern-suffix", "event_pattern", "*-1", "e0 e1 e4 e5 e7"),
    ("pattern-brackets-literal", "event_pattern", "[ab]*", "e13"),
    # event_pattern: {"stream", "type"} map
    ("pattern-map-type", "event_pattern", {"type": "order.*"}, "e0 e1 e2 e3 e6 e8 e10"),
    ("pattern-map-both", "event_pattern", {"stream": "user-*", "type": "*.created"}, "e4 e6"),
    ("pattern-map-literal-q", "event_pattern", {"stream": "misc", "type": "o?der"}, "e11"),
    # event_payload: plain values (1 == 1.0, true != 1)
    ("payload-int", "event_payload", {"n": 1}, "e0 e1"),
    ("payload-float", "event_payload", {"n": 1.0}, "e0 e1"),
    ("payload-true", "event_payload", {"n": True}, "e2"),
    ("payload-bool-vs-1", "event_payload", {"flag": 1}, ""),
    ("payload-flag-true", "event_payload", {"flag": True}, "e0"),
    ("payload-nil", "event_payload", {"other": None}, "e9"),
    ("payload-bytes", "event_payload", {"b": b"\x00\x01"}, "e12"),
    ("payload-list", "event_payload", {"lst": [1, 2]}, "e0 e8"),
    # event_payload: operators
    ("payload-gt", "event_payload", {"n": {"$gt": 1}}, "e3 e4 e11 e12"),
    ("payload-gte", "event_payload", {"n": {"$gte": 1}}, "e0 e1 e3 e4 e11 e12"),
    ("payload-lt", "event_payload", {"n": {"$lt": 1}}, "e8 e10"),
    ("payload-lte", "event_payload", {"n": {"$lte": 1}}, "e0 e1 e8 e10"),
    ("payload-range", "event_payload", {"n": {"$gt": 0, "$lt": 10}}, "e0 e1 e3 e11 e12"),
    ("payload-gt-string", "event_payload", {"s": {"$gt": "b"}}, "e1 e2"),
    ("payload-ne", "event_payload", {"n": {"$ne": 1}}, "e2 e3 e4 e8 e9 e10 e11 e12"),
    ("payload-in", "event_payload", {"n": {"$in": [1, "10"]}}, "e0 e1 e9"),
    ("payload-nin", "event_payload", {"n": {"$nin": [1, 5, True]}}, "e4 e8 e9 e10 e11 e12"),
    ("payload-exists-true", "event_payload", {"flag": {"$exists": True}}, "e0 e1"),
    ("payload-exists-nil-value", "event_payload", {"other": {"$exists": True}}, "e9"),
    ("payload-exists-false", "event_payload", {"flag": {"$exists": False}},
     "e2 e3 e4 e8 e9 e10 e11 e12 e13"),
    ("payload-glob", "event_payload", {"s": {"$glob": "ap*"}}, "e0 e3"),
    ("payload-glob-literal-star", "event_payload", {"s": {"$glob": "a*b"}}, "e11"),
    ("payload-two-keys", "event_payload", {"n": {"$exists": True}, "s": {"$glob": "*a*"}},
     "e0 e1 e3 e11"),
    # event_payload: nested maps are subsets
    ("payload-nested-subset", "event_payload", {"nested": {"x": 1}}, "e0 e3 e10"),
    ("payload-nested-deep", "event_payload", {"nested": {"y": {"z": "deep"}}}, "e0 e4"),
    ("payload-nested-operator", "event_payload", {"nested": {"x": {"$gte": 2}}}, "e4"),
    # tags
    ("tags-list", "tags", ["a"], "e0 e2 e5 e8"),
    ("tags-list-two", "tags", ["a", "c"], "e0 e2 e3 e5 e6 e8 e10"),
    ("tags-any", "tags", {"any": ["b"]}, "e1 e2 e5 e6"),
    ("tags-all", "tags", {"all": ["a", "b"]}, "e2 e5"),
    ("tags-any-and-all", "tags", {"any": ["c", "A"], "all": ["b"]}, "e5 e6"),
    ("tags-literal-question", "tags", {"all": ["?"]}, "e11"),
]


@pytest.fixture(scope="module")
def selector_run() -> Any:
    """Start a daemon and a subscriber, publish EVENTS, start every case, wait until each
    pool's checkpoint reaches the head; yield a namespace with what the cases compare."""
    d = Daemon()
    tmp = tempfile.mkdtemp(prefix="emd-sel-", dir="/tmp")
    sub = Subscriber(os.path.join(tmp, "sub.sock"))
    try:
        d.start()
        c = d.client()
        res = c.publish([dict(e) for _, e in EVENTS])
        positions = dict(zip(LABELS, res["positions"]))
        keys: Dict[str, str] = {}
        errors: Dict[str, str] = {}
        for i, (cid, typ, sel, _) in enumerate(CASES):
            try:
                st = c.start(sub_spec("sel-%02d-%s" % (i, cid), typ, sel, subscriber=sub.uri))
                keys[cid] = st["key"]
            except Exception as e:  # noqa: BLE001 - reported by that case's test
                errors[cid] = repr(e)
        d.collect_children()
        head = res["positions"][-1]

        def all_done() -> bool:
            pools = {p["key"]: p for p in c.list()["subscriptions"]}
            return all(pools[k]["checkpoint"] == head and pools[k]["in_flight"] == 0
                       for k in keys.values() if k in pools)
        try:
            wait_until(all_done, 60, "every selector pool's checkpoint == head")
        except AssertionError as e:
            errors["__wait__"] = str(e)
        # .daemons: the failure report hook adds this daemon's log tail
        yield SimpleNamespace(daemons=[d], positions=positions, keys=keys, errors=errors,
                              sub=sub, client=c, head=head)
    finally:
        sub.close()
        d.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cid,typ,selector,expected", CASES, ids=[c[0] for c in CASES])
def test_selector_delivers_exactly_the_matching_events(selector_run: Any, cid: str,
                                                       typ: str, selector: Any,
                                                       expected: str) -> None:
    run = selector_run
    assert cid not in run.errors, "start failed: %s" % run.errors[cid]
    key = run.keys[cid]
    st = run.client.status(key)
    assert st["checkpoint"] == run.head and st["in_flight"] == 0, \
        "checkpoint did not reach the head: %r" % {k: st[k] for k in ("checkpoint", "head",
                                                                      "in_flight", "delivered")}
    pos_to_label = {p: label for label, p in run.positions.items()}
    got = run.sub.positions(key)
    got_labels = sorted((pos_to_label.get(p, "?%d" % p) for p in got), key=_order)
    want = sorted(expected.split(), key=_order)
    assert got_labels == want, (
        "%s selector %r: delivered %s, expected %s (each exactly once)"
        % (typ, selector, got_labels, want))
    assert st["delivered"] == len(want)
    assert run.sub.errors == []


def _order(label: str) -> Any:
    return (0, int(label[1:])) if label[1:].isdigit() else (1, label)


@pytest.mark.timeout(30)
def test_every_selector_connection_said_hello_with_its_key(selector_run: Any) -> None:
    run = selector_run
    conns = run.sub.snapshot_conns()
    keys_seen = {c.key for c in conns if c.hello is not None}
    assert set(run.keys.values()) <= keys_seen
    for c in conns:
        assert c.first_op == "hello", "conn %d began with %r" % (c.id, c.first_op)
        for f in c.frames:
            assert f.get("key") == c.key, "events frame key %r on a connection of %r" % (
                f.get("key"), c.key)
