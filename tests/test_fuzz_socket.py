"""Fuzzing, short version (scripts/fuzz is the long one).

* In-process targets of tests/fuzz_targets.py (frame decoder, subscription validation,
  publish validation, selectors and matchers) on a few hundred hypothesis inputs each: only
  the documented exceptions, and the properties each target states.
* Black box over the real control socket of a dedicated daemon: every field of every op with
  wrong values (deterministic sweep), then a few hundred hypothesis cases (wrong types, random
  op names, random bytes, truncated and mangled frames, huge and deeply nested values,
  pipelining). Every response must be well-formed, requests that must fail fail with the
  right code and field, the daemon answers ping on another connection after every case, and
  no pool, worker or stored event changes.
"""
from __future__ import annotations

import os
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import fuzz_targets as ft

FAST = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


# ---- in-process targets --------------------------------------------------------------

@pytest.mark.timeout(60)
@FAST
@given(st.binary(max_size=600))
def test_decoder_target_bytes(data: bytes) -> None:
    ft.decoder_from_bytes(data)


_msgpack_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1),
                             st.floats(), st.text(max_size=10), st.binary(max_size=10))
_wire = st.recursive(_msgpack_scalars, lambda ch: st.one_of(
    st.lists(ch, max_size=4), st.dictionaries(st.text(max_size=5), ch, max_size=4)),
    max_leaves=10)


