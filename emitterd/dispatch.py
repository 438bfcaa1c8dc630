"""Per pool: cursor over the log, routing by strategy, in-flight window, retries, checkpoint."""
import heapq
import random
import sqlite3
import struct
import zlib
from bisect import bisect_left
from itertools import compress
from operator import attrgetter
from typing import Any, Callable, Optional, Tuple

import msgpack

from emitterd import logs
from emitterd.filters import match_all
from emitterd.loop import monotonic

logger = logs.get("dispatch")   # self.log is the event log
_SAY_AT = (20, 100, 1000, 10000)  # attempts from lost consumers at which to warn, then every 10,000

SCAN_CHUNK = 512
SCAN_LIMIT = 20_000        # log records examined per pump, so one pool cannot stall the loop
FRAME_SLACK = 4096         # room for the frame envelope around the events
_LEN = struct.Struct(">I")
_packer = msgpack.Packer(use_bin_type=True)
_positions = attrgetter("position")
_bodies = attrgetter("body")
_streams = attrgetter("stream")


def _settling(room: dict, max_if: int) -> bool:
    """Whether every worker of a pool has half its window or more in flight.

    Then a pinned pool that is catching up routes a chunk only up to the first event whose
    worker has no room left, and reads nothing while a worker is full: it waits for more acks
    rather than hold that worker's share of the next events back, an Entry each, routed again
    one by one on its ack (half of a backlog's events went that way). Every ack ends a loop
    turn and every turn ends with a pump, so waiting costs no wake-up. A worker that runs
    below half its window is refilled at once, the full worker's share held back for it as
    before, up to hold_limit events in all; past that the full worker's slot lags (a read
    position of its own, _catch_up) and the others read on. A lagging slot's worker is left
    out of this test: it waits for its own acks (README, changes 25 and 29)."""
    return max(room.values()) <= max_if // 2


# bytes.translate tables: slot 0's events of a chunk, and slot 1's, as 1s among 0s
_SLOT_IS = [bytes(i == j for j in range(256)) for i in range(2)]


class Entry:
    """An unfinished matching event off the fast path: queued, held, retried, replayed, or
    in flight after any of those (first attempts in flight live in Dispatcher.flying)."""
    __slots__ = ("rec", "attempt", "retries", "wid", "replay", "sent", "handed", "retrying")

    def __init__(self, rec: Any, replay: bool = False) -> None:
        self.rec = rec
        self.attempt = 1
        self.retries = 0
        self.wid: Optional[int] = None
        self.replay = replay
        self.sent = True        # False while it waits inside a worker with no consumer
        self.handed = False     # ever handed to a worker (in_flight counts it from then on)
        self.retrying = False   # due again after a retry: counted in `retried` once sent


def stream_slot(stream: str, n: int) -> int:
    """Stable hash of a stream id onto n workers (the same in every run)."""
    return zlib.crc32(stream.encode("utf-8", "surrogatepass")) % n


def _cached_slot(slots: dict, stream: str, n: int) -> int:
    """stream_slot() through a dispatcher's per-stream cache (Dispatcher._slot_table)."""
    s = slots.get(stream)
    if s is None:
        s = slots[stream] = stream_slot(stream, n)
    return s


SLOT_CACHE_MAX = 100_000
# Seconds a pinned slot's worker goes without an ack, its window full and its held-back share
# too, before the slot lags. A slow worker that acks keeps the others' reading behind it (so a
# graceful stop leaves no acked event after the checkpoint); a stuck one does not stall them.
STUCK_AFTER = 1.0


