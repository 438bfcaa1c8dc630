"""The control socket's fast publish decoder (emitterd/control/publish_decode.py) against the
generic path it stands in for (framing.decode_payload, the server's request checks and
validate_publish): whatever the fast path accepts, the generic path accepts with the same
events (same stream, type, id, tags, and a head that decodes to the same entries), and it
never accepts what the generic path refuses. Typical publishes must take the fast path.
"""
from __future__ import annotations

import math
import struct
from types import SimpleNamespace
from typing import Any, Optional

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from emitterd import framing
from emitterd.control.events import validate_publish
from emitterd.control.publish_decode import RequestDecoder
from emitterd.errors import ProtocolError
from emitterd.eventlog import PublishBatch

CFG = SimpleNamespace(max_publish_events=10_000, max_event_bytes=1 << 20)
SMALL = SimpleNamespace(max_publish_events=3, max_event_bytes=400)


def generic(payload: bytes, cfg: Any) -> Optional[PublishBatch]:
    """What the daemon's generic path makes of a publish frame: the batch, or None (refused)."""
    try:
        msg = framing.decode_payload(payload)
    except framing.FrameError:
        return None
    rid = msg.get("id")
    if not (type(rid) is int and 0 <= rid < 1 << 64) or msg.get("op") != "publish":
        return None
    args = msg.get("args")
    if not isinstance(args, dict):
        return None
    try:
        return validate_publish(args, cfg)
    except ProtocolError:
        return None


def _canon(head: bytes, n: int) -> dict:
    """A head's entries, each value re-packed (so NaN == NaN and float32 == its float64)."""
    entries = msgpack.unpackb(bytes([0x80 | n]) + head, raw=False, strict_map_key=False)
    return {k: msgpack.packb(v, use_bin_type=True) for k, v in entries.items()}


def check(payload: bytes, cfg: Any = CFG) -> Optional[dict]:
    """Assert the property for one frame; the fast path's message (or None)."""
    fast = RequestDecoder(SimpleNamespace(cfg=cfg)).publish(payload)
    slow = generic(payload, cfg)
    if fast is None:
        return None
    assert slow is not None, "the fast path accepted a frame the generic path refuses"
    b = fast["args"]
    assert fast["op"] == "publish" and fast["id"] == framing.decode_payload(payload)["id"]
    assert b.expected_version == slow.expected_version
    assert len(b.events) == len(slow.events)
    for f, s in zip(b.events, slow.events):
        assert (f.stream, f.type, f.id, f.tags) == (s.stream, s.type, s.id, s.tags)
        n = 5 if f.id is None else 6
        assert _canon(f.head, n) == _canon(s.head, n)
    return fast


def frame(events: Any, rid: Any = 7, **extra: Any) -> bytes:
    args = {"events": events}
    args.update(extra)
    return msgpack.packb({"id": rid, "op": "publish", "args": args}, use_bin_type=True)


def test_typical_publishes_take_the_fast_path() -> None:
    evs = [{"stream": "orders-%d" % i, "type": "OrderPlaced", "data": {"n": i, "pad": "x" * 50}}
           for i in range(100)]
    evs[3]["tags"] = ["a", "b"]
    evs[4]["metadata"] = {"who": "me", 1: [1.5, None]}
    evs[5]["id"] = "client-id-5"
    evs[6].pop("data")
    fast = check(frame(evs))
    assert fast is not None and len(fast["args"].events) == 100
    assert check(frame(evs[:1], rid=2**64 - 1, expected_version=-1)) is not None
    # args keys in any order, the op before the id: still the fast path
    assert check(msgpack.packb({"op": "publish", "args": {"events": evs[:2]}, "id": 1})) is not None


def _ext(code: int, data: bytes) -> bytes:
    hdr = {4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}.get(len(data)) or b"\xc7" + bytes([len(data)])
    return hdr + struct.pack(">b", code) + data


def _event_with_raw_data(raw_data: bytes) -> bytes:
    """A publish of one event whose data is the given msgpack bytes, verbatim."""
    ev = b"\x83\xa6stream\xa1s\xa4type\xa1t\xa4data" + raw_data
    return b"\x83\xa2id\x01\xa2op\xa7publish\xa4args\x81\xa6events\x91" + ev


@pytest.mark.parametrize("raw_data, accepted", [
    (b"\xca\x3f\xc0\x00\x00", True),                       # float32: stored as sent
    (b"\xd9\x03abc", True),                                 # str8 for a short string
    (b"\x82\xa1a\x01\xa1a\x02", True),                     # duplicate keys: last one wins for both
    (b"\x81\x01\x02", True),                               # int key
    (_ext(-1, (1700000000).to_bytes(4, "big")), True),     # timestamp 32
    (_ext(-1, ((123456789 << 34) | 1700000000).to_bytes(8, "big")), True),  # 64, with ns
    (_ext(5, b"abc"), True),
    (b"\x81\x92\x01\x02\x01", False),                      # an array as a map key
    (b"\x81\xa1\xff\x01", False),                          # invalid UTF-8 in a key
    (b"\x91\xa3\xed\xa0\x80", False),                      # a lone surrogate
    (b"\xc1", False),                                      # never used byte
    (b"\x92\x01", False),                                  # truncated
])
def test_data_is_checked_as_the_generic_decoder_does(raw_data: bytes, accepted: bool) -> None:
    payload = _event_with_raw_data(raw_data)
    assert (generic(payload, CFG) is not None) is accepted
    fast = check(payload)
    if accepted:
        assert fast is not None          # these all take the fast path
        # the client's bytes are stored as they came
        assert raw_data in fast["args"].events[0].head


