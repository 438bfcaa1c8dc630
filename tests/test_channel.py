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


class _Owner:
    """Refers to its channel; the channel's callbacks refer back (a cycle until close)."""

    def __init__(self, loop: Loop, sock: socket.socket) -> None:
        self.channel = Channel(loop, sock, 1 << 20, self.on_frame, self.on_close)

    def on_frame(self, msg: dict) -> None:
        pass

    def on_close(self, reason: str) -> None:
        pass


@pytest.mark.timeout(10)
def test_a_closed_channel_and_its_owner_go_without_the_cyclic_gc() -> None:
    """Workers and the parent run the cyclic GC rarely (tune_gc): a consumer connection
    or a client that sent garbage must be freed by reference counting once closed (they
    piled up: +15 MiB in a worker under attach churn)."""
    import gc
    import weakref
    from emitterd.framing import FrameError
    loop = Loop()
    gc.disable()
    try:
        a, b = socket.socketpair()
        owner = _Owner(loop, a)
        b.sendall(b"\x00\x00\x00\x00")              # an empty frame: a framing error
        dec = owner.channel.decoder
        dec.feed(b"\x00\x00\x00\x00")
        with pytest.raises(FrameError):
            dec.next()
        with pytest.raises(FrameError):
            dec.next()                               # poisoned: the same error again
        # the kept error has no traceback: one would hold the decoder in a cycle with it
        assert dec.error is not None and dec.error.__traceback__ is None
        owner.channel.close("done")
        refs = [weakref.ref(owner), weakref.ref(owner.channel)]
        del owner, dec
        assert [r() for r in refs] == [None, None]
        b.close()
    finally:
        gc.enable()
        loop.close()
