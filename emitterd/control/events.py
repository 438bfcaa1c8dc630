"""publish: validation, and the group commit that appends every publish of a turn at once."""
import logging
import os
from typing import Any, Callable, Optional

import msgpack

from emitterd import framing, logs
from emitterd.control.common import not_shutting_down, only_keys
from emitterd.control.server import DEFERRED
from emitterd.errors import ProtocolError, clip, invalid
from emitterd.eventlog import NewEvent, PublishBatch

log = logs.get("publish")
EXIT_SYNC_FAILED = 74      # EX_IOERR
_pack = msgpack.Packer(use_bin_type=True).pack
EVENT_FIELDS = ("stream", "type", "data", "metadata", "tags", "id")
EVENT_FIELD_SET = frozenset(EVENT_FIELDS)
MAX_NAME_CHARS = 256      # stream and type
MAX_ID_CHARS = 128
_M = (1 << 64) - 1
# What a delivered event holds beyond its head, at most: the map header and the position,
# version, timestamp and attempt entries at their largest; and for an event without a client id
# (the head holds a client id) the "id" entry of the generated 36-character UUID.
ENVELOPE_BYTES = len(_pack(("position", _M, "version", _M, "timestamp", _M, "attempt", _M)))
GENERATED_ID_BYTES = len(_pack(("id", "x" * 36))) - 1


def _bad_text(name: str, field: str, limit: int) -> Any:
    return invalid(field, "%s must be a string of 1 to %d characters" % (name, limit))


def validate_event(e: Any, field: str, max_bytes: int) -> NewEvent:
    """Check one event of a publish; raise `invalid` naming the first bad field."""
    if type(e) is not dict:
        raise invalid(field, "an event must be a map")
    if not EVENT_FIELD_SET.issuperset(e):
        k = next(k for k in e if k not in EVENT_FIELD_SET)
        raise invalid("%s.%s" % (field, k), "unknown event field %r (allowed: %s)"
                      % (clip(str(k)), ", ".join(EVENT_FIELDS)))
    get = e.get
    stream = get("stream")
    if type(stream) is not str or not 0 < len(stream) <= MAX_NAME_CHARS:
        raise _bad_text("stream", field + ".stream", MAX_NAME_CHARS)
    type_ = get("type")
    if type(type_) is not str or not 0 < len(type_) <= MAX_NAME_CHARS:
        raise _bad_text("type", field + ".type", MAX_NAME_CHARS)
    eid = get("id")
    if eid is not None and (type(eid) is not str or not 0 < len(eid) <= MAX_ID_CHARS):
        raise _bad_text("id", field + ".id", MAX_ID_CHARS)
    metadata = get("metadata")
    if metadata is None:
        metadata = {}
    elif type(metadata) is not dict:
        raise invalid(field + ".metadata", "metadata must be a map")
    tags = get("tags")
    if tags is None:
        tags = []
    elif type(tags) is not list:
        raise invalid(field + ".tags", "tags must be a list of strings")
    else:
        for i, t in enumerate(tags):
            if type(t) is not str:
                raise invalid("%s.tags.%d" % (field, i), "a tag must be a string")
    try:
        head = _pack_head(stream, type_, get("data"), metadata, tags, eid)
    except Exception as err:
        for name, text in (("stream", stream), ("type", type_), ("id", eid)):
            try:
                _pack(text)
            except Exception:    # a str the wire cannot carry (lone surrogates): in-process only
                raise invalid("%s.%s" % (field, name), "%s cannot be encoded: %s"
                              % (name, err)) from None
        raise invalid(field + ".data", "data cannot be encoded: %s" % err) from None
    size = len(head) + ENVELOPE_BYTES + (GENERATED_ID_BYTES if eid is None else 0)
    if size > max_bytes:
        raise invalid(field, "event is about %d bytes encoded, over max_event_bytes %d"
                      % (size, max_bytes))
    return NewEvent(stream, type_, eid, head, tags)


def _pack_head(stream: str, type_: str, data: Any, metadata: dict, tags: list,
               eid: Optional[str]) -> bytes:
    """The position-independent entries of the stored map in one C call: an array of 10 (or
    12) items without its header is a run of 5 (or 6) key/value pairs."""
    if eid is None:
        return _pack(("stream", stream, "type", type_, "data", data, "metadata", metadata,
                      "tags", tags))[1:]
    return _pack(("stream", stream, "type", type_, "data", data, "metadata", metadata,
                  "tags", tags, "id", eid))[1:]