@pytest.mark.parametrize("payload", [
    frame([{"stream": "s", "type": "t", "metadata": None}]),    # nil = default: generic path
    frame([{"stream": "s", "type": "t", "tags": None}]),
    frame([{"stream": "s", "type": "t", "metadata": [1]}]),     # not a map: refused
    frame([{"stream": "s", "type": "t", "tags": ["a", 1]}]),
    frame([{"stream": "s", "type": "t", "extra": 1}]),
    frame([{"stream": "", "type": "t"}]),
    frame([{"stream": "s" * 257, "type": "t"}]),
    frame([{"stream": "s", "type": "t", "id": ""}]),
    frame([{"stream": "s", "type": "t", "id": "i" * 129}]),
    frame([{"stream": b"s", "type": "t"}]),
    frame([]),
    frame([{"stream": "s", "type": "t"}], rid=True),
    frame([{"stream": "s", "type": "t"}], rid=-1),
    frame([{"stream": "s", "type": "t"}], expected_version=True),
    frame([{"stream": "s", "type": "t"}], expected_version=-2),
    frame([{"stream": "s", "type": "t"}, {"stream": "u", "type": "t"}], expected_version=3),
    frame([{"stream": "s", "type": "t"}], other=1),
    frame([{"stream": "s", "type": "t"}]) + b"\xc0",                   # bytes after the map
    msgpack.packb({"id": 1, "op": "publish", "args": None}),
    msgpack.packb({"id": 1, "op": "ping", "args": {"note": "publish"}}),
    msgpack.packb({"id": 1, "op": "publish", "args": {"events": [{"stream": "s", "type": "t"}]},
                   "extra": "envelope key"}),
])
def test_whatever_is_unsure_goes_to_the_generic_path(payload: bytes) -> None:
    assert RequestDecoder(SimpleNamespace(cfg=CFG)).publish(payload) is None
    check(payload)


def test_limits_of_the_config_send_it_to_the_generic_path() -> None:
    evs = [{"stream": "s", "type": "t"}] * 4
    assert RequestDecoder(SimpleNamespace(cfg=SMALL)).publish(frame(evs)) is None
    assert generic(frame(evs), SMALL) is None
    big = [{"stream": "s", "type": "t", "data": "x" * 300}]
    assert RequestDecoder(SimpleNamespace(cfg=SMALL)).publish(frame(big)) is None
    assert check(frame([{"stream": "s", "type": "t", "data": "x" * 10}]), SMALL) is not None


def test_other_ops_and_bad_frames_decode_as_before() -> None:
    dec = RequestDecoder(SimpleNamespace(cfg=CFG))
    ping = msgpack.packb({"id": 3, "op": "ping"})
    assert dec(ping) == framing.decode_payload(ping)
    with pytest.raises(framing.FrameError) as e:
        dec(_event_with_raw_data(b"\x81\xa1\xff\x01"))
    assert e.value.code == "bad_frame"
    fast = dec(frame([{"stream": "s", "type": "t"}]))
    assert type(fast["args"]) is PublishBatch


# ---- generated publishes --------------------------------------------------------------------

_scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1)
            | st.floats(allow_nan=True) | st.text(max_size=20) | st.binary(max_size=20))
_values = st.recursive(_scalars, lambda inner: (
    st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5), inner, max_size=4)), max_leaves=12)
# mostly valid, so that both paths accept often; the invalid forms now and then
_names = st.text(min_size=1, max_size=6) | st.sampled_from(["", "s" * 256, "s" * 257, b"s"])
_event = st.fixed_dictionaries(
    {"stream": _names, "type": _names},
    optional={"data": _values,
              "metadata": st.dictionaries(st.text(max_size=4), _values, max_size=3) | st.none()
              | _values,
              "tags": st.lists(st.text(max_size=4), max_size=3) | st.none() | st.just(["a", 1]),
              "id": st.text(min_size=1, max_size=5) | st.none() | st.sampled_from(["", 7])})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=st.lists(_event, min_size=0, max_size=5),
       expected=st.none() | st.integers(-3, 3),
       single_float=st.booleans(), small=st.booleans())
def test_generated_publishes_agree_with_the_generic_path(events: list, expected: Optional[int],
                                                         single_float: bool, small: bool) -> None:
    args: dict = {"events": events}
    if expected is not None:
        args["expected_version"] = expected
    try:
        payload = msgpack.packb({"id": 5, "op": "publish", "args": args}, use_bin_type=True,
                                use_single_float=single_float)
    except OverflowError:      # a float32 cannot hold that double
        assume(False)
    check(payload, SMALL if small else CFG)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_corrupted_publish_frames_are_never_accepted_alone(data: Any) -> None:
    """Flip, drop or insert bytes of a valid publish: the fast path's verdict always agrees."""
    evs = [{"stream": "s%d" % i, "type": "t", "data": {"k": "v" * i, "n": i * 1000.5},
            "tags": ["x"]} for i in range(3)]
    payload = bytearray(frame(evs))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(payload) - 1))
        op = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        if op == "flip":
            payload[i] = data.draw(st.integers(0, 255))
        elif op == "drop" and len(payload) > 1:
            del payload[i]
        else:
            payload.insert(i, data.draw(st.integers(0, 255)))
    check(bytes(payload))


def test_nan_survives() -> None:
    fast = check(frame([{"stream": "s", "type": "t", "data": float("nan")}]))
    assert fast is not None
    head = fast["args"].events[0].head
    assert math.isnan(msgpack.unpackb(b"\x85" + head)["data"])