@st.composite
def _frame_streams(draw: st.DrawFn) -> tuple:
    """Frames of maps and non-maps, some with wrong lengths, cut anywhere."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        value = draw(st.one_of(st.dictionaries(st.text(max_size=5), _wire, max_size=3), _wire))
        body = msgpack.packb(value, use_bin_type=True)
        kind = draw(st.sampled_from(["ok", "ok", "ok", "extra", "len-1", "len0", "huge",
                                     "utf8", "garbage"]))
        n = len(body)
        if kind == "extra":
            body += b"\x00"
            n += 1
        elif kind == "len-1":
            n = max(0, n - 1)
        elif kind == "len0":
            n = 0
        elif kind == "huge":
            n = ft.MAX_FRAME + draw(st.integers(1, 10))
        elif kind == "utf8":
            body = b"\x81\xa1\xc3\x01"
            n = len(body)
        elif kind == "garbage":
            body = draw(st.binary(min_size=1, max_size=20))
            n = len(body)
        parts.append(struct.pack(">I", n) + body)
    stream = b"".join(parts)
    cuts = draw(st.lists(st.integers(0, len(stream)), max_size=8))
    max_frame = draw(st.sampled_from([ft.MAX_FRAME, 64, 8]))
    return stream, max_frame, cuts


@pytest.mark.timeout(60)
@FAST
@given(_frame_streams())
def test_decoder_target_frames(case: tuple) -> None:
    ft.check_decoder(*case)


@pytest.mark.timeout(60)
@FAST
@given(st.binary(max_size=400))
def test_subscription_target_bytes(data: bytes) -> None:
    ft.subscription_from_bytes(data)


@pytest.mark.timeout(60)
@FAST
@given(st.dictionaries(st.sampled_from(ft.KEYS), _wire, max_size=7))
def test_subscription_target_maps(sub: dict) -> None:
    ft.check_subscription(sub)


@pytest.mark.timeout(60)
@FAST
@given(st.binary(max_size=400))
def test_publish_target_bytes(data: bytes) -> None:
    ft.publish_from_bytes(data)


@pytest.mark.timeout(60)
@FAST
@given(st.fixed_dictionaries({"events": st.lists(st.dictionaries(
    st.sampled_from(["stream", "type", "data", "metadata", "tags", "id", "x"]), _wire,
    max_size=6), max_size=3)}, optional={"expected_version": _wire}))
def test_publish_target_maps(args: dict) -> None:
    ft.check_publish(args)


@pytest.mark.timeout(60)
@FAST
@given(st.binary(max_size=400))
def test_selector_target_bytes(data: bytes) -> None:
    ft.selector_from_bytes(data)


_payload_leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                          st.sampled_from([1.0, 2.5, float("nan")]), st.sampled_from(["a", "b"]))
_payload_data = st.recursive(_payload_leaf, lambda ch: st.one_of(
    st.lists(ch, max_size=3), st.dictionaries(st.sampled_from(["a", "b", "c"]), ch, max_size=3)),
    max_leaves=8)
_ops = st.dictionaries(st.sampled_from(["$gt", "$gte", "$lt", "$lte", "$ne", "$in", "$nin",
                                        "$exists", "$glob"]),
                       st.one_of(_payload_leaf, st.lists(_payload_leaf, max_size=3),
                                 st.sampled_from(["a*", "?", "*b*"])), min_size=1, max_size=2)
_payload_sel = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.one_of(
    _payload_data, _ops, st.dictionaries(st.sampled_from(["a", "b"]),
                                         st.one_of(_payload_leaf, _ops), max_size=2)),
    min_size=1, max_size=3)


@pytest.mark.timeout(60)
@FAST
@given(_payload_sel, st.lists(_payload_data, min_size=1, max_size=4))
def test_selector_target_payload(selector: dict, datas: list) -> None:
    """event_payload selectors against data built from the same keys (so many match)."""
    ft.check_selector("event_payload", selector, [("s", "t", [], d) for d in datas])


_globs = st.text(alphabet="ab*?-\n", max_size=6)


@pytest.mark.timeout(60)
@FAST
@given(st.sampled_from(["stream", "event_type", "event_pattern", "tags"]),
       st.one_of(_globs, st.lists(_globs, max_size=3),
                 st.dictionaries(st.sampled_from(["stream", "type", "any", "all", "x"]),
                                 st.one_of(_globs, st.lists(_globs, max_size=3)), max_size=2),
                 _wire),
       st.lists(st.tuples(_globs.filter(bool), _globs.filter(bool), st.lists(_globs, max_size=3),
                          _wire), min_size=1, max_size=4))
def test_selector_target_text(type_: str, selector: object, events: list) -> None:
    ft.check_selector(type_, selector, events)


# ---- over the socket ------------------------------------------------------------------

@pytest.fixture
def fuzzer(daemon):  # type: ignore[no-untyped-def]
    c = daemon.client()
    ctx = ft.setup_ctx(c, daemon.root)
    fz = ft.SocketFuzzer(daemon.socket, ctx, lambda: daemon.proc.poll() is None)
    try:
        fz.open_idle(8)
        yield fz
        fz.check_idle()
    finally:
        fz.close()


def _report(fz: ft.SocketFuzzer) -> str:
    lines = ["%d finding(s) in %d cases:" % (len(fz.findings), fz.cases)]
    for f in fz.findings[:40]:
        lines.append("- %s\n    case: %s" % (f["what"][:400], f["case"][:400]))
    return "\n".join(lines)


@pytest.mark.timeout(90)
def test_every_field_of_every_op_refused(fuzzer: ft.SocketFuzzer) -> None:
    """Deterministic sweep: each corruptible field of each op gets every wrong value of
    fuzz_targets.wrong_values() (all msgpack types, NaN/inf, 2 MiB strings, nesting of 200,
    900, 1000 and 3000 levels), plus request-level errors, unknown ops and bad frames."""
    before = fuzzer.snapshot()
    for case in ft.sweep_cases(fuzzer.ctx):
        fuzzer.run_case(case)
    fuzzer.check_idle()
    after = fuzzer.snapshot()
    assert before == after, "the daemon changed: %r -> %r" % (before, after)
    if fuzzer.findings:
        pytest.fail(_report(fuzzer), pytrace=False)


@pytest.mark.timeout(120)
def test_socket_fuzz_hypothesis(fuzzer: ft.SocketFuzzer) -> None:
    """A few hundred random cases (scripts/fuzz runs tens of thousands)."""
    before = fuzzer.snapshot()
    strategy = ft.hypothesis_strategies(fuzzer.ctx)

    @settings(max_examples=int(os.environ.get("FUZZ_SOCKET_CASES", "300")), deadline=None,
              database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(case: dict) -> None:
        fuzzer.run_case(case)

    run()
    fuzzer.check_idle()
    after = fuzzer.snapshot()
    assert before == after, "the daemon changed: %r -> %r" % (before, after)
    if fuzzer.findings:
        pytest.fail(_report(fuzzer), pytrace=False)
    assert fuzzer.cases >= 100


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", sorted(ft.BYTE_TARGETS))
def test_atheris_runner(target: str, tmp_path: "os.PathLike[str]") -> None:
    """The coverage-guided runner scripts/fuzz uses, for a few thousand inputs per target."""
    import subprocess
    import sys
    pytest.importorskip("atheris")
    findings = os.path.join(str(tmp_path), "findings.jsonl")
    corpus = os.path.join(str(tmp_path), "corpus")
    os.makedirs(corpus)
    proc = subprocess.Popen(
        [sys.executable, ft.__file__, "atheris", target, "-runs=3000", "-max_len=1024",
         "-timeout=20", "-artifact_prefix=%s/" % tmp_path, corpus],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(tmp_path),
        env=dict(os.environ, FUZZ_FINDINGS=findings))
    try:
        out, _ = proc.communicate(timeout=100)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode("utf-8", "replace")
    assert proc.returncode == 0, text[-3000:]
    assert "Done 3000 runs" in text, text[-3000:]
    if os.path.exists(findings):
        pytest.fail(open(findings).read()[:5000], pytrace=False)
