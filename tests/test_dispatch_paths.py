"""The dispatcher over a real SQLite log, with recording worker handles: the fast path
(first attempts without per-event objects) and the moments events leave it."""
import collections
import sqlite3
from typing import Any, Dict, List

import hypothesis
import msgpack
import pytest
from hypothesis import strategies as st

from emitterd import settings
from emitterd.control.events import validate_publish
from emitterd.dispatch import Dispatcher, stream_slot
from emitterd.eventlog import open_log
from emitterd.filters import match_all

CFG = settings.load(env={})


SENT: List[dict] = []        # every event handed to any handle, in order


class Handle:
    """What the dispatcher needs of a worker handle; records every frame it is given."""
    _wid = 0

    def __init__(self, index: int, consumers: int = 1) -> None:
        Handle._wid += 1
        self.wid = Handle._wid
        self.index = index
        self.consumers = consumers
        self.routable_consumers = consumers
        self.frames: List[List[int]] = []
        self.events: List[dict] = []

    def send_batch(self, positions: list, frame: bytes, unsent: bool) -> None:
        msg = msgpack.unpackb(frame[4:], raw=False)
        assert [e["position"] for e in msg["events"]] == positions
        self.frames.append(list(positions))
        self.events.extend(msg["events"])
        SENT.extend(msg["events"])

    def take(self) -> List[int]:
        out = [p for f in self.frames for p in f]
        self.frames.clear()
        return out


def options(**kw: Any) -> dict:
    o = {"strategy": "pinned", "batch_size": 8, "max_in_flight": 64, "max_retries": 3,
         "retry_backoff": (0.0, 0.0)}
    o.update(kw)
    return o


def make(tmp_path: Any, n_events: int, streams: int, **kw: Any) -> Any:
    log = open_log(str(tmp_path))
    evs = [{"stream": "s-%d" % (i % streams), "type": "t", "data": i} for i in range(n_events)]
    log.append([validate_publish({"events": evs}, CFG)])
    parked: list = []
    d = Dispatcher("k", lambda rec: True, log, options(**kw), 0, 1 << 20, lambda when: None,
                   parked.extend, lambda ps: None)
    return log, d, parked


@pytest.mark.timeout(20)
def test_first_attempts_take_the_fast_path_and_acks_move_the_checkpoint(tmp_path: Any) -> None:
    log, d, _ = make(tmp_path, 40, 12)
    a, b = Handle(0), Handle(1)
    d.pump([a, b], False)
    assert d.entries == {} and d.flying_count == 40 and d.in_flight == 40
    assert d.held_by_workers() == 40
    assert d.worker_in_flight(a.wid) + d.worker_in_flight(b.wid) == 40
    pa, pb = a.take(), b.take()
    assert pa and pb and sorted(pa + pb) == list(range(1, 41))
    assert all(e["attempt"] == 1 for e in a.events + b.events)
    (h1, p1), (h2, p2) = sorted([(a, pa), (b, pb)], key=lambda x: x[1][0])   # h1 holds 1
    d.on_ack(h2.wid, h2.index, p2)
    assert d.checkpoint == 0 and d.in_flight == len(p1)
    d.on_ack(h1.wid, h1.index, p1[:1])
    assert d.checkpoint == min(p1[1], p2[0]) - 1
    d.on_ack(h1.wid, h1.index, p1[1:])
    assert d.checkpoint == 40 and d.in_flight == 0 and d.held_by_workers() == 0
    assert d.delivered == 40 and d.worker_delivered == {0: len(pa), 1: len(pb)}


@pytest.mark.timeout(20)
def test_an_ack_from_the_wrong_worker_changes_nothing(tmp_path: Any) -> None:
    log, d, _ = make(tmp_path, 8, 1)
    a, b = Handle(0), Handle(1)
    d.pump([a, None], False)
    ps = a.take()
    d.on_ack(b.wid, 1, ps)
    assert d.in_flight == 8 and d.delivered == 0 and d.checkpoint == 0
    d.on_ack(a.wid, 0, ps)
    assert d.in_flight == 0 and d.checkpoint == 8


