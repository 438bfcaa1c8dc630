"""publish: validation, and the group commit that appends every publish of a turn at once."""
from typing import Any

import msgpack

from emitterd import logs
from emitterd.control.common import not_shutting_down, only_keys
from emitterd.control.server import DEFERRED
from emitterd.errors import ProtocolError, clip, invalid
from emitterd.eventlog import NewEvent, PublishBatch

log = logs.get("publish")
_pack = msgpack.Packer(use_bin_type=True).pack
EVENT_FIELDS = ("stream", "type", "data", "metadata", "tags", "id")
ENVELOPE_BYTES = 160      # keys, position, version, timestamp, map header: an upper bound


EVENT_FIELD_SET = frozenset(EVENT_FIELDS)


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
    if type(stream) is not str or not 0 < len(stream) <= 256:
        raise _bad_text("stream", field + ".stream", 256)
    type_ = get("type")
    if type(type_) is not str or not 0 < len(type_) <= 256:
        raise _bad_text("type", field + ".type", 256)
    eid = get("id")
    if eid is not None and (type(eid) is not str or not 0 < len(eid) <= 128):
        raise _bad_text("id", field + ".id", 128)
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
        # one C call; [1:] drops the 3-entry map header: the stored body is a run of pairs
        payload = _pack({"data": get("data"), "metadata": metadata, "tags": tags})[1:]
    except Exception as err:
        raise invalid(field + ".data", "data cannot be encoded: %s" % err) from None
    size = len(payload) + len(stream) * 4 + len(type_) * 4 + 4 * len(eid or "x" * 36) + ENVELOPE_BYTES
    if size > max_bytes:
        exact = len(payload) + len(stream.encode()) + len(type_.encode()) + len(
            (eid or "x" * 36).encode()) + ENVELOPE_BYTES
        if exact > max_bytes:
            raise invalid(field, "event is about %d bytes encoded, over max_event_bytes %d"
                          % (exact, max_bytes))
    return NewEvent(stream, type_, eid, payload, tags)


def validate_publish(args: dict, cfg: Any) -> PublishBatch:
    only_keys(args, ("events", "expected_version"))
    events = args.get("events")
    if not isinstance(events, list) or not 1 <= len(events) <= cfg.max_publish_events:
        raise invalid("events", "events must be a list of 1 to %d events" % cfg.max_publish_events)
    new = [validate_event(e, "events.%d" % i, cfg.max_event_bytes) for i, e in enumerate(events)]
    ev = args.get("expected_version")
    if ev is not None:
        if isinstance(ev, bool) or not isinstance(ev, int) or ev < -1:
            raise invalid("expected_version", "expected_version must be an integer >= -1")
        if any(e.stream != new[0].stream for e in new):
            raise invalid("expected_version", "expected_version needs all events in one stream")
    return PublishBatch(new, ev)


def publish(ctx: Any, req: Any) -> Any:
    not_shutting_down(ctx)
    batch = validate_publish(req.args, ctx.cfg)
    ctx.committer.submit(batch, req)
    return DEFERRED


class Committer:
    """Group commit: the publishes read in one loop turn go to the log in one transaction."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.pending: list = []
        self.published = 0

    def submit(self, batch: PublishBatch, req: Any) -> None:
        self.pending.append((batch, req))

    def waiting_for(self, conn: Any) -> bool:
        """Whether a publish of this connection waits for this turn's commit."""
        return any(req.conn is conn for _, req in self.pending)

    def commit(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        try:
            records = self.ctx.log.append([b for b, _ in pending])
        except Exception as e:
            log.exception("append failed")
            for _, req in pending:
                req.fail(ProtocolError("internal", "append failed: %s" % type(e).__name__))
            return
        self.published += len(records)
        for b, req in pending:
            if isinstance(b.result, ProtocolError):
                req.fail(b.result)
            else:
                req.reply(b.result)
        # the answers leave before this turn's dispatch work, so publishers prepare their
        # next batch while we route this one
        self.ctx.loop.flush_dirty()
