"""A single-threaded selector loop with timers and end-of-turn hooks (parent and workers)."""
import errno
import gc
import heapq
import itertools
import selectors
import time
from typing import Any, Callable, Optional

from emitterd import logs

# accept() errors that mean "no file descriptor (or memory) for now", not a broken socket
OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_PAUSE = 0.5      # seconds a listener rests after one of them

log = logs.get("loop")

monotonic = time.monotonic


def tune_gc() -> None:
    """Fewer, cheaper collections for a process that runs this loop, once it has started up:
    start-up objects never need scanning again, and the hot path allocates many short-lived
    acyclic objects (a full pass over a large heap is a latency spike of tens of ms)."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], Any]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """One selector, a timer heap, and hooks that run once at the end of every turn.

    Reading handlers only record work; end-of-turn hooks do it in batches (group commit,
    dispatch, one write per connection), which is what keeps the parent fast.
    """

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list = []
        self._seq = itertools.count()
        self._turn_end: list = []
        self._dirty: dict = {}
        self._again = False
        self.running = True

    # fds
    def add_reader(self, fileobj: Any, callback: Callable[[int], Any]) -> None:
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def set_events(self, fileobj: Any, events: int, callback: Callable[[int], Any]) -> None:
        try:
            key = self.selector.get_key(fileobj)
        except KeyError:
            if events:
                self.selector.register(fileobj, events, callback)
            return
        if not events:
            self.selector.unregister(fileobj)
        elif key.events != events or key.data is not callback:
            self.selector.modify(fileobj, events, callback)

    def remove(self, fileobj: Any) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def pause_reader(self, fileobj: Any, seconds: float) -> None:
        """Stop watching fileobj for `seconds`, then watch it again with the same callback:
        a listening socket whose accept() fails for want of file descriptors stays readable,
        and retrying at once would spin the loop (and fill the log) until one is freed."""
        try:
            callback = self.selector.get_key(fileobj).data
        except (KeyError, ValueError):
            return
        self.remove(fileobj)

        def resume() -> None:
            if fileobj.fileno() >= 0:          # not closed meanwhile (shutdown)
                self.set_events(fileobj, selectors.EVENT_READ, callback)
        self.call_later(seconds, resume)

    def accept(self, listener: Any, what: str, log: Any) -> Any:
        """listener.accept()'s connection, or None: nothing waiting, or an error. Out of
        file descriptors, the listener rests ACCEPT_PAUSE seconds (one warning each time)
        instead of failing again at every turn; another error is logged."""
        try:
            return listener.accept()[0]
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno in OUT_OF_FDS:
                log.warning("out of file descriptors: not accepting %s for %.1fs"
                            % (what, ACCEPT_PAUSE), error=e.strerror)
                self.pause_reader(listener, ACCEPT_PAUSE)
            else:
                log.error("accept failed", listener=what, error=str(e))
            return None

    # timers
    def call_at(self, when: float, callback: Callable[[], Any]) -> Timer:
        t = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), t))
        return t

    def call_later(self, delay: float, callback: Callable[[], Any]) -> Timer:
        return self.call_at(monotonic() + delay, callback)

    def every(self, interval: float, callback: Callable[[], Any]) -> None:
        """Run callback every `interval` seconds (interval may be a callable, re-read each time)."""
        def tick() -> None:
            try:
                callback()
            finally:
                # a callback that raised (logged by run_once) runs again: the heartbeat,
                # the watchdog ping and the checkpoint flush must not stop after one bug
                self.call_later(interval() if callable(interval) else interval, tick)
        self.call_later(interval() if callable(interval) else interval, tick)

    # end of turn
    def at_turn_end(self, callback: Callable[[], Any]) -> None:
        self._turn_end.append(callback)

    def again(self) -> None:
        """Work is left over: the next turn polls instead of sleeping."""
        self._again = True

    def mark_dirty(self, obj: Any) -> None:
        """obj.flush() runs at the end of this turn (once, however often it was marked)."""
        self._dirty[id(obj)] = obj

    def run_once(self, max_wait: Optional[float] = None) -> None:
        timeout = max_wait
        if self._timers:
            wait = max(0.0, self._timers[0][0] - monotonic())
            timeout = wait if timeout is None else min(timeout, wait)
        if self._dirty or self._again:
            timeout = 0
            self._again = False
        # Every callback is guarded: a bug handling one message must not stop the loop
        # (control requests are guarded again, per request, to answer `internal`).
        for key, mask in self.selector.select(timeout):
            try:
                key.data(mask)
            except Exception:
                log.exception("unhandled error in an I/O handler")
        now = monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            t = heapq.heappop(timers)[2]
            if not t.cancelled:
                try:
                    t.callback()
                except Exception:
                    log.exception("unhandled error in a timer")
        for hook in self._turn_end:
            try:
                hook()
            except Exception:
                log.exception("unhandled error at the end of a loop turn")
        self.flush_dirty()

    def flush_dirty(self) -> None:
        """Flush everything marked dirty so far (a hook may call it to send early)."""
        while self._dirty:
            dirty, self._dirty = self._dirty, {}
            for obj in dirty.values():
                try:
                    obj.flush()
                except Exception:
                    log.exception("unhandled error while flushing")

    def run(self) -> None:
        while self.running:
            self.run_once()

    def close(self) -> None:
        self.selector.close()