@pytest.mark.timeout(20)
def test_nack_retry_moves_fast_events_to_entries_with_attempt_2(tmp_path: Any) -> None:
    log, d, _ = make(tmp_path, 8, 1)
    a = Handle(0)
    d.pump([a], False)
    ps = a.take()
    d.on_nack(a.wid, ps[:3], "retry", "boom")
    assert sorted(d.entries) == ps[:3] and d.flying_count == 5
    assert d.held_by_workers() == 5 and d.checkpoint == 0
    d.pump([a], False)                       # backoff 0: due at once
    again = a.events[-3:]
    assert a.take() == ps[:3] and [e["attempt"] for e in again] == [2, 2, 2]
    d.on_ack(a.wid, 0, ps)
    assert d.in_flight == 0 and d.checkpoint == 8 and d.retried == 3


@pytest.mark.timeout(20)
def test_worker_lost_redelivers_fast_events_with_the_next_attempt(tmp_path: Any) -> None:
    log, d, _ = make(tmp_path, 10, 2)
    a, b = Handle(0), Handle(1)
    d.pump([a, b], False)
    lost_ps = a.take()
    b.take()
    assert d.worker_lost(a.wid) == len(lost_ps)
    c = Handle(0)
    d.pump([c, b], False)
    assert c.take() == lost_ps
    assert {e["attempt"] for e in c.events} == {2}
    assert d.worker_in_flight(a.wid) == 0


@pytest.mark.timeout(20)
def test_park_and_skip_take_fast_events_out(tmp_path: Any) -> None:
    log, d, parked = make(tmp_path, 6, 1)
    a = Handle(0)
    d.pump([a], False)
    ps = a.take()
    d.on_nack(a.wid, ps[:2], "park", "bad")
    d.on_nack(a.wid, ps[2:4], "skip", None)
    assert parked == [(ps[0], "bad"), (ps[1], "bad")]
    assert d.in_flight == 2 and d.checkpoint == ps[3]
    d.on_ack(a.wid, 0, ps[4:])
    assert d.checkpoint == 6 and d.parked == 2


@pytest.mark.timeout(20)
def test_pinned_order_holds_across_a_resize_with_events_in_flight(tmp_path: Any) -> None:
    log, d, _ = make(tmp_path, 60, 12, max_in_flight=1000)
    start = len(SENT)
    a, b = Handle(0), Handle(1)
    d.pump([a, b], False)
    first: Dict[int, List[int]] = {a.wid: a.take(), b.wid: b.take()}
    # grow to 3 workers while all 60 are in flight, then publish 60 more
    evs = [{"stream": "s-%d" % (i % 12), "type": "t", "data": i} for i in range(60)]
    log.append([validate_publish({"events": evs}, CFG)])
    c = Handle(2)
    d.pump([a, b, c], False)
    by_stream_old = {"s-%d" % k: (a.wid if stream_slot("s-%d" % k, 2) == 0 else b.wid)
                     for k in range(12)}
    moved = {s for s, w in by_stream_old.items()
             if [a.wid, b.wid, c.wid][stream_slot(s, 3)] != w}
    assert moved, "no stream changed worker: the test needs one"
    got = collections.defaultdict(list)
    for h in (a, b, c):
        for e in h.events[len(first.get(h.wid, [])):]:
            got[e["stream"]].append((h.wid, e["position"]))
    for s in moved:
        assert got[s] == [], "stream %s got events on another worker before its earlier " \
                             "ones were acked: %r" % (s, got[s])
    # streams that kept their worker were not held back
    kept = set(by_stream_old) - moved
    assert any(got[s] for s in kept)
    # ack the first round: the moved streams now go to their new worker, in order
    d.on_ack(a.wid, 0, first[a.wid])
    d.on_ack(b.wid, 1, first[b.wid])
    for h in (a, b, c):
        h.take()
    d.pump([a, b, c], False)
    order = collections.defaultdict(list)
    for e in SENT[start:]:
        order[e["stream"]].append(e["position"])
    for s, ps in order.items():
        assert ps == sorted(ps), "stream %s out of order: %r" % (s, ps)
    for s in moved:
        new_wid = [a.wid, b.wid, c.wid][stream_slot(s, 3)]
        h = {a.wid: a, b.wid: b, c.wid: c}[new_wid]
        assert any(e["stream"] == s and e["position"] > 60 for e in h.events)
    assert d.in_flight == 60 and d.cursor == 121


