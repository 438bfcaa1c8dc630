"""start, stop, update, list, status."""
from typing import Any

from emitterd import logs, subscription
from emitterd.control import subscriber_access
from emitterd.control.common import (bool_arg, find_pool, not_shutting_down, number_arg,
                                     only_keys)
from emitterd.control.server import DEFERRED
from emitterd.errors import ALREADY_STARTED, UNAVAILABLE, ProtocolError, invalid

log = logs.get("control")


def start(ctx: Any, req: Any) -> Any:
    not_shutting_down(ctx)
    only_keys(req.args, ("subscription",))
    if "subscription" not in req.args:
        raise invalid("subscription", "subscription is required")
    given = req.args["subscription"]
    spec = subscription.validate(given, ctx.cfg)
    rights = subscriber_access.check(ctx, req.conn.peer, spec["subscriber"],
                                     "subscription.subscriber")
    key = subscription.key_of(spec)
    reg = ctx.registry
    pool = reg.pools.get(key)
    if pool is None:
        if len(reg.pools) >= ctx.cfg.max_subscriptions:
            raise ProtocolError(UNAVAILABLE, "max_subscriptions (%d) reached" % ctx.cfg.max_subscriptions)
        pool = reg.create(key, spec, rights)
        pool.start()
        return pool.status()
    if pool.state == "running" or pool.stopping is not None:
        raise ProtocolError(ALREADY_STARTED, "subscription %s is already running" % key, {"key": key})
    # a stopped, backoff or failed pool restarts from its checkpoint with the settings given
    # (§2); those left out keep what is stored, so `stop` then `start NAME --type --selector`
    # brings it back as it was (defaults there turned a unix: subscription into an attach one)
    spec, rights = _restarted(pool, given, spec, rights)
    pool.spec = spec
    pool.subscriber_rights = rights
    # workers that outlived a backoff take the new subscriber and ack_timeout
    pool.configure_workers()
    pool.start()
    reg.persist(pool, "running")
    return _saved_status(ctx, pool, "pool %s started" % key)


def _restarted(pool: Any, given: dict, spec: dict, rights: Any) -> tuple:
    """The spec (and subscriber rights) a start gives a known pool: the validated `spec`'s
    pool_size, subscriber and options where `given` names them, else the stored ones."""
    out = dict(pool.spec)
    if given.get("pool_size") is not None:
        out["pool_size"] = spec["pool_size"]
    if "subscriber" in given:
        out["subscriber"] = spec["subscriber"]          # nil clears it
    else:
        rights = pool.subscriber_rights
    options = given.get("options") or {}
    base = dict(pool.spec["options"])
    if "subscriber" in given and spec["subscriber"] is not None and "ephemeral" not in options:
        base["ephemeral"] = False     # as for a new one: one with a subscriber is not ephemeral
    out["options"] = subscription.validate_options(options, base, "subscription.options")
    subscription.check_ephemeral(out["options"], out["subscriber"],
                                 "subscription.options.ephemeral" if "ephemeral" in options
                                 else "subscription.subscriber")
    return out, rights


def stop(ctx: Any, req: Any) -> Any:
    only_keys(req.args, ("key", "subscription", "delete", "drain_timeout"))
    pool = find_pool(ctx, req.args)
    delete = bool_arg(req.args, "delete")
    drain = number_arg(req.args, "drain_timeout", ctx.cfg.drain_timeout)

    def done() -> None:
        st = pool.status()
        if delete:
            ctx.registry.delete(pool.key, lambda: answer(st, "deleted"))
        else:
            answer(st, "stopped")

    def answer(st: dict, what: str) -> None:
        err = ctx.registry.unsaved_error(pool.key, "pool %s %s" % (pool.key, what))
        if err is not None:
            req.fail(err)
        else:
            req.reply(st)
    pool.stop(drain, done)
    return DEFERRED


def update(ctx: Any, req: Any) -> Any:
    args = req.args
    only_keys(args, ("key", "subscription", "pool_size", "subscriber", "options", "checkpoint"))
    pool = find_pool(ctx, args)
    spec = dict(pool.spec)
    rights = pool.subscriber_rights
    if "pool_size" in args:
        spec["pool_size"] = subscription.validate_pool_size(args["pool_size"], "pool_size")
    if "subscriber" in args:
        spec["subscriber"] = subscription.validate_subscriber(args["subscriber"], "subscriber")
        rights = subscriber_access.check(ctx, req.conn.peer, spec["subscriber"], "subscriber")
    if "options" in args:
        spec["options"] = subscription.validate_options(args["options"], pool.spec["options"], "options")
    subscription.check_ephemeral(spec["options"], spec["subscriber"],
                                 "subscriber" if "subscriber" in args else "options.ephemeral")
    checkpoint = None
    if "checkpoint" in args:
        checkpoint = args["checkpoint"]
        head = ctx.log.head
        if isinstance(checkpoint, bool) or not isinstance(checkpoint, int) or not 0 <= checkpoint <= head:
            raise invalid("checkpoint", "checkpoint must be an integer from 0 to head (%d)" % head)
    changed_sinks = (spec["subscriber"] != pool.spec["subscriber"]
                     or rights != pool.subscriber_rights
                     or spec["options"]["ack_timeout"] != pool.spec["options"]["ack_timeout"])
    new_size = spec["pool_size"]
    spec["pool_size"] = pool.spec["pool_size"]
    was_ephemeral = pool.spec["options"]["ephemeral"]
    pool.spec = spec
    pool.subscriber_rights = rights
    pool.dispatcher.options = spec["options"]
    if spec["options"]["ephemeral"] != was_ephemeral:
        pool.ephemeral_changed()
    if changed_sinks:
        pool.configure_workers()
    if checkpoint is not None:
        pool.dispatcher.set_checkpoint(checkpoint)
        pool.forget_in_flight()
        log.info("checkpoint moved", pool=pool.name, checkpoint=checkpoint)
    if new_size != pool.spec["pool_size"]:
        log.info("pool resized", pool=pool.name, old=pool.spec["pool_size"], new=new_size)
        pool.resize(new_size)
    if pool.state == "failed" and pool.stopping is None:
        pool.start()          # failed until start or update (DESIGN §4), as the log says
        ctx.registry.persist(pool, "running")
    else:
        ctx.registry.persist(pool)
    return _saved_status(ctx, pool, "pool %s updated" % pool.key)


def _saved_status(ctx: Any, pool: Any, what: str) -> dict:
    """The pool's status, or `unavailable` when its change is not on disk yet."""
    err = ctx.registry.unsaved_error(pool.key, what)
    if err is not None:
        raise err
    return pool.status()


def list_(ctx: Any, req: Any) -> dict:
    only_keys(req.args, ())
    pools = sorted(ctx.registry.pools.values(), key=lambda p: (p.created_at, p.key))
    return {"subscriptions": [p.status() for p in pools]}


def status(ctx: Any, req: Any) -> dict:
    only_keys(req.args, ("key", "subscription"))
    return find_pool(ctx, req.args).status()
