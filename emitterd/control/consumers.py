"""attach: turn a control connection into a consumer of a pool's worker."""
from typing import Any

from emitterd import framing, logs, subscription
from emitterd.errors import NOT_FOUND, UNAVAILABLE, ProtocolError, invalid
from emitterd.control.common import describe, only_keys

log = logs.get("control")


def attach(ctx: Any, req: Any) -> dict:
    only_keys(req.args, ("key",))
    key = req.args.get("key")
    if not subscription.is_key(key):
        raise ProtocolError(NOT_FOUND, "no subscription with key %s" % describe(key))
    pool = ctx.registry.pools.get(key)
    if pool is None:
        raise ProtocolError(NOT_FOUND, "no subscription with key %s" % key)
    if pool.spec["subscriber"] is not None:
        raise invalid("key", "subscription %s delivers to %s; attach is only for subscriptions "
                      "without subscriber" % (key, pool.spec["subscriber"]))
    if pool.state != "running" or pool.stopping is not None:
        raise ProtocolError(UNAVAILABLE, "pool %s is %s" % (key, pool.state))
    ready = [h for h in pool.slots.values() if h.state == "ready"]
    if not ready:
        raise ProtocolError(UNAVAILABLE, "pool %s has no ready worker yet" % key)
    h = min(ready, key=lambda w: (w.consumers + w.pending_consumers, w.index))
    h.pending_consumers += 1
    conn = req.conn
    conn.channel.pause()      # every later byte on this connection belongs to the consumer

    def handoff() -> None:
        if h.channel is None or h.channel.closed or h.planned:
            h.pending_consumers = max(0, h.pending_consumers - 1)
            conn.channel.close("worker gone before handoff")
            return
        rest = conn.channel.decoder.take_rest()
        sock = ctx.server.detach(conn)
        h.channel.send_raw(framing.encode({"op": "consumer", "pending": rest}), fds=[sock.fileno()])
        h.channel.after_flush(sock.close)
        log.info("consumer attached", pool=pool.name, worker=h.index, peer_pid=conn.peer[0])
    conn.after_reply = handoff
    return {"key": key, "worker": h.index}