@pytest.mark.timeout(30)
@pytest.mark.parametrize("seed", range(4))
def test_pinned_back_pressure_keeps_each_stream_in_order_and_on_its_worker(
        tmp_path: Any, seed: int) -> None:
    """Workers full at random moments, acks in random pieces, a match-all selector and frames
    split by the byte budget: every event reaches the worker of its stream's slot exactly
    once, in order per stream, and the checkpoint reaches the head."""
    import random

    rnd = random.Random(seed)
    log = open_log(str(tmp_path))
    d = Dispatcher("k", match_all, log, options(max_in_flight=7, batch_size=5), 0,
                   4096 + 600, lambda when: None, lambda rows: None, lambda ps: None)
    frames: List[tuple] = []      # (events, bytes) of every frame handed out

    class Sized(Handle):
        def send_batch(self, positions: list, frame: bytes, unsent: bool) -> None:
            frames.append((len(positions), len(frame)))
            super().send_batch(positions, frame, unsent)
    hs = [Sized(0), Sized(1), Sized(2)]
    unacked: Dict[int, List[int]] = {h.wid: [] for h in hs}
    published = 0
    for _ in range(60):
        n = rnd.randint(1, 40)
        evs = [{"stream": "s-%d" % rnd.randrange(9), "type": "t", "data": "x" * rnd.randrange(300)}
               for _ in range(n)]
        log.append([validate_publish({"events": evs}, CFG)])
        published += n
        for _ in range(rnd.randint(1, 3)):
            d.pump(hs, False)
            assert all(d.worker_in_flight(h.wid) <= 7 for h in hs)
            for h in hs:
                unacked[h.wid].extend(h.take())
                k = rnd.randint(0, len(unacked[h.wid]))
                if k:
                    d.on_ack(h.wid, h.index, unacked[h.wid][:k])
                    del unacked[h.wid][:k]
    for _ in range(1000):
        if d.checkpoint == published:
            break
        d.pump(hs, False)
        for h in hs:
            unacked[h.wid].extend(h.take())
            d.on_ack(h.wid, h.index, unacked[h.wid])
            unacked[h.wid] = []
    assert d.checkpoint == published and d.in_flight == 0
    seen = [p for h in hs for p in (e["position"] for e in h.events)]
    assert sorted(seen) == list(range(1, published + 1))
    assert all(n <= 5 and size <= 4096 + 600 for n, size in frames)
    assert any(n < 5 for n, _ in frames[:-3])     # some were cut by the byte budget
    for h in hs:
        per_stream = collections.defaultdict(list)
        for e in h.events:
            assert hs[stream_slot(e["stream"], 3)] is h
            per_stream[e["stream"]].append(e["position"])
        assert all(ps == sorted(ps) for ps in per_stream.values())
    assert all(e["attempt"] == 1 for h in hs for e in h.events)


class Recorder:
    """A worker handle that keeps every frame exactly as sent."""

    def __init__(self, wid: int, index: int, consumers: int) -> None:
        self.wid = wid
        self.index = index
        self.consumers = consumers
        self.routable_consumers = consumers
        self.frames: List[tuple] = []
        self.unsettled: List[List[int]] = []

    def send_batch(self, positions: list, frame: bytes, unsent: bool) -> None:
        self.frames.append((list(positions), frame, unsent))
        self.unsettled.append(list(positions))


def _dispatcher(log: Any, opts: dict, matcher: Any = match_all, max_frame: int = 1 << 20) -> Any:
    return Dispatcher("k", matcher, log, dict(opts), 0, max_frame, lambda when: None,
                      lambda rows: None, lambda ps: None)