def validate_publish(args: dict, cfg: Any) -> PublishBatch:
    only_keys(args, ("events", "expected_version"))
    events = args.get("events")
    if not isinstance(events, list) or not 1 <= len(events) <= cfg.max_publish_events:
        raise invalid("events", "events must be a list of 1 to %d events" % cfg.max_publish_events)
    # the control socket's decoder (publish_decode) takes the usual publish; this path
    # decides the rest and names the bad field
    new = [validate_event(e, "events.%d" % i, cfg.max_event_bytes) for i, e in enumerate(events)]
    ev = args.get("expected_version")
    if ev is not None:
        if isinstance(ev, bool) or not isinstance(ev, int) or ev < -1:
            raise invalid("expected_version", "expected_version must be an integer >= -1")
        stream = new[0].stream
        if any(e.stream != stream for e in new):
            raise invalid("expected_version", "expected_version needs all events in one stream")
    return PublishBatch(new, ev)


def publish(ctx: Any, req: Any) -> Any:
    not_shutting_down(ctx)
    args = req.args
    # the control socket's decode (publish_decode) validates most publishes as it parses them
    batch = args if type(args) is PublishBatch else validate_publish(args, ctx.cfg)
    ctx.committer.submit(batch, req)
    return DEFERRED


class Committer:
    """Group commit: the publishes read in one loop turn go to the log in one transaction."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.pending: list = []
        self.published = 0
        self.held: set = set()     # worker handles sent batches not yet on disk (pool.py)
        self.held_back = False     # publishes wait (checkpointer: the WAL is being rewound)
        self._hold_timer: Any = None

    def submit(self, batch: PublishBatch, req: Any) -> None:
        self.pending.append((batch, req))

    def waiting_for(self, conn: Any) -> bool:
        """Whether a publish of this connection waits for this turn's commit."""
        return any(req.conn is conn for _, req in self.pending)

    def hold(self, seconds: float, on_expiry: Callable[[], None]) -> None:
        """Leave publishes pending (answered later, never lost) until release(), or until
        on_expiry() runs after `seconds` (it must release)."""
        self.held_back = True
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._hold_timer = self.ctx.loop.call_later(seconds, on_expiry)

    def release(self) -> None:
        self.held_back = False
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self.ctx.loop.again()          # commit what waited, this coming turn

    def commit(self, force: bool = False) -> None:
        """Append this turn's publishes; `force` even while held back (a later request of
        the same client must see them)."""
        if not self.pending or (self.held_back and not force and not self.ctx.shutting_down):
            return
        pending, self.pending = self.pending, []
        ctx = self.ctx
        try:
            records = ctx.log.append([b for b, _ in pending], defer_sync=True, defer_trim=True)
        except Exception as e:
            log.exception("append failed")
            self._make_durable()
            for _, req in pending:
                req.fail(ProtocolError("internal", "append failed: %s" % type(e).__name__))
            return
        if records:
            # While the disk writes the commit, route its events to the workers, marked held:
            # their frames wait in the worker pipes' buffers until _make_durable() (and a
            # worker that got one earlier would keep it until told it is on disk).
            try:
                if ctx.registry.pump_all():
                    ctx.loop.again()
            except Exception:
                log.exception("dispatch failed")
        self._make_durable()
        self.published += len(records)
        for b, req in pending:
            if isinstance(b.result, ProtocolError):
                req.fail(b.result)
            else:
                req.reply(b.result)
        # the answers leave now, before the turn's other dispatch work, so publishers
        # prepare their next batch while we go on; freeing the records that fell out of the
        # tail (cold memory, ~5 % of a busy parent) is such work: it is off their path here.
        # The publishers' channels first: the workers' were marked dirty earlier (routing),
        # and each of their writes wakes a worker before the publisher would otherwise be.
        for conn in dict.fromkeys(req.conn for _, req in pending):   # each once, in order
            conn.channel.flush()
        ctx.loop.flush_dirty()
        ctx.log.trim_tail()

    def _make_durable(self) -> None:
        """fdatasync the log, then tell the workers with held batches to deliver them.
        The workers hold what they got until then, so nothing reaches a subscriber, and
        no publisher is answered (the caller answers after this), before it is on disk.
        The held frames are not flushed before the fdatasync: sent after it, in one write
        with the notice, each worker wakes once per commit instead of twice (measured:
        more throughput and no worse latency than writing them while the disk works)."""
        ctx = self.ctx
        try:
            ctx.log.sync()
        except OSError as e:
            # What reached the disk is unknown: exit before anything is answered or released
            # (workers drop what they hold when we are gone); the restart recovers from disk.
            log.critical("the event log could not be synced to disk: exiting", error=str(e))
            logging.shutdown()        # flush the log line out before the hard exit
            os._exit(EXIT_SYNC_FAILED)
        if self.held:
            notice = framing.encode({"op": "durable", "position": ctx.log.durable})
            for h in self.held:
                if h.channel is not None:
                    h.channel.send_raw(notice)
            self.held.clear()
