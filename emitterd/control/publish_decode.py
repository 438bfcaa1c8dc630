"""Control request frames decoded, and a publish validated, in one pass of C code (msgspec).

A publish frame is decoded straight into typed structs: msgspec checks every field's type and
length while it parses, and each event's stored head is re-encoded from the struct in one call,
with `data` and `metadata` copied as the client's own msgpack bytes (never decoded into objects
and packed again). Those bytes are still checked exactly as the generic decoder checks a frame
(one msgpack.unpackb over all of them: valid msgpack, UTF-8 strings, hashable map keys), so a
frame is accepted here only if the generic path would accept it too.

Anything this path is unsure of (another op, a nil that means a default, an event near
max_event_bytes, any error) goes to the generic path, which decides and words the error as for
every other request: the fast path never answers an error itself.
"""
from typing import Annotated, Any, Literal, Optional

import msgpack
import msgspec
from msgspec import Meta, Raw, Struct

from emitterd import framing
from emitterd.control.events import (ENVELOPE_BYTES, GENERATED_ID_BYTES, MAX_ID_CHARS,
                                     MAX_NAME_CHARS)
from emitterd.eventlog import NewEvent, PublishBatch

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
ClientId = Annotated[str, Meta(min_length=1, max_length=MAX_ID_CHARS)]
_NIL = Raw(b"\xc0")
_EMPTY_MAP = Raw(b"\x80")
_GUARD = b"\xa7publish"          # the op's value as any msgpack encoder writes it
_array_header = msgpack.Packer().pack_array_header


class _Event(Struct, forbid_unknown_fields=True):
    # field order = the order of the stored head's entries; "id" last, so that an event
    # without one drops its trailing '"id": nil' (4 bytes) from the encoded struct
    stream: Name
    type: Name
    data: Raw = _NIL
    metadata: Raw = _EMPTY_MAP
    tags: list[str] = []
    id: Optional[ClientId] = None


class _Args(Struct, forbid_unknown_fields=True):
    events: list[_Event]
    expected_version: Optional[int] = None


class _Publish(Struct, forbid_unknown_fields=True):
    id: Annotated[int, Meta(ge=0)]
    op: Literal["publish"]
    args: _Args


_decode_publish = msgspec.msgpack.Decoder(_Publish).decode
_encode = msgspec.msgpack.Encoder().encode


class RequestDecoder:
    """framing.Decoder's `decode` for the control socket: the fast path for publish."""

    def __init__(self, cfg_source: Any) -> None:
        self._ctx = cfg_source      # anything with .cfg, read per frame (a reload may change it)

    def __call__(self, payload: bytes) -> dict:
        if _GUARD in payload:
            msg = self.publish(payload)
            if msg is not None:
                return msg
        return framing.decode_payload(payload)

    def publish(self, payload: bytes) -> Optional[dict]:
        """{"id", "op": "publish", "args": PublishBatch} for a valid publish, else None."""
        cfg = self._ctx.cfg
        try:
            req = _decode_publish(payload)
        except Exception:      # msgspec's errors, UnicodeDecodeError, RecursionError...
            return None
        args = req.args
        events = args.events
        if not 1 <= len(events) <= cfg.max_publish_events:
            return None
        ev = args.expected_version
        if ev is not None and (ev < -1 or any(e.stream != events[0].stream for e in events)):
            return None
        raws = []
        add_raw = raws.append
        for e in events:
            add_raw(e.data)
            add_raw(e.metadata)
        try:
            # one C call checks them all as framing.decode_payload would
            values = msgpack.unpackb(_array_header(len(raws)) + b"".join(raws),
                                     raw=False, strict_map_key=False, use_list=True)
        except Exception:
            return None
        if set(map(type, values[1::2])) != {dict}:
            return None          # metadata nil (= the default) or not a map: the generic path says
        roomy = cfg.max_event_bytes - ENVELOPE_BYTES - GENERATED_ID_BYTES
        new = []
        add = new.append
        encode = _encode
        for e in events:
            h = encode(e)
            eid = e.id
            head = h[1:-4] if eid is None else h[1:]
            if len(head) > roomy:
                return None      # near the limit: validate_event measures it exactly
            add(NewEvent(e.stream, e.type, eid, head, e.tags))
        return {"id": req.id, "op": "publish", "args": PublishBatch(new, ev)}