def _run_steps(log: Any, matcher: Any, opts: dict, max_frame: int, shape: list, steps: list,
               whole: bool) -> tuple:
    """Drive one dispatcher through `steps`; with whole=False the chunk path is switched off
    (each chunk goes through the per-event loop). Returns what every slot was sent and the
    dispatcher's state after each step."""
    d = _dispatcher(log, opts, matcher, max_frame)
    taken = [0]
    if not whole:
        d._route_chunk = lambda *a: (0, 0)
    else:
        real = d._route_chunk

        def spy(*a: Any) -> int:
            n = real(*a)
            taken[0] += n[1] > 0
            return n
        d._route_chunk = spy
    wids = iter(range(1, 1000))
    slots = [None if c is None else Recorder(next(wids), i, c) for i, c in enumerate(shape)]
    sent: Dict[int, list] = collections.defaultdict(list)
    states = []
    for step in steps:
        kind, i, arg = step
        w = slots[i % len(slots)]
        if kind == "pump":
            d.pump(slots, False)
        elif w is None:
            continue
        elif kind == "ack" and w.unsettled:
            d.on_ack(w.wid, w.index, w.unsettled.pop(0))
        elif kind == "nack" and w.unsettled:
            d.on_nack(w.wid, w.unsettled.pop(0), arg, "test")
        elif kind == "lose":
            d.worker_lost(w.wid)
            sent[w.index].extend(w.frames)
            slots[w.index] = Recorder(next(wids), w.index, w.consumers)
        for s in slots:
            if s is not None:
                sent[s.index].extend(s.frames)
                s.frames = []
        states.append((d.checkpoint, d.in_flight, d.held_by_workers(), sorted(d.entries),
                       d.delivered, sorted(d.per_worker.values())))
    return dict(sent), states, taken[0]


@hypothesis.settings(max_examples=300, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.too_slow])
@hypothesis.given(data=st.data())
@pytest.mark.timeout(240)
def test_whole_chunks_are_routed_as_the_per_event_loop_routes_them(tmp_path_factory: Any,
                                                                   data: Any) -> None:
    """The pinned strategy's chunk path (_route_chunk) must send every worker the very frames,
    and leave the very state, that the per-event loop would: any pool shape (slots without a
    worker or without a consumer), windows and frames too small for a chunk, filters, acks,
    nacks and lost workers in between."""
    shape = data.draw(st.lists(st.sampled_from([1, 1, 1, 2, 0, None]), min_size=1, max_size=5))
    opts = options(batch_size=data.draw(st.integers(1, 40)),
                   max_in_flight=data.draw(st.integers(1, 200)))
    # FRAME_SLACK + what events may fill: often less than one event (it goes alone then)
    max_frame = 4096 + data.draw(st.one_of(st.integers(50, 400), st.integers(400, 6000)))
    n_streams = data.draw(st.integers(1, 12))
    even_only = data.draw(st.booleans())
    log = open_log(str(tmp_path_factory.mktemp("log")))
    publishes = data.draw(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 300)),
                                   min_size=1, max_size=4))
    first = 0
    for n, pad in publishes:
        evs = [{"stream": "s-%d" % ((first + i) % n_streams), "type": "t",
                "data": {"i": first + i, "pad": "x" * ((first + i) * 7 % (pad + 1))}}
               for i in range(n)]
        first += n
        log.append([validate_publish({"events": evs}, CFG)])
    steps = data.draw(st.lists(st.one_of(
        st.just(("pump", 0, None)),
        st.tuples(st.just("ack"), st.integers(0, 4), st.none()),
        st.tuples(st.just("nack"), st.integers(0, 4), st.sampled_from(["retry", "skip", "park"])),
        st.tuples(st.just("lose"), st.integers(0, 4), st.none())), min_size=1, max_size=30))
    steps.append(("pump", 0, None))
    matcher = (lambda rec: int(rec.stream[2:]) % 2 == 0) if even_only else match_all
    whole = _run_steps(log, matcher, opts, max_frame, shape, steps, whole=True)
    each = _run_steps(log, matcher, opts, max_frame, shape, steps, whole=False)
    assert whole[0] == each[0]
    assert whole[1] == each[1]
    log.close()


