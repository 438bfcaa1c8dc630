"""A non-blocking stream socket that carries frames, driven by a Loop."""
import os
import selectors
import socket
from collections import deque
from typing import Any, Callable, Optional

from emitterd import framing, logs
from emitterd.framing import FrameError
from emitterd.loop import monotonic

log = logs.get("channel")

READ_CHUNK = 256 * 1024
MAX_FDS = 16
STALL_SECONDS = 2.0   # over its output cap with no write progress this long: the peer stopped reading


def _ignore(*_: Any) -> None:
    pass


class Channel:
    """Frames in (on_frame per decoded map, in order), frames out (buffered, flushed once a turn).

    on_close(reason) is called once, after the socket is closed. With recv_fds=True received
    file descriptors are appended to .fds (they travel with the message that carried them).
    """

    def __init__(self, loop: Any, sock: socket.socket, max_frame: int,
                 on_frame: Callable[[dict], Any], on_close: Callable[[str], Any],
                 on_frame_error: Optional[Callable[[FrameError], Any]] = None,
                 max_out: int = 0, recv_fds: bool = False,
                 decode: Optional[Callable[[bytes], Any]] = None,
                 backpressure: bool = False) -> None:
        self.loop = loop
        self.sock = sock
        sock.setblocking(False)
        self.decoder = framing.Decoder(max_frame, decode)
        self.on_frame = on_frame
        self.on_close = on_close
        self.on_frame_error = on_frame_error
        self.max_out = max_out
        self.recv_fds = recv_fds
        self.fds: deque = deque()
        self._out = bytearray()
        self._out_base = 0                 # bytes already sent before _out[0]
        self._fd_marks: deque = deque()    # (absolute offset, [fds]) to send with that byte
        self._after_flush: list = []
        self._progress_at = 0.0            # last time bytes left the output buffer
        self.closed = False
        self.reading = True
        # backpressure: over max_out, read no more (each request read makes more output)
        # until the peer has taken half of it; `reading` stays the owner's own switch
        self.backpressure = backpressure
        self._held = False
        self._close_when_flushed: Optional[str] = None   # the close reason, once asked for
        self._events = 0
        self._update_events()

    # ---- reading ---------------------------------------------------------------
    def set_limits(self, max_frame: int, max_out: int) -> None:
        """New limits (a reload) for the frames read from now on and the output buffer."""
        self.decoder.max_frame = max_frame
        self.max_out = max_out

    def _on_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush()
        if mask & selectors.EVENT_READ and not self.closed and self.reading:
            self._read()

    def read_pending(self, max_reads: int = 16) -> None:
        """Read and handle, without waiting, what the peer has sent so far: for an owner
        about to change what later frames mean (a worker forgetting its deliveries)."""
        for _ in range(max_reads):
            if self.closed or not self.reading or not self._read():
                return

    def _read(self) -> bool:
        """One read; whether it got data."""
        try:
            if self.recv_fds:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, READ_CHUNK, MAX_FDS)
                self.fds.extend(fds)
            else:
                data = self.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self.close("recv failed: %s" % e)
            return False
        if not data:
            self.close("eof")
            return False
        try:
            self.decoder.feed(data)
            self.process()
        except MemoryError:
            # the bytes read are gone (or half parsed): this connection's framing cannot be
            # trusted any more. Close it, so its peer learns at once (a publisher waited
            # for its whole timeout), instead of leaving it open and desynchronised.
            del data
            self.decoder.clear()
            log.error("out of memory reading a frame: connection closed")
            self.close("out of memory")
            return False
        return True

    def read_rest(self, max_bytes: int = 64 << 20) -> list:
        """The frames the peer sent before it went away and nobody has read yet, decoded
        but not dispatched: its owner decides what they still mean. Up to `max_bytes`."""
        out: list = []
        if self.closed or self.recv_fds:
            return out
        got = 0
        while True:
            try:
                while True:
                    msg = self.decoder.next()
                    if msg is None:
                        break
                    out.append(msg)
            except FrameError:
                return out
            if got >= max_bytes:
                return out
            try:
                data = self.sock.recv(READ_CHUNK)
            except OSError:
                return out
            if not data:
                return out
            got += len(data)
            self.decoder.feed(data)

    def process(self) -> None:
        """Decode and dispatch every complete frame in the buffer."""
        while self.reading and not self._held and not self.closed:
            try:
                msg = self.decoder.next()
            except FrameError as e:
                self.reading = False
                self._update_events()
                if self.on_frame_error is not None:
                    self.on_frame_error(e)
                else:
                    self.close("framing error: %s" % e.message)
                return
            if msg is None:
                return
            self.on_frame(msg)

    @property
    def over_cap(self) -> bool:
        """More output queued than max_out allows."""
        return bool(self.max_out) and len(self._out) > self.max_out

    @property
    def receiving(self) -> bool:
        """Open and reading (not paused by its owner nor held back by its own output)."""
        return self.reading and not self._held and not self.closed

    def pause(self) -> None:
        self.reading = False
        self._update_events()

    def resume(self) -> None:
        """Read again after pause(), starting with any frames already buffered."""
        if self.closed or self.reading:
            return
        self.reading = True
        self._update_events()
        self.process()

    # ---- writing ---------------------------------------------------------------
    def send(self, obj: Any) -> None:
        self.send_raw(framing.encode(obj))

    def send_raw(self, data: bytes, fds: Optional[list] = None) -> None:
        """Queue already-framed bytes (with fds to pass along with their first byte)."""
        if self.closed:
            return
        if fds:
            self._fd_marks.append((self._out_base + len(self._out), list(fds)))
        if not self._out:
            self._progress_at = monotonic()
        self._out += data
        if self.max_out and len(self._out) > self.max_out:
            self.flush()      # a reading peer takes it now; stalled() decides about the others
            if self.backpressure and len(self._out) > self.max_out and not self._held:
                self._held = True
                self._update_events()
            return
        self.loop.mark_dirty(self)

    def stalled(self, now: float) -> bool:
        """Over the output cap and nothing written for STALL_SECONDS: cut it off (the caller
        checks this periodically, so a peer that is merely slow for a moment survives)."""
        return (bool(self.max_out) and not self.closed and len(self._out) > self.max_out
                and now - self._progress_at > STALL_SECONDS)

    def close_if_stalled(self, now: float) -> bool:
        if self.stalled(now):
            # a socket polls writable only once most of its queue is read (a unix socket:
            # a quarter of its send buffer), so a peer reading slowly can go seconds without
            # a writable event: try a send before deciding it reads nothing
            self.flush()
        if self.stalled(now):
            self.close("output buffer over %d bytes and no progress for %.0fs (peer not reading)"
                       % (self.max_out, STALL_SECONDS))
            return True
        return False

    def after_flush(self, callback: Callable[[], Any]) -> None:
        """Run callback once everything queued so far has been written, or once the channel
        closes before that (the callback can tell by `closed`)."""
        if not self._out:
            callback()
        else:
            self._after_flush.append(callback)

    def close_when_flushed(self, reason: str = "closed after final response") -> None:
        self._close_when_flushed = reason
        self.reading = False
        self._update_events()
        self.loop.mark_dirty(self)

    def flush(self) -> None:
        if self.closed:
            return
        out = self._out
        while out:
            limit = len(out)
            fds = None
            if self._fd_marks:
                mark, mark_fds = self._fd_marks[0]
                rel = mark - self._out_base
                if rel == 0:
                    fds = mark_fds
                    limit = len(out) if len(self._fd_marks) == 1 else self._fd_marks[1][0] - self._out_base
                else:
                    limit = rel
            try:
                view = memoryview(out)[:limit]
                try:
                    if fds is not None:
                        n = socket.send_fds(self.sock, [view], fds)
                        self._fd_marks.popleft()
                    else:
                        n = self.sock.send(view)
                finally:
                    view.release()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                self.close("send failed: %s" % e)
                return
            del out[:n]
            self._out_base += n
            if n:
                self._progress_at = monotonic()
        if self._held and len(out) <= self.max_out // 2:
            self._held = False
            self.loop.call_later(0, self.process)   # the frames already read, next turn
        if not out:
            callbacks, self._after_flush = self._after_flush, []
            for cb in callbacks:
                cb()
            if self._close_when_flushed and not self.closed:
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                self.close(self._close_when_flushed)
                return
        self._update_events()

    def _update_events(self) -> None:
        if self.closed:
            return
        events = 0
        if self.reading and not self._held:
            events |= selectors.EVENT_READ
        if self._out:
            events |= selectors.EVENT_WRITE
        if events != self._events:
            self._events = events
            self.loop.set_events(self.sock, events, self._on_ready)

    # ---- closing ---------------------------------------------------------------
    def detach(self) -> socket.socket:
        """Stop driving the socket and return it (for handing it to another process)."""
        self.loop.remove(self.sock)
        self.closed = True
        return self.sock

    def close(self, reason: str = "closed") -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()
        callbacks, self._after_flush = self._after_flush, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("unhandled error in a callback of a closed channel")
        self.on_close(reason)
        # Nothing more goes out or comes in: drop the buffers now. The channel and its
        # owner refer to each other (callbacks), so they wait for the cyclic GC, which a
        # quiet worker runs rarely (tune_gc): a subscriber cut off for not reading left
        # its whole output buffer behind on every reconnection (worker RSS +25 MB each).
        self._out = bytearray()
        self._fd_marks.clear()
        self.decoder.clear()
        # the owner's callbacks refer back to it: let go, so refcounting frees both
        self.on_frame = self.on_close = _ignore
        self.on_frame_error = None
