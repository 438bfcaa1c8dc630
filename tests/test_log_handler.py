"""logs._NoWaitHandler, the log handler that never waits on a full pipe: a line cut short (the pipe filled between two PIPE_BUF pieces) is to
be ended by the next line written ("a line was cut short: the next one starts anew"). But a
line dropped whole in the meantime sets `_cut = i > 0`, i.e. False: the cut line's fragment
is then never ended, and the next line written is glued onto it (one garbled line that
carries the log_lines_dropped count of both)."""
import fcntl
import os

import pytest

from emitterd import logs


def _set_nonblock(fd, on):
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, (fl | os.O_NONBLOCK) if on else (fl & ~os.O_NONBLOCK))


def _drain(r):
    out = b""
    while True:
        try:
            chunk = os.read(r, 65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


@pytest.mark.timeout(10)
def test_a_cut_line_is_ended_even_after_a_line_dropped_whole():
    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    try:
        _set_nonblock(r, True)
        # fill the pipe, one page per write
        _set_nonblock(w, True)
        while True:
            try:
                os.write(w, b"F" * 4096)
            except BlockingIOError:
                break
        _set_nonblock(w, False)
        assert len(os.read(r, 4096)) == 4096      # one page free: the first piece only
        logs.configure("info", "text", stream=stream, journal=False)
        log = logs.get("review")
        log.warning("first " + "x" * 6000)       # first piece written, the rest dropped
        log.warning("second")                    # dropped whole: the pipe is still full
        data = _drain(r)
        log.warning("third")                     # room again
        data += _drain(r)
    finally:
        logs.configure("info", "text")          # back to stderr
        stream.close()
        os.close(r)
    lines = data.replace(b"F", b"").split(b"\n")
    third = [ln for ln in lines if b"third" in ln]
    assert third, data[-300:]
    assert b"first" not in third[0], "the third line is glued onto the cut first one: %r..%r" % (
        third[0][:60], third[0][-120:])


@pytest.mark.timeout(10)
def test_lines_dropped_before_a_reload_are_still_counted():
    """README: "the next line written carries log_lines_dropped=N". Every SIGHUP calls
    logs.configure(), which installed a new handler: the count of lines dropped so far (and
    a line left cut short) was thrown away, and the next line said nothing of the 3."""
    r, w = os.pipe()
    stream = os.fdopen(w, "w")
    try:
        _set_nonblock(r, True)
        _set_nonblock(w, True)
        while True:                              # a full pipe: every line is dropped
            try:
                os.write(w, b"F" * 4096)
            except BlockingIOError:
                break
        _set_nonblock(w, False)
        logs.configure("info", "text", stream=stream, journal=False)
        log = logs.get("review")
        for i in range(3):
            log.warning("dropped %d" % i)
        logs.configure("info", "json", stream=stream, journal=False)   # a reload
        _drain(r)
        log.warning("after")
        data = _drain(r)
    finally:
        logs.configure("info", "text")          # back to stderr
        stream.close()
        os.close(r)
    assert b'"log_lines_dropped":3' in data, data[-300:]
