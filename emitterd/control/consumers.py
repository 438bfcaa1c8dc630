"""attach: turn a control connection into a consumer of a pool's worker."""
from typing import Any

from emitterd import framing, logs, subscription
from emitterd.errors import NOT_FOUND, UNAVAILABLE, ProtocolError, invalid
from emitterd.control.common import describe, only_keys, require_running
from emitterd.control.server import DEFERRED
from emitterd.loop import monotonic

log = logs.get("control")
ATTACH_WAIT = 10.0      # at least this long (else worker_timeout) for a worker to get ready
ATTACH_POLL = 0.01
STARTING_WAIT = 2.0     # for a starting worker with fewer consumers than the ready ones


def attach(ctx: Any, req: Any) -> Any:
    only_keys(req.args, ("key",))
    key = req.args.get("key")
    if key is None:
        raise invalid("key", "attach needs the key of a subscription without subscriber")
    if not subscription.is_key(key):
        raise ProtocolError(NOT_FOUND, "no subscription with key %s" % describe(key))
    pool = ctx.registry.pools.get(key)
    if pool is None:
        raise ProtocolError(NOT_FOUND, "no subscription with key %s" % key)
    _check_attachable(pool)
    conn = req.conn
    conn.channel.pause()      # every later byte on this connection belongs to the consumer
    deadline = monotonic() + max(ctx.cfg.worker_timeout, ATTACH_WAIT)
    starting_deadline = monotonic() + STARTING_WAIT

    def try_now() -> None:
        if conn.channel.closed:
            return
        try:
            if ctx.registry.pools.get(key) is not pool:
                raise ProtocolError(NOT_FOUND, "no subscription with key %s" % key)
            _check_attachable(pool)
            ready = [h for h in pool.slots.values() if h.state == "ready"]
            # §3: the worker with the fewest consumers, and a worker still starting (just
            # after start or a resize) has none: wait a little for it rather than pile
            # consumers on the ready ones, where they would stay
            fewest = min(pool.slots.values(), default=None, key=_load)
            if ready and fewest.state != "ready" and monotonic() < starting_deadline:
                ready = []
            if not ready and monotonic() >= deadline:
                raise ProtocolError(UNAVAILABLE, "pool %s has had no ready worker for %.0f s"
                                    % (key, max(ctx.cfg.worker_timeout, ATTACH_WAIT)))
        except ProtocolError as e:
            conn.channel.resume()     # still a control connection: its next requests
            req.fail(e)
            return
        if not ready:
            # a pool just started (or respawning its last worker) is running, so the
            # attach waits for a worker instead of failing (PROTOCOL §2: only a pool that
            # is not running is unavailable)
            ctx.loop.call_later(ATTACH_POLL, try_now)
            return
        h = min(ready, key=_load)
        h.pending_consumers += 1

        def handoff() -> None:
            if conn.channel.closed:          # the client left before its answer went out
                h.pending_consumers = max(0, h.pending_consumers - 1)
                pool.pending_consumer_gone(left=True)
                return
            if h.channel is None or h.channel.closed or h.planned:
                h.pending_consumers = max(0, h.pending_consumers - 1)
                conn.channel.close("worker gone before handoff")
                pool.pending_consumer_gone(left=False)
                return
            rest = conn.channel.decoder.take_rest()
            sock = ctx.server.detach(conn)
            h.channel.send_raw(framing.encode({"op": "consumer", "pending": rest}),
                               fds=[sock.fileno()])
            h.channel.after_flush(sock.close)
            log.info("consumer attached", pool=pool.name, worker=h.index, peer_pid=conn.peer.pid)
        conn.after_reply = handoff
        req.reply({"key": key, "worker": h.index})

    try_now()
    return DEFERRED


def _load(h: Any) -> tuple:
    """Fewest consumers first, the lowest index on a tie (§3)."""
    return (h.consumers + h.pending_consumers, h.index)


def _check_attachable(pool: Any) -> None:
    if pool.spec["subscriber"] is not None:
        raise invalid("key", "subscription %s delivers to %s; attach is only for subscriptions "
                      "without subscriber" % (pool.key, pool.spec["subscriber"]))
    require_running(pool, "attach")
