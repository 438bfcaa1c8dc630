"""The emitter worker process: one selector loop over the parent pipe and its consumers."""
import os
import random
import socket
from collections import deque
from typing import Any, Optional

from emitterd import logs
from emitterd.channel import Channel
from emitterd.loop import Loop, monotonic, tune_gc
from emitterd.worker import attached
from emitterd.worker.unix import UnixSink

log = logs.get("worker")
# the internal pipe carries delivery frames of up to max_frame_bytes (which may be set to
# nearly 4 GiB) plus their envelope: only the frame header's own limit applies
PIPE_MAX_FRAME = 2 ** 32 - 1


class Worker:
    """Receives batches from the parent, hands each to one consumer, reports verdicts back."""

    def __init__(self, sock: socket.socket, spec: dict) -> None:
        self.spec = dict(spec)
        self.index = spec["index"]
        self.loop = Loop()
        self.parent = Channel(self.loop, sock, PIPE_MAX_FRAME, self._on_parent, self._on_parent_close,
                              recv_fds=True)
        self.consumers: list = []
        self.waiting: deque = deque()     # (positions, frame) with no consumer to take it yet
        self.held: deque = deque()        # (last, positions, frame, unsent) until on disk
        self.sink: Optional[UnixSink] = None
        self._rr = 0
        self._drain_armed = False   # a drain of `waiting` waits for a consumer's flush
        self._cut_off_said = logs.Throttle(burst=1, period=60.0)   # consumers not reading
        self._bad_frame_said = logs.Throttle()     # consumers breaking the protocol, as control

    def run(self) -> None:
        self.report({"op": "ready", "pid": os.getpid()})
        if self.spec.get("subscriber"):
            self.sink = UnixSink(self, self.spec["subscriber"])
        self.loop.every(lambda: self.spec["heartbeat_interval"], self._heartbeat)
        self.loop.every(lambda: min(0.25, self.spec["ack_timeout"] / 4), self._expire)
        self.loop.run()

    # ---- parent ----------------------------------------------------------------
    def report(self, msg: dict) -> None:
        self.parent.send(msg)

    def _on_parent(self, msg: dict) -> None:
        op = msg.get("op")
        if op == "deliver":
            held = msg.get("held")
            if held is not None:
                # sent while the parent's commit was still being written to disk: it goes
                # nowhere before the parent says "durable" (if the parent dies first, neither)
                self.held.append((held, msg["positions"], msg["frame"], msg.get("unsent", False)))
            else:
                self._deliver(msg["positions"], msg["frame"], msg.get("unsent", False))
        elif op == "durable":
            position = msg["position"]
            held = self.held
            while held and held[0][0] <= position:
                _, positions, frame, unsent = held.popleft()
                self._deliver(positions, frame, unsent)
        elif op == "consumer":
            if not self.parent.fds:
                # the kernel dropped the passed fd (we had no free descriptor: MSG_CTRUNC);
                # the client's connection is gone with it. The parent must stop counting it.
                log.warning("an attached consumer's connection was lost in the handover "
                            "(out of file descriptors?)", worker=self.index)
                self.report({"op": "consumers", "n": len(self.consumers), "adopted": 1,
                             "attached": self._attached(), "left": False})
                return
            fd = self.parent.fds.popleft()
            attached.adopt(self, fd, msg.get("pending") or b"")
        elif op == "configure":
            self._configure(msg)
        elif op == "forget":
            self._forget()
        else:
            log.warning("unknown message from parent", op=op, worker=self.index)

    def _on_parent_close(self, reason: str) -> None:
        # The parent is gone or retired us: stop at once; it redelivers what we held.
        self.loop.running = False

    def _configure(self, msg: dict) -> None:
        # new subscriber_rights apply from the sink's next connect
        for k in ("ack_timeout", "heartbeat_interval", "max_frame", "out_cap", "subscriber_rights"):
            if k in msg:
                self.spec[k] = msg[k]
        for c in self.consumers:
            c.channel.set_limits(self.spec["max_frame"], self.spec["out_cap"])
        if msg.get("log") and msg["log"] != self.spec.get("log"):
            self.spec["log"] = msg["log"]
            logs.configure(*msg["log"])          # a reload of log_level / log_format
        if "subscriber" in msg and msg["subscriber"] != self.spec.get("subscriber"):
            self.spec["subscriber"] = msg["subscriber"]
            if self.sink is not None:
                self.sink.stop()
                self.sink = None
            if msg["subscriber"]:
                # attached consumers of a subscription that now has a subscriber would go on
                # taking its events unseen by status: they are told, and let go
                for c in [c for c in self.consumers if c.kind == "attached"]:
                    c.dismiss("unavailable", "the subscription now delivers to %s; attach is "
                              "only for subscriptions without subscriber" % msg["subscriber"])
                self.sink = UnixSink(self, msg["subscriber"])
            else:
                # events that waited for a subscriber that never answered: with none now,
                # they go where a consumer is (attach mode), not stay here unseen
                self._hand_back_waiting()

    def _forget(self) -> None:
        """The checkpoint moved (update checkpoint): the parent delivers from it anew. What
        this worker holds or has in flight is of the old deliveries: a late ack of one must
        not count for the new one of that position (it would be ignored: §3)."""
        for c in list(self.consumers):
            # what a consumer sent before now answers the old deliveries: reported (and
            # dropped by the parent) before "forgot", never taken for the new ones'
            c.channel.read_pending()
        for c in self.consumers:
            c.inflight.clear()
        self.waiting.clear()
        self.held.clear()
        # what we reported before this line was of the old deliveries: the parent drops it
        self.report({"op": "forgot"})

    def _heartbeat(self) -> None:
        self.report({"op": "hb", "consumers": len(self.consumers),
                     "in_flight": sum(len(c.inflight) for c in self.consumers) + sum(
                         len(p) for p, _ in self.waiting) + sum(len(h[1]) for h in self.held)})

    # ---- delivery --------------------------------------------------------------
    def _pick(self) -> Any:
        # a consumer over output_buffer_bytes takes nothing more until it has read it: a
        # slow reader would otherwise pile every ack_timeout redelivery behind its unread
        # frames, without bound (it makes progress, so it is never cut off as stalled)
        live = [c for c in self.consumers if not c.closed and not c.over_cap]
        if not live:
            return None
        if len(live) == 1:
            return live[0]
        least = min(len(c.inflight) for c in live)
        ties = [c for c in live if len(c.inflight) == least]
        self._rr += 1
        return ties[self._rr % len(ties)] if len(ties) > 1 else ties[0]

    def _deliver(self, positions: list, frame: bytes, unsent: bool) -> None:
        # The parent counts an attempt only for events that reached a consumer: tell it
        # when its belief ("unsent" means it thinks we have no consumer) is wrong.
        conn = self._pick()
        if conn is None:
            if any(not c.closed for c in self.consumers):
                # every consumer is over its output cap: the batch waits here (not on a
                # consumer, so no ack_timeout runs) until one has read its backlog
                self.waiting.append((positions, frame))
                if not unsent:
                    self.report({"op": "waiting", "positions": positions})
                self._when_read()
                return
            if self.spec.get("subscriber"):
                self.waiting.append((positions, frame))   # the sink reconnects; events wait
                if not unsent:
                    self.report({"op": "waiting", "positions": positions})
            else:
                self.report({"op": "requeue", "positions": positions, "reason": "no consumer"})
            return
        if unsent:
            self._say_sent(positions)
        conn.deliver(positions, frame)

    def _drain_waiting(self) -> None:
        """Send what waits for a consumer with room, as long as one has room."""
        while self.waiting:
            conn = self._pick()
            if conn is None:
                if any(not c.closed for c in self.consumers):
                    self._when_read()    # full again: once one has read
                return
            positions, frame = self.waiting.popleft()
            self._say_sent(positions)
            conn.deliver(positions, frame)

    def _when_read(self) -> None:
        """Drain `waiting` once any consumer has written out what it has queued. Armed once:
        asked again on each batch that waits and each drain that fills up, it added callbacks
        on every consumer each time, and each flush ran them all."""
        if self._drain_armed:
            return
        self._drain_armed = True
        for c in self.consumers:
            c.channel.after_flush(self._on_read)

    def _on_read(self) -> None:
        if self._drain_armed:       # the first consumer's flush drains; the others' find it done
            self._drain_armed = False
            self._drain_waiting()

    def _say_sent(self, positions: list) -> None:
        """Tell the parent these reach a consumer, on the wire before they do: killed after
        the consumer read them but before a later flush, the parent would count them never
        sent, and deliver them again with the same attempt."""
        self.report({"op": "sent", "positions": positions})
        self.parent.flush()

    def _expire(self) -> None:
        now = monotonic()
        for c in list(self.consumers):
            c.channel.close_if_stalled(now)
        for c in self.consumers:
            expired = c.expire(now)
            if expired:
                self.report({"op": "nack", "positions": expired, "action": "retry",
                             "reason": "ack_timeout"})

    # ---- consumers -------------------------------------------------------------
    def consumer_opened(self, conn: Any, adopted: bool = False) -> None:
        """A consumer connection is ours; `adopted`: one the parent handed over (attach)."""
        if not conn.closed:
            self.consumers.append(conn)
        if adopted or not conn.closed:
            self.report({"op": "consumers", "n": len(self.consumers), "adopted": int(adopted),
                         "attached": self._attached()})
        if not conn.closed:
            self._drain_waiting()

    def consumer_closed(self, conn: Any, lost: list, reason: str) -> None:
        if conn in self.consumers:
            self.consumers.remove(conn)
            # an attached consumer whose client closed it (or broke the protocol) has left;
            # one the daemon let go (dismissed, cut off for not reading) may attach again
            left = (conn.kind == "attached" and not conn.dismissed
                    and not reason.startswith("output buffer"))
            self.report({"op": "consumers", "n": len(self.consumers),
                         "attached": self._attached(), "left": left})
        # a consumer cut off for not reading gets its events again and again, never as
        # retries (it acked nothing late: it took nothing): that is worth a warning
        say, extra, quiet = log.info, {}, False
        if reason.startswith("output buffer"):
            # a unix: subscriber reconnects and stalls again: a warning at most once a minute
            allowed = self._cut_off_said.allow()
            if allowed is not None:
                say, extra = log.warning, allowed
        elif reason.startswith("consumer sent a"):
            # a client can break the protocol once per connection, over and over: as the
            # control socket's bad frames, at most 5 lines a minute
            allowed = self._bad_frame_said.allow()
            quiet, extra = allowed is None, allowed or {}
        if not quiet:
            say("consumer connection closed", worker=self.index, kind=conn.kind, reason=reason,
                unfinished=len(lost), **extra)
        if lost:
            self.report({"op": "requeue", "positions": lost, "reason": "consumer gone"})
        self._hand_back_waiting()
        if self.sink is not None:
            self.sink.lost(conn)

    def _attached(self) -> int:
        return sum(1 for c in self.consumers if c.kind == "attached")

    def _hand_back_waiting(self) -> None:
        """Without a subscriber, events wait here only while a consumer may come back to this
        worker: with none left, the parent routes them to a worker that has one."""
        if not self.consumers and not self.spec.get("subscriber") and self.waiting:
            for positions, _ in self.waiting:
                self.report({"op": "requeue", "positions": positions, "reason": "no consumer"})
            self.waiting.clear()