@pytest.mark.timeout(30)
def test_a_pool_with_room_takes_the_chunk_path(tmp_path: Any) -> None:
    """The property test above compares something only if the chunk path is taken: here it
    must be, for every chunk, and the frames still match the per-event loop's."""
    log = open_log(str(tmp_path))
    evs = [{"stream": "s-%d" % (i % 7), "type": "t", "data": i} for i in range(1200)]
    log.append([validate_publish({"events": evs}, CFG)])
    steps = [("pump", 0, None)] + [("ack", i % 2, None) for i in range(40)] + [("pump", 0, None)]
    opts = options(batch_size=64, max_in_flight=2000)
    whole = _run_steps(log, match_all, opts, 1 << 20, [1, 1], steps, whole=True)
    each = _run_steps(log, match_all, opts, 1 << 20, [1, 1], steps, whole=False)
    assert whole[2] == 3 and each[2] == 0          # 1,200 events: chunks of 512, 512, 176
    assert whole[:2] == each[:2]
    assert sum(len(f[0]) for fs in whole[0].values() for f in fs) == 1200
    log.close()


def _two_streams() -> tuple:
    """A stream pinned to slot 0 and one pinned to slot 1 of two."""
    names = ["s-%d" % i for i in range(64)]
    return (next(s for s in names if stream_slot(s, 2) == 0),
            next(s for s in names if stream_slot(s, 2) == 1))


def _two_worker_pool(tmp_path: Any, slots: List[int]) -> tuple:
    """A log with an event for each of `slots` (0 or 1) in a stream pinned to that slot of
    two, and a dispatcher with a window of 8 and frames of 4."""
    streams = _two_streams()
    log = open_log(str(tmp_path))
    evs = [{"stream": streams[s], "type": "t", "data": i} for i, s in enumerate(slots)]
    log.append([validate_publish({"events": evs}, CFG)])
    return log, _dispatcher(log, options(batch_size=4, max_in_flight=8))


def _alternating(tmp_path: Any, n: int) -> tuple:
    """n events alternating between the two workers' streams."""
    return _two_worker_pool(tmp_path, [i % 2 for i in range(n)])


@pytest.mark.timeout(20)
def test_a_pool_catching_up_waits_for_acks_instead_of_holding_events_back(tmp_path: Any) -> None:
    """One worker full, the other with half its window or more in flight: nothing is read on
    and nothing held back (an Entry each); once both have room the next events go out whole."""
    log, d = _alternating(tmp_path, 200)
    a, b = Recorder(1, 0, 1), Recorder(2, 1, 1)
    d.pump([a, b], False)
    assert [f[0] for f in a.frames] == [[1, 3, 5, 7], [9, 11, 13, 15]]
    assert [f[0] for f in b.frames] == [[2, 4, 6, 8], [10, 12, 14, 16]]
    assert d.entries == {} and d.cursor == 17
    d.on_ack(a.wid, 0, a.unsettled.pop(0))
    d.pump([a, b], False)               # a: 4 in flight of 8, b full: wait
    assert len(a.frames) == 2 and d.entries == {} and d.cursor == 17
    d.on_ack(b.wid, 1, b.unsettled.pop(0))
    d.pump([a, b], False)
    assert a.frames[2][0] == [17, 19, 21, 23] and b.frames[2][0] == [18, 20, 22, 24]
    assert d.entries == {} and d.cursor == 25
    log.close()


@pytest.mark.timeout(20)
def test_a_worker_below_half_its_window_is_not_starved_by_a_full_one(tmp_path: Any) -> None:
    """The other side of the wait: a worker that has acked below half its window gets its
    events at once, and the full worker's share is held back for it, as before."""
    log, d = _alternating(tmp_path, 200)
    a, b = Recorder(1, 0, 1), Recorder(2, 1, 1)
    d.pump([a, b], False)
    d.on_ack(a.wid, 0, a.unsettled.pop(0))
    d.on_ack(a.wid, 0, a.unsettled.pop(0))      # a: nothing in flight; b: full
    d.pump([a, b], False)
    assert [f[0] for f in a.frames[2:]] == [[17, 19, 21, 23], [25, 27, 29, 31]]
    assert len(b.frames) == 2
    assert sorted(d.entries) == list(range(18, 31, 2))     # b's, held for it in order
    d.on_ack(b.wid, 1, b.unsettled.pop(0))
    d.pump([a, b], False)
    assert b.frames[2][0] == [18, 20, 22, 24]
    log.close()


