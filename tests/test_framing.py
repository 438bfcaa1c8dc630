"""framing.pack (and so every frame's body) is exactly msgpack.packb(obj, use_bin_type=True):
the same bytes for whatever msgpack can pack, and msgpack's own error for whatever it cannot,
whichever of its two paths (exact builtin types only, or msgpack's general one) takes it."""
from __future__ import annotations

import collections
import datetime
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings, strategies as st

from emitterd import framing


class Text(str):
    pass


class Number(int):
    pass


class Mapping(dict):
    pass


def expected(obj: Any) -> Any:
    try:
        return ("bytes", msgpack.packb(obj, use_bin_type=True))
    except Exception as e:  # noqa: BLE001 - the kind of error is what is compared
        return ("error", type(e))


def got(obj: Any) -> Any:
    try:
        return ("bytes", framing.pack(obj))
    except Exception as e:  # noqa: BLE001
        return ("error", type(e))


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20),
    st.builds(bytearray, st.binary(max_size=8)),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    st.builds(msgpack.Timestamp, st.integers(0, 1 << 33), st.integers(0, 999_999_999)),
    st.builds(Text, st.text(max_size=5)), st.builds(Number, st.integers(-5, 5)),
    st.sampled_from([frozenset(), {1}, datetime.date(2026, 1, 1), object()]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner, inner),
    st.dictionaries(st.text(max_size=5), inner, max_size=4),
    st.builds(lambda d: collections.OrderedDict(d), st.dictionaries(st.integers(), inner, max_size=3)),
    st.builds(Mapping, st.dictionaries(st.text(max_size=3), inner, max_size=3))), max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(values)
def test_pack_is_msgpacks_packb(obj: Any) -> None:
    assert got(obj) == expected(obj)


@pytest.mark.parametrize("obj", [
    {"id": 1, "op": "publish", "args": {"events": [{"stream": "s", "type": "t",
                                                    "data": {"n": 1, "pad": "x" * 100}}]}},
    {"a": (1, 2)}, {"a": msgpack.ExtType(5, b"x")}, collections.OrderedDict(a=1),
    {"a": Text("x")}, {"a": {1}}, {"a": 1 << 64}])
def test_pack_typical_and_edge_values(obj: Any) -> None:
    assert got(obj) == expected(obj)
    if got(obj)[0] == "bytes":
        assert framing.encode(obj) == framing.HEADER.pack(len(got(obj)[1])) + got(obj)[1]