class Dispatcher:
    """Moves matching events from the log to workers and tracks them until they are handled.

    Workers are handles with .wid, .index, .consumers and .send_batch(positions, frame).
    """

    def __init__(self, key: str, matcher: Callable[[Any], bool], log: Any, options: dict,
                 checkpoint: int, max_frame: int, schedule: Callable[[float], Any],
                 on_park: Callable[[list], Any], on_unpark: Callable[[list], Any]) -> None:
        self.key = key
        self.matcher = matcher
        self.log = log
        self._routing: Optional[tuple] = None
        self.options = options
        self.max_frame = max_frame
        self.schedule = schedule
        self.on_park = on_park
        self.on_unpark = on_unpark
        self.cursor = checkpoint + 1
        self.entries: dict = {}
        # The fast path: first attempts handed to a worker that has a consumer, wid ->
        # {position: record}. No per-event object; each worker's dict is filled in ascending
        # position order, so its first key is its lowest. Anything unusual (nack,
        # requeue...) moves an event to `entries`.
        self.flying: dict = {}
        self.ready: list = []          # heap of positions to (re)send, lowest first
        self.retry_heap: list = []     # (due, position)
        self.per_worker: dict = {}     # wid -> events in flight on it
        # Pinned: slots read past while their worker was stuck (slot -> the first position
        # not yet read for it), counted among _lag_n slots. The cursor reads on for the other
        # slots; _catch_up reads each lagging slot's events again once its worker has room.
        self._lags: dict = {}
        self._lag_n = 0
        self.stuck_after = STUCK_AFTER
        # a lagging slot's held entries, out of `ready` while its worker has no room (each
        # pump popped and pushed back all of them: 3.2 ms a pump with 8,000 held)
        self._held_for: dict = {}      # slot -> ascending positions
        self._full_since: dict = {}    # slot -> (its worker's wid and answers, since when)
        self._handled_nacks: dict = {}  # wid -> events it answered with nack skip or park
        # pinned order across resizes: streams whose in-flight events sit on a worker that is
        # not their slot any more (-> that wid); recomputed only while routing changes settle
        self._misplaced: dict = {}
        self._slots: dict = {}          # stream -> slot, for _slot_n workers
        self._slot_n = 0
        self.draining = False
        self._matches_at = 0            # a position _skip_unmatched found matching
        self.scanned = 0                # records its last unmatched scan read
        self.name = key                 # for log lines: the pool sets its name (§2 "used in logs")
        self._park_said = logs.Throttle(burst=1, period=60.0)
        self.scan_failed = False        # a stopped or failed pool's scan met an unreadable log
        self.delivered = 0
        self.retried = 0
        self.parked = 0
        # parked events sent again by `parked replay`, until acked, skipped or parked again:
        # not listed as parked meanwhile (their rows stay on disk, so a restart lists them)
        self.replaying: set = set()
        self.worker_delivered: dict = {}   # index -> acked events
        self._rr = 0
        # {"op": "events", "key": key, "events": [...]}: everything up to the array header
        self._prefix = b"\x83" + b"".join(_packer.pack(x) for x in ("op", "events", "key", key,
                                                                    "events"))

    # ---- state ---------------------------------------------------------------
    @property
    def options(self) -> dict:
        return self._options

    @options.setter
    def options(self, options: dict) -> None:
        self._options = options
        # a strategy switched back to pinned finds events handed out meanwhile by another
        # strategy, possibly off their stream's slot: the misplaced streams are looked at anew
        self._routing = None
    @property
    def in_flight(self) -> int:
        """§2: handed to workers and not yet finished, retries waiting included (events
        held back in the parent for a full window were never handed)."""
        return sum(e.handed for e in self.entries.values()) + self.flying_count

    @property
    def flying_count(self) -> int:
        return sum(map(len, self.flying.values()))

    @property
    def cursor_checkpoint(self) -> int:
        """Highest P with every matching event up to P handled (may exceed the head)."""
        low = min(self.cursor, *self._lags.values()) if self._lags else self.cursor
        for p, e in self.entries.items():
            if p < low and not e.replay:
                low = p
        for fw in self.flying.values():
            if fw:
                low = min(low, next(iter(fw)))     # a worker's first key is its lowest
        return low - 1

    @property
    def checkpoint(self) -> int:
        return min(self.cursor_checkpoint, self.log.head)

    def set_checkpoint(self, position: int) -> None:
        """Move the cursor: events after `position` are delivered (again), none up to it."""
        self.entries.clear()
        self.replaying.clear()
        self.flying.clear()
        self.ready.clear()
        self.retry_heap.clear()
        self.per_worker.clear()
        self._lags.clear()
        self._full_since.clear()
        self._held_for.clear()
        self._routing = None
        self._misplaced = {}
        self.cursor = position + 1
        self.scan_failed = False        # elsewhere now: try reading again

    def pass_unmatched(self, limit: int = SCAN_LIMIT) -> bool:
        """For a stopped or failed pool: its checkpoint still passes the events that do not
        match it (§5 defines it so, whatever the pool's state); True when more is left."""
        self.scanned = 0
        if self.cursor > self.log.head or self.scan_failed:
            return False
        return self._skip_unmatched(limit)

    def _skip_unmatched(self, limit: int = SCAN_LIMIT) -> bool:
        """With no worker to route to (an attached pool without consumer): move the cursor
        over events that do not match, up to the first that does, so the checkpoint passes
        them as PROTOCOL §5 says; True when the scan stopped at `limit` records with more
        to do. `scanned` says how many it read (the callers share one budget a turn)."""
        self.scanned = 0
        if self.matcher is match_all or self.cursor == self._matches_at:
            return False      # stopped at an event that matches: nothing to read again
        matcher = self.matcher
        while self.scanned < limit:
            recs = self.log.read(self.cursor, SCAN_CHUNK)
            if not recs:
                return False
            self.scanned += len(recs)
            for r in recs:
                if matcher(r):
                    self.cursor = self._matches_at = r.position
                    return False
            self.cursor = recs[-1].position + 1
        return self.cursor <= self.log.head

    # ---- sending ---------------------------------------------------------------
    def _slot_table(self, n: int) -> dict:
        if self._slot_n != n or len(self._slots) > SLOT_CACHE_MAX:
            self._slots = {}
            self._slot_n = n
        return self._slots

    def _misplaced_streams(self, targets: list) -> dict:
        """Pinned: streams with events in flight on a worker that is not their slot's now
        (their next events must wait); cheap unless the routing changed recently."""
        routing = tuple(w.wid if w is not None else None for w in targets)
        if routing == self._routing and not self._misplaced:
            return self._misplaced
        self._routing = routing
        n = len(targets)
        slots = self._slot_table(n)
        out: dict = {}

        def check(stream: str, wid: int) -> None:
            if routing[_cached_slot(slots, stream, n)] != wid:
                out[stream] = wid
        for wid, fw in self.flying.items():
            for rec in fw.values():
                check(rec.stream, wid)
        for e in self.entries.values():
            if e.wid is not None:
                check(e.rec.stream, e.wid)
        self._misplaced = out
        return out

    def pump(self, slots: list, attach_mode: bool, skip_limit: int = SCAN_LIMIT) -> bool:
        """Hand out what the workers have room for; True when work was left for next turn."""
        if self.draining:
            return False      # a drain only waits for what workers hold; nothing new goes out
        due = self.retry_heap
        if due and due[0][0] <= monotonic():
            self._release_due()
        if not self.ready and self.cursor > self.log.head and not self._lags \
                and not self._held_for:
            return False
        if attach_mode:
            targets = [w for w in slots if w is not None and w.routable_consumers > 0]
        else:
            targets = slots
        routable = [w for w in targets if w is not None]
        if not routable:
            return self._skip_unmatched(skip_limit)
        opts = self.options
        max_if = opts["max_in_flight"]
        per_worker = self.per_worker
        room = {w.wid: max_if - per_worker.get(w.wid, 0) for w in routable}
        free = sum(r for r in room.values() if r > 0)
        if free <= 0:
            return False
        strategy = opts["strategy"]
        pinned = strategy == "pinned"
        batch_size = opts["batch_size"]
        frame_budget = self.max_frame - FRAME_SLACK
        batches: dict = {}
        blocked: set = set()
        entries = self.entries
        n_targets = len(targets)
        slot_of = self._slot_table(n_targets)
        misplaced = self._misplaced_streams(targets) if pinned else {}

        def choose(stream: str) -> Any:
            # the new-events loop below has the pinned branch written out: change both
            if pinned:
                if stream in blocked:
                    return None
                w = targets[_cached_slot(slot_of, stream, n_targets)]
                if w is None or room[w.wid] <= 0:
                    return None
                if misplaced:
                    m = misplaced.get(stream)
                    if m is not None and m != w.wid:
                        return None   # its earlier events are still in flight on another worker
                return w
            if strategy == "round_robin":
                n = len(routable)
                for i in range(n):
                    w = routable[(self._rr + i) % n]
                    if room[w.wid] > 0:
                        self._rr = (self._rr + i + 1) % n
                        return w
                return None
            open_ = [w for w in routable if room[w.wid] > 0]
            return random.choice(open_) if open_ else None

        def assign(pos: int, e: Entry, w: Any) -> None:
            nonlocal free
            e.wid = w.wid
            e.handed = True
            if e.retrying:          # §3: retried counts deliveries made again
                e.retrying = False
                self.retried += 1
            room[w.wid] -= 1
            free -= 1
            per_worker[w.wid] = per_worker.get(w.wid, 0) + 1
            e.sent = w.consumers > 0
            self._add_run(w, [pos], [e.rec.encoded(e.attempt)], batches, batch_size,
                          frame_budget, fast=False)

        # 1. redeliveries and held events first, lowest position first
        held = []
        ready = self.ready
        lags = self._lags
        by_slot = pinned and lags and self._lag_n == n_targets
        if self._held_for:
            self._unhold(targets, room, by_slot)
        while ready and free > 0:
            pos = heapq.heappop(ready)
            e = entries.get(pos)
            if e is None or e.wid is not None:
                continue
            w = choose(e.rec.stream)
            if w is None:
                if by_slot:
                    c = _cached_slot(slot_of, e.rec.stream, n_targets)
                    if c in lags:       # waits out of `ready` for its worker to have room
                        self._held_for.setdefault(c, []).append(pos)
                        blocked.add(e.rec.stream)
                        continue
                held.append(pos)
                if pinned:
                    blocked.add(e.rec.stream)
                continue
            assign(pos, e, w)
        for pos in held:
            heapq.heappush(ready, pos)
        more = False
        scanned = 0
        if lags and free > 0:
            # 2a. the lagging slots' events, older than the cursor's
            routed, scanned, more = self._catch_up(choose, assign, room, batches, batch_size,
                                                   frame_budget, targets, slot_of)
            free -= routed
        # 2. new events from the log: first attempts, on the fast path when the worker has
        # a consumer (the common case): no Entry, counters settled once per turn. This loop
        # runs once per published event, so choose() and _add_run() are written out in it for
        # the pinned strategy (a call each per event was a third of the pump's time).
        hold_limit = max_if * max(1, len(routable)) * 2
        matcher = None if self.matcher is match_all else self.matcher
        flying = self.flying
        read = self.log.read
        cursor = self.cursor
        stop = False
        # the whole chunk at once when every worker has a consumer and room for its share
        whole = (pinned and not misplaced and (not lags or self._lag_n == n_targets) and
                 all(w is not None and w.consumers > 0 for w in targets))
        live = room
        if lags and whole:      # a lagging slot's worker waits for acks of its own events
            live = {w.wid: room[w.wid] for i, w in enumerate(targets) if i not in lags}
        settling = whole and bool(live) and _settling(live, max_if)
        if settling and min(live.values()) <= 0:
            free = 0          # wait for more acks: see _settling
        while free > 0 and not stop and not more:
            recs = read(cursor, SCAN_CHUNK)
            if not recs:
                break
            scanned += len(recs)
            rest = recs
            check = matcher
            if whole and not blocked:
                todo = recs if matcher is None else [r for r in recs if matcher(r)]
                done, routed = self._route_chunk(todo, targets, slot_of, room, batches,
                                                 batch_size, frame_budget, lags)
                free -= routed
                if done == len(todo):
                    cursor = recs[-1].position + 1
                    if scanned >= SCAN_LIMIT:
                        more = cursor <= self.log.head
                        break
                    continue
                # the rest from the first event whose worker has no room left, matched already
                rest = todo[done:]
                check = None
            for rec in rest:
                if check is not None and not check(rec):
                    continue
                stream = rec.stream
                if lags and self._lag_slot(stream, n_targets, slot_of) in lags:
                    continue            # _catch_up reads it again
                if free <= 0:
                    w = None
                elif not pinned:
                    w = choose(stream)
                elif blocked and stream in blocked:
                    w = None
                else:
                    s = slot_of.get(stream)
                    if s is None:
                        s = slot_of[stream] = stream_slot(stream, n_targets)
                    w = targets[s]
                    if w is None or room[w.wid] <= 0:
                        w = None
                    elif misplaced:
                        m = misplaced.get(stream)
                        if m is not None and m != w.wid:
                            w = None    # its earlier events are still in flight elsewhere
                pos = rec.position
                if w is None:
                    if pinned and free > 0 and not settling:
                        if len(ready) < hold_limit:
                            entries[pos] = Entry(rec)
                            heapq.heappush(ready, pos)
                            blocked.add(stream)
                            cursor = pos + 1
                            continue
                        s = _cached_slot(slot_of, stream, n_targets)
                        if (not lags or self._lag_n == n_targets) and self._stuck(s, targets[s]):
                            # held back enough for it: the stuck slot lags, read again later,
                            # and the others read on (one stuck worker stalled them all)
                            self._lag_n = n_targets
                            lags[s] = pos
                            cursor = pos + 1
                            continue
                    cursor = pos
                    stop = True
                    break
                if w.consumers > 0:
                    wid = w.wid
                    fw = flying.get(wid)
                    if fw is None:
                        fw = flying[wid] = {}
                    fw[pos] = rec
                    room[wid] -= 1
                    free -= 1
                    data = rec.body               # a first attempt: encoded(1) is the body
                    b = batches.get(wid)          # _add_run() of one event, written out
                    if b is not None and (len(b[1]) >= batch_size
                                          or b[2] + len(data) > frame_budget):
                        self._send(w, b)
                        b = None
                    if b is None:
                        b = batches[wid] = [w, [], 0, [], 0]
                    b[1].append(pos)
                    b[2] += len(data)
                    b[3].append(data)
                    b[4] += 1                     # per_worker counts it in _send
                else:
                    e = entries[pos] = Entry(rec)
                    assign(pos, e, w)
                cursor = pos + 1
            else:
                cursor = recs[-1].position + 1
            if scanned >= SCAN_LIMIT and not stop:
                more = cursor <= self.log.head
                break
        self.cursor = cursor
        for b in batches.values():
            self._send(b[0], b)
        return more

    def _unhold(self, targets: list, room: dict, by_slot: bool) -> None:
        """Back into `ready`: the held entries of each lagging slot whose worker has room
        (all of them when the slots are counted otherwise now), to go out before its
        catch-up."""
        for c in list(self._held_for):
            if by_slot and c in self._lags:
                w = targets[c]
                if w is None or room.get(w.wid, 0) <= 0:
                    continue
            for pos in self._held_for.pop(c):
                heapq.heappush(self.ready, pos)

    def _stuck(self, slot: int, w: Any) -> bool:
        """Whether slot's worker (w; None: no worker) has answered nothing that settles an
        event (ack, skip, park) for stuck_after seconds since its slot was first found
        blocked; if not, a wake-up is set for when it would."""
        # an answer that settles an event (ack, skip, park) is progress; a retry is not
        mark = None if w is None else (w.wid, self.worker_delivered.get(w.index, 0),
                                       self._handled_nacks.get(w.wid, 0))
        now = monotonic()
        seen = self._full_since.get(slot)
        if seen is None or seen[0] != mark:
            seen = self._full_since[slot] = (mark, now)
            if self.stuck_after > 0:
                self.schedule(now + self.stuck_after)   # once per mark: not once per turn
        if now - seen[1] >= self.stuck_after:
            del self._full_since[slot]
            return True
        return False

    def _lag_slot(self, stream: str, n_targets: int, slot_of: dict) -> int:
        """The slot of `stream` among the _lag_n slots the lagging ones were counted in."""
        if self._lag_n == n_targets:
            return _cached_slot(slot_of, stream, n_targets)
        return stream_slot(stream, self._lag_n)       # a resize since: seldom, not cached

    def _catch_up(self, choose: Callable, assign: Callable, room: dict, batches: dict,
                  batch_size: int, frame_budget: int, targets: list,
                  slot_of: dict) -> Tuple[int, int, bool]:
        """Read the lagging slots' events again, from the lowest lag up to the cursor, and
        route each as the cursor's loop would; a slot stops at its first event with nowhere
        to go, and stops lagging once it reaches the cursor. (first attempts routed, records
        read, whether the scan budget ran out first)"""
        lags = self._lags
        moving = set(lags)
        n_targets = len(targets)
        matcher = None if self.matcher is match_all else self.matcher
        flying = self.flying
        end = self.cursor
        pos = min(lags.values())
        routed = scanned = 0
        if self._lag_n == n_targets and self.options["strategy"] == "pinned":
            # nothing to read for a slot whose worker has no room (a stuck one, most often)
            moving = {c for c in moving
                      if targets[c] is not None and room[targets[c].wid] > 0}
        while moving and pos < end and scanned < SCAN_LIMIT:
            # from the lowest lag still moving: a slot that stopped keeps its lag, maybe the
            # lowest, and the others' may be far past it (a scan budget spent between them
            # moved nothing, and the pump spun: helper review, nineteenth session)
            pos = max(pos, min(lags[c] for c in moving))
            if pos >= end:
                break
            recs = self.log.read(pos, min(SCAN_CHUNK, end - pos))
            if not recs:
                break           # past the head: the cursor was moved beyond it
            scanned += len(recs)
            for rec in recs:
                p = rec.position
                c = self._lag_slot(rec.stream, n_targets, slot_of)
                if c not in moving or p < lags[c] or (matcher is not None and not matcher(rec)):
                    continue
                w = choose(rec.stream)
                if w is None:
                    lags[c] = p
                    moving.discard(c)
                    continue
                fw = flying.get(w.wid)
                if w.consumers > 0 and (not fw or next(reversed(fw)) < p):
                    # the fast path keeps each worker's events in ascending order (its first
                    # key is its lowest); a worker that has later ones takes an Entry
                    if fw is None:
                        fw = flying[w.wid] = {}
                    fw[p] = rec
                    room[w.wid] -= 1
                    routed += 1
                    self._add_run(w, [p], [rec.body], batches, batch_size, frame_budget)
                else:
                    e = self.entries[p] = Entry(rec)
                    assign(p, e, w)
            pos = recs[-1].position + 1
        for c in moving:
            if pos >= end:
                del lags[c]
                for p in self._held_for.pop(c, ()):    # held for a stream blocked otherwise
                    heapq.heappush(self.ready, p)
            else:
                lags[c] = max(lags[c], pos)
        return routed, scanned, bool(moving) and pos < end and scanned >= SCAN_LIMIT

    def _route_chunk(self, recs: list, targets: list, slot_of: dict, room: dict,
                     batches: dict, batch_size: int, frame_budget: int,
                     lagging: dict) -> Tuple[int, int]:
        """First attempts of a chunk, pinned, every target a worker with a consumer: route
        them with per-chunk bookkeeping (the per-event loop's result; a pump of 256 events
        to 2 workers in about 0.6 of the loop's time, measured) up to the first event whose
        worker has no room left, passing over the lagging slots' events (_catch_up's). Returns
        how many of `recs` it went through (the per-event loop takes the rest) and routed."""
        if not recs:
            return 0, 0
        n = len(targets)
        streams = list(map(_streams, recs))
        ss = list(map(slot_of.get, streams))
        if None in ss:          # streams new to the cache
            ss = [_cached_slot(slot_of, st, n) if s is None else s for s, st in zip(ss, streams)]
        if n == 1:
            groups = [recs]
        elif n == 2:      # two passes in C: a few µs against a loop's eight for 256 events
            sb = bytes(ss)
            groups = [list(compress(recs, sb.translate(t))) for t in _SLOT_IS]
        else:
            groups = [[] for _ in range(n)]
            adds = [g.append for g in groups]
            for r, s in zip(recs, ss):
                adds[s](r)
        if lagging:
            groups = [[] if i in lagging else g for i, g in enumerate(groups)]
        cut = None        # the position of the first event whose worker has no room left
        for w, g in zip(targets, groups):
            r = max(room[w.wid], 0)     # below 0 after max_in_flight was lowered
            if len(g) > r:
                p = g[r].position
                if cut is None or p < cut:
                    cut = p
        if cut is not None:
            groups = [g[:bisect_left(g, cut, key=_positions)] for g in groups]
        flying = self.flying
        routed = 0
        for w, g in zip(targets, groups):
            if g:
                wid = w.wid
                routed += len(g)
                room[wid] -= len(g)
                positions = list(map(_positions, g))
                fw = flying.get(wid)
                if fw is None:
                    fw = flying[wid] = {}
                fw.update(zip(positions, g))
                self._add_run(w, positions, list(map(_bodies, g)), batches, batch_size,
                              frame_budget)
        if cut is None:
            return len(recs), routed
        return bisect_left(recs, cut, key=_positions), routed

    def _add_run(self, w: Any, positions: list, bodies: list, batches: dict, batch_size: int,
                 frame_budget: int, fast: bool = True) -> None:
        """Encoded events for worker w into its frames of this turn: a frame is sent once the
        next event would not fit (an event over the budget goes alone). `fast`: first
        attempts on the fast path, counted in per_worker when the frame is sent. The pump's
        new-events loop has this written out for one event: change both."""
        wid = w.wid
        i = 0
        m = len(positions)
        while i < m:
            b = batches.get(wid)
            if b is None:
                b = batches[wid] = [w, [], 0, [], 0]
            take = min(batch_size - len(b[1]), m - i)
            if take > 0:
                run = b"".join(bodies[i:i + take])    # _send joins it with the rest
                if b[2] + len(run) <= frame_budget:
                    b[1] += positions[i:i + take]
                    b[2] += len(run)
                    b[3].append(run)
                    b[4] += take if fast else 0
                    i += take
                    continue
                data = bodies[i]     # the frame fills before the batch does: one at a time
                if not b[1] or b[2] + len(data) <= frame_budget:
                    b[1].append(positions[i])
                    b[2] += len(data)
                    b[3].append(data)
                    b[4] += 1 if fast else 0
                    i += 1
                    continue
            self._send(w, b)
            del batches[wid]

    def _send(self, w: Any, b: list) -> None:
        if b[4]:
            self.per_worker[w.wid] = self.per_worker.get(w.wid, 0) + b[4]
        parts = b[3]
        body = self._prefix + _packer.pack_array_header(len(b[1])) + b"".join(parts)
        w.send_batch(b[1], _LEN.pack(len(body)) + body, w.consumers == 0)
        b[1] = []
        b[2] = 0
        b[3] = []
        b[4] = 0

    # ---- verdicts --------------------------------------------------------------
    def _release(self, e: Entry) -> None:
        wid = e.wid
        if wid is None:
            return
        e.wid = None
        n = self.per_worker.get(wid, 0) - 1
        if n > 0:
            self.per_worker[wid] = n
        else:
            self.per_worker.pop(wid, None)

    def _own(self, wid: int, positions: list) -> list:
        """(position, Entry) for those of `positions` in flight on worker wid; fast-path
        events among them become Entries (they leave the fast path for good)."""
        out = []
        entries = self.entries
        fw = self.flying.get(wid, {})
        for p in positions:
            e = entries.get(p)
            if e is None:
                rec = fw.pop(p, None)
                if rec is None:
                    continue
                e = entries[p] = Entry(rec)
                e.wid = wid
                e.handed = True
            if e.wid == wid:
                out.append((p, e))
        return out

    def on_ack(self, wid: int, index: int, positions: list) -> None:
        fw = self.flying.get(wid)
        fast = 0
        rest = []
        if fw is None:
            rest = positions
        else:
            pop = fw.pop
            for p in positions:
                if pop(p, None) is not None:
                    fast += 1
                else:
                    rest.append(p)
        if fast:
            n = self.per_worker.get(wid, 0) - fast
            if n > 0:
                self.per_worker[wid] = n
            else:
                self.per_worker.pop(wid, None)
        done = self._own(wid, rest) if rest else ()
        unpark = []
        for p, e in done:
            self._release(e)
            del self.entries[p]
            if e.replay:
                unpark.append(p)
        n = fast + len(done)
        self.delivered += n
        self.worker_delivered[index] = self.worker_delivered.get(index, 0) + n
        if unpark:
            self._replayed(unpark)

    def on_nack(self, wid: int, positions: list, action: str, reason: Optional[str]) -> None:
        items = self._own(wid, positions)
        if not items:
            return        # none in flight there (a late nack after update checkpoint): ignored
        if action != "retry":           # handled: the worker is not stuck (_stuck)
            self._handled_nacks[wid] = self._handled_nacks.get(wid, 0) + len(items)
        if action == "skip":
            unpark = [p for p, e in items if e.replay]
            for p, e in items:
                self._release(e)
                del self.entries[p]
            if unpark:
                self._replayed(unpark)
            return
        if action == "park":
            self._park(items, reason or "nack")
            return
        self._retry(items)

    def _retry(self, items: list) -> None:
        initial, maximum = self.options["retry_backoff"]
        max_retries = self.options["max_retries"]
        now = monotonic()
        to_park = []
        for p, e in items:
            if e.retries >= max_retries:
                to_park.append((p, e))
                continue
            self._release(e)
            e.retries += 1
            # 2 ** 1024 is no float: cap the exponent (the delay is `maximum` long before)
            due = now + min(initial * 2.0 ** min(e.retries - 1, 1000), maximum)
            heapq.heappush(self.retry_heap, (due, p))
            self.schedule(due)
        if to_park:
            self._park(to_park, "max_retries")

    def _park(self, items: list, reason: str) -> None:
        for _, e in items:
            self._release(e)
        try:
            self.on_park([(p, reason) for p, _ in items])
        except Exception as e:
            # not stored as parked (a full disk, say): they stay in the flow, to be tried
            # again after the longest backoff, rather than leave it unrecorded (lost). Said
            # at most once a minute: each redelivery fails the same way
            extra = self._park_said.allow()
            if extra is not None:
                say = logger.error if isinstance(e, sqlite3.Error) else logger.exception
                say("could not park events; they are delivered again later", pool=self.name,
                    events=len(items), error=str(e), **extra)
            due = monotonic() + self.options["retry_backoff"][1]
            for p, _ in items:
                heapq.heappush(self.retry_heap, (due, p))
            self.schedule(due)
            return
        for p, e in items:
            del self.entries[p]
            if e.replay:
                self.replaying.discard(p)      # listed again, with this reason
            else:
                self.parked += 1

    def _replayed(self, positions: list) -> None:
        """Replayed parked events handled at last: their rows go."""
        self.replaying.difference_update(positions)
        self.on_unpark(positions)

    def _release_due(self) -> None:
        now = monotonic()
        heap = self.retry_heap
        while heap and heap[0][0] <= now:
            _, p = heapq.heappop(heap)
            e = self.entries.get(p)
            if e is None or e.wid is not None:
                continue
            e.attempt += 1
            e.retrying = True
            heapq.heappush(self.ready, p)

    def requeue(self, wid: int, positions: list, sent: bool = True) -> None:
        """The consumer went away: these go back to the head of the queue, attempt + 1
        for those that had reached a consumer."""
        for p, e in self._own(wid, positions):
            self._release(e)
            if sent and e.sent:
                e.attempt += 1
                if e.attempt in _SAY_AT or e.attempt % _SAY_AT[-1] == 0:
                    # a consumer gone is no retry (§3): an event whose consumer dies of it
                    # every time is never parked; say so, seldom
                    logger.warning("event delivered again and again: its consumer went away "
                                   "each time without answering (an event that crashes it?)",
                                   pool=self.name, position=p, attempt=e.attempt)
            e.sent = True
            heapq.heappush(self.ready, p)

    def mark_sent(self, wid: int, positions: list, sent: bool) -> None:
        for _, e in self._own(wid, positions):
            e.sent = sent

    def worker_lost(self, wid: int) -> int:
        """A worker exited: everything it held is delivered again."""
        lost = [p for p, e in self.entries.items() if e.wid == wid]
        lost += list(self.flying.get(wid, ()))
        self.requeue(wid, lost)
        self.flying.pop(wid, None)
        self.per_worker.pop(wid, None)
        self._handled_nacks.pop(wid, None)
        return len(lost)

    def replay(self, records: list) -> Tuple[int, list]:
        """Queue parked events again; (how many, the positions the log read sends anyway)."""
        n = 0
        ahead = []
        lags = self._lags
        for rec in records:
            if rec.position >= self.cursor or (
                    lags and rec.position >= lags.get(stream_slot(rec.stream, self._lag_n),
                                                      self.cursor)):
                # not read since `update checkpoint` moved back (or read past while its slot
                # lags): queued here too, it would go out twice, and one ack would settle
                # only one of the two
                ahead.append(rec.position)
                continue
            if rec.position in self.entries or any(rec.position in fw
                                                   for fw in self.flying.values()):
                continue
            self.entries[rec.position] = Entry(rec, replay=True)
            self.replaying.add(rec.position)
            heapq.heappush(self.ready, rec.position)
            n += 1
        return n, ahead

    def held_by_workers(self) -> int:
        """Events handed to a worker and not yet answered (what a drain waits for)."""
        return sum(self.per_worker.values())

    def worker_in_flight(self, wid: int) -> int:
        return self.per_worker.get(wid, 0)