@pytest.mark.timeout(60)
def test_a_balanced_catch_up_holds_nothing_back(tmp_path: Any) -> None:
    """Two workers acking in turn through a backlog: every event leaves on the chunk path's
    bookkeeping (no Entry ever), in order per stream, and the checkpoint reaches the head."""
    log, d = _alternating(tmp_path, 600)
    a, b = Recorder(1, 0, 1), Recorder(2, 1, 1)
    for i in range(1000):
        d.pump([a, b], False)
        assert d.entries == {}
        w = (a, b)[i % 2]
        if w.unsettled:
            d.on_ack(w.wid, w.index, w.unsettled.pop(0))
        if d.checkpoint == 600:
            break
    assert d.checkpoint == 600
    for w, parity in ((a, 1), (b, 0)):
        got = [p for f in w.frames for p in f[0]]
        assert got == [p for p in range(1, 601) if p % 2 == parity]
    log.close()


@pytest.mark.timeout(20)
def test_a_settling_pool_stops_at_the_first_event_of_a_full_worker(tmp_path: Any) -> None:
    """Both workers half full or more: a chunk goes out up to the first event whose worker has
    no room left, and the events after it wait in the log (not held back one by one), even
    those of the worker with room: it still has half its window in flight."""
    log, d = _two_worker_pool(tmp_path, [0] * 8 + [1] * 8 + [0] * 6 + [1] * 6)
    a, b = Recorder(1, 0, 1), Recorder(2, 1, 1)
    d.pump([a, b], False)
    assert [p for f in a.frames for p in f[0]] == list(range(1, 9))
    assert [p for f in b.frames for p in f[0]] == list(range(9, 17))
    d.on_ack(a.wid, 0, a.unsettled.pop(0))
    d.on_ack(b.wid, 1, b.unsettled.pop(0))
    d.pump([a, b], False)           # room 4 and 4: a's 17-20 go, then 21 (a full) stops it
    assert a.frames[2][0] == [17, 18, 19, 20] and len(b.frames) == 2
    assert d.entries == {} and d.cursor == 21
    d.on_ack(b.wid, 1, b.unsettled.pop(0))      # b below half: refilled, a's share held
    d.pump([a, b], False)
    assert b.frames[2][0] == [23, 24, 25, 26] and sorted(d.entries) == [21, 22]
    log.close()


@pytest.mark.timeout(20)
def test_a_failing_park_is_said_once_a_minute_and_a_late_nack_is_ignored(
        tmp_path: Any, monkeypatch: Any, caplog: Any) -> None:
    """Each redelivery of an event that cannot be parked fails the same way: one error line
    a minute (it was one per redelivery, or with a counter, none for a second outage); a
    nack of positions no longer in flight (after update checkpoint) parks nothing."""
    import logging
    from emitterd import logs

    log = open_log(str(tmp_path))
    log.append([validate_publish({"events": [{"stream": "s", "type": "t"}] * 4}, CFG)])

    def cannot_park(rows: list) -> None:
        raise sqlite3.OperationalError("disk I/O error")
    d = Dispatcher("k", lambda rec: True, log, options(max_retries=0), 0, 1 << 20,
                   lambda when: None, cannot_park, lambda ps: None)
    clock = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: clock[0])
    a = Handle(0)
    lines = lambda: [r for r in caplog.records if "could not park" in r.getMessage()]  # noqa: E731
    with caplog.at_level(logging.INFO, logger="emitterd"):
        logging.getLogger("emitterd").propagate = True
        try:
            for step in range(3):        # three failures within the minute, one line
                d.pump([a], False)
                d.on_nack(a.wid, a.take(), "park", "bad")
                d.retry_heap.clear()
                d.ready.extend(sorted(d.entries))
                clock[0] += 5
            assert len(lines()) == 1
            clock[0] += 60                   # a minute on: said again
            d.pump([a], False)
            d.on_nack(a.wid, a.take(), "park", "bad")
            assert len(lines()) == 2
            d.on_nack(a.wid, [999], "park", "late")      # not in flight: nothing at all
            assert len(lines()) == 2
        finally:
            logging.getLogger("emitterd").propagate = False
