"""One consumer connection inside a worker: events out, ack/nack in, in-flight and timeouts."""
import heapq
from typing import Any

from emitterd import framing
from emitterd.channel import Channel
from emitterd.loop import monotonic

NACK_ACTIONS = ("retry", "park", "skip")
# A parked event keeps its reason on disk and in every `parked` answer: a consumer's
# reason is cut to this many characters, so that one event cannot fill those.
MAX_REASON = 1000


def _positions(msg: dict) -> Any:
    ps = msg.get("positions")
    if not isinstance(ps, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in ps):
        return None
    return ps


class ConsumerConn:
    """Tracks which positions are in flight on this connection; reports verdicts upward.

    report(op, positions, **extra) sends ack / nack / requeue frames to the parent.
    """

    def __init__(self, worker: Any, sock: Any, kind: str, pending: bytes = b"") -> None:
        self.worker = worker
        self.kind = kind
        self.dismissed = False          # closed by the daemon's choice, not the client's
        self.inflight: dict = {}        # position -> ack deadline
        # (deadline, positions) as a heap: an update of ack_timeout makes a later batch's
        # deadline earlier than one before it (a queue held it behind the older deadline)
        self._deadlines: list = []
        self.channel = Channel(worker.loop, sock, worker.spec["max_frame"], self._on_frame,
                               self._on_close, self._on_frame_error, max_out=worker.spec["out_cap"])
        if pending:
            self.channel.decoder.feed(pending)
            self.channel.process()

    @property
    def over_cap(self) -> bool:
        return self.channel.over_cap

    @property
    def closed(self) -> bool:
        return self.channel.closed

    def deliver(self, positions: list, frame: bytes) -> None:
        deadline = monotonic() + self.worker.spec["ack_timeout"]
        for p in positions:
            self.inflight[p] = deadline
        heapq.heappush(self._deadlines, (deadline, positions))
        self.channel.send_raw(frame)

    def expire(self, now: float) -> list:
        """Positions whose ack deadline passed: they leave this connection."""
        expired = []
        dl = self._deadlines
        while dl and dl[0][0] <= now:
            deadline, positions = heapq.heappop(dl)
            for p in positions:
                if self.inflight.get(p) == deadline:
                    del self.inflight[p]
                    expired.append(p)
        return expired

    def _take(self, positions: list) -> list:
        inflight = self.inflight
        return [p for p in positions if inflight.pop(p, None) is not None]

    def _on_frame(self, msg: dict) -> None:
        op = msg.get("op")
        positions = _positions(msg)
        if op == "ack" and positions is not None:
            done = self._take(positions)
            if done:
                self.worker.report({"op": "ack", "positions": done})
            return
        reason = msg.get("reason")
        if (op == "nack" and positions is not None and msg.get("action") in NACK_ACTIONS
                and (reason is None or isinstance(reason, str))):
            if reason is not None and len(reason) > MAX_REASON:
                reason = reason[:MAX_REASON - 3] + "..."
            done = self._take(positions)
            if done:
                self.worker.report({"op": "nack", "positions": done, "action": msg["action"],
                                    "reason": reason})
            return
        self.channel.close("consumer sent a frame that is not a valid ack or nack: %s"
                           % _what_is_wrong(op, positions, msg))

    def dismiss(self, code: str, message: str) -> None:
        """End this connection with an error frame (id 0) the client can read: its events
        in flight go back to the parent for delivery elsewhere."""
        self.dismissed = True
        self.channel.send({"id": 0, "ok": False, "error": {"code": code, "message": message}})
        self.channel.flush()
        self.channel.close(message)

    def _on_frame_error(self, err: Any) -> None:
        self.channel.send({"id": 0, "ok": False, "error": {"code": err.code, "message": err.message}})
        self.channel.close_when_flushed("consumer sent a bad frame: %s: %s" % (err.code, err.message))

    def _on_close(self, reason: str) -> None:
        lost = list(self.inflight)
        self.inflight.clear()
        self._deadlines.clear()
        self.worker.consumer_closed(self, lost, reason)


def hello(key: str, name: str, index: int) -> bytes:
    return framing.encode({"op": "hello", "key": key, "name": name, "worker": index})


def _what_is_wrong(op: Any, positions: Any, msg: dict) -> str:
    """For the log: why a consumer's frame was refused."""
    if op not in ("ack", "nack"):
        return "op %r" % (op,)
    if positions is None:
        return "%s without a list of integer positions" % op
    if msg.get("action") in NACK_ACTIONS:
        return "nack with a reason that is not a string (%s)" % type(msg.get("reason")).__name__
    return "nack with action %r (retry, park or skip)" % (msg.get("action"),)