def main(sock: socket.socket, spec: dict) -> None:
    random.seed()
    tune_gc()          # set here, not inherited: the fork server is a fresh interpreter
    logs.set_context(pool=spec["name"])    # a worker's lines name its pool (§2: "used in logs")
    if spec.get("log"):
        logs.configure(*spec["log"])   # a spare waited with the settings it was forked with
    if spec.get("nice"):
        # relative to the fork server's (the parent's) niceness; raising it needs no privilege,
        # but a sandbox may refuse the call: then run at the parent's rather than not at all
        try:
            os.nice(spec["nice"])
        except OSError as e:
            log.warning("worker_nice not applied", error=str(e), worker=spec["index"])
    Worker(sock, spec).run()


def standby(sock: socket.socket) -> None:
    """A spare worker: wait (blocking) for {"op": "activate", "spec"}, then become that worker."""
    from setproctitle import setproctitle
    from emitterd import framing
    sock.setblocking(True)
    # exactly the activate frame: what the parent sent after it (configure, forget, a
    # delivery, with its descriptors) stays in the socket for the worker's own channel
    head = _recv_exactly(sock, framing.HEADER.size)
    body = None if head is None else _recv_exactly(sock, framing.HEADER.unpack(head)[0])
    if body is None:
        return                          # the parent is gone before it needed us
    spec = framing.decode_payload(body)["spec"]
    setproctitle("emitterd: %s #%d" % (spec["name"], spec["index"]))
    main(sock, spec)


def _recv_exactly(sock: socket.socket, n: int) -> Optional[bytes]:
    """n bytes, or None at end of file."""
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            return None
        buf += data
    return bytes(buf)
