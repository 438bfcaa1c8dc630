"""parked: list, replay or purge a pool's parked events."""
import sqlite3
from typing import Any

from emitterd import framing
from emitterd.control.common import find_pool, only_keys, require_running
from emitterd.settings import FRAME_SLACK
from emitterd.errors import UNAVAILABLE, ProtocolError, invalid


def parked(ctx: Any, req: Any) -> dict:
    only_keys(req.args, ("key", "subscription", "action", "limit"))
    pool = find_pool(ctx, req.args)
    action = req.args.get("action")
    if action is None:
        action = "list"
    if action not in ("list", "replay", "purge"):
        raise invalid("action", 'action must be "list", "replay" or "purge"')
    limit = req.args.get("limit", 100)
    if limit is None:
        limit = 100
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100_000:
        raise invalid("limit", "limit must be an integer from 1 to 100000")
    rows = pool.parked_rows(limit)
    if action == "purge":
        try:
            n = ctx.log.unpark(pool.key, [p for p, _ in rows])
        except sqlite3.Error as e:      # a full disk, say: one transaction, so none went
            raise ProtocolError(UNAVAILABLE, "the event log could not purge them: %s" % e) from None
        pool.recount_parked()
        return {"count": n}
    records = ctx.log.get([p for p, _ in rows])
    if action == "replay":
        require_running(pool, "replay")
        return {"count": pool.replay([records[p] for p, _ in rows if p in records])}
    # as many as fit in one answer (limit is a most): a list of large events would
    # otherwise be no answer at all, only an error
    budget = ctx.cfg.max_frame_bytes - FRAME_SLACK
    events = []
    for p, reason in rows:
        rec = records.get(p)
        if rec is not None:
            ev = rec.decode()
            ev["attempt"] = 1
            ev["reason"] = reason
            budget -= len(framing.pack(ev))
            if budget < 0 and events:
                break
            events.append(ev)
    return {"events": events}
