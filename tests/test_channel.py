"""emitterd.channel.Channel on a real socketpair and Loop: what a close does to the
output it could not send."""
from __future__ import annotations

import socket
from typing import List

import pytest

from emitterd.channel import Channel
from emitterd.loop import Loop


def _stuck_channel(closed: List[str]) -> tuple:
    """A channel whose peer never reads, with more queued than the socket takes."""
    loop = Loop()
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ch = Channel(loop, a, 1 << 20, lambda m: None, closed.append)
    ch.send_raw(b"x" * (1 << 20))
    ch.flush()
    return loop, ch, b


@pytest.mark.timeout(10)
def test_after_flush_callbacks_run_when_the_channel_closes_first() -> None:
    """attach hands a client's socket to a worker and closes the parent's copy once that
    message is written: a worker channel closing first (the worker died) must still close
    it, or the client waits forever on a socket nobody serves."""
    closed: List[str] = []
    loop, ch, peer = _stuck_channel(closed)
    ran: List[bool] = []
    ch.after_flush(lambda: ran.append(ch.closed))
    assert ran == [], "run before the queued bytes were written"
    ch.close("peer gone")
    assert ran == [True] and closed == ["peer gone"]
    peer.close()
    loop.close()


@pytest.mark.timeout(10)
def test_a_closed_channel_lets_go_of_what_it_could_not_send() -> None:
    """The channel and its owner refer to each other, so they wait for the cyclic GC: the
    unsent bytes must not wait with them (a worker whose subscriber never read kept one
    output buffer per reconnection)."""
    closed: List[str] = []
    loop, ch, peer = _stuck_channel(closed)
    assert len(ch._out) > 500_000
    ch.close("stalled")
    assert len(ch._out) == 0
    peer.close()
    loop.close()
