"""Helpers shared by the control operations: finding a pool, checking plain arguments."""
from typing import Any

from emitterd import subscription
from emitterd.errors import NOT_FOUND, UNAVAILABLE, ProtocolError, clip, invalid

TRIPLE = ("name", "type", "selector")
ARG_FIELDS = ("pool_size", "subscriber", "options", "checkpoint", "delete", "drain_timeout",
              "action", "limit")     # args some op takes beside the target


def resolve_key(args: dict) -> str:
    """The key named by {"key"} or {"subscription": {name, type, selector}}."""
    if "key" in args and args["key"] is not None:
        key = args["key"]
        if not subscription.is_key(key):
            raise ProtocolError(NOT_FOUND, "no subscription with key %s" % describe(key))
        # both given: they must agree, or a stop could hit another pool than the one named
        if args.get("subscription") is not None and _triple_key(args) != key:
            raise invalid("subscription", "key %s and the subscription triple name "
                          "different subscriptions; give one of them" % key)
        return key
    if "subscription" in args:
        return _triple_key(args)
    raise invalid("key", 'give "key" or "subscription" {name, type, selector}')


def _triple_key(args: dict) -> str:
    """The key of the {name, type, selector} triple in args["subscription"]."""
    triple = args["subscription"]
    if isinstance(triple, dict):
        for k in triple:
            if k not in TRIPLE:
                # never ignored: `update` with pool_size inside the triple would
                # answer ok and change nothing
                name = clip(str(k))
                raise invalid("subscription.%s" % name,
                              "a target subscription is named by name, type and selector "
                              "only; %r is not one of them%s" % (
                                  name, " (give it beside \"subscription\", as an "
                                  "argument of the op)" if k in ARG_FIELDS else ""))
    try:
        name, type_, _, normalized = subscription.validate_identity(args["subscription"])
    except ProtocolError:
        raise ProtocolError(NOT_FOUND, "no subscription matches the given triple") from None
    return subscription.key(type_, normalized, name)


def describe(value: Any) -> str:
    """A short, safe rendering of a client value for an error message (never recurses)."""
    if isinstance(value, str):
        return repr(value[:64])
    return "of type %s" % type(value).__name__


def find_pool(ctx: Any, args: dict) -> Any:
    key = resolve_key(args)
    pool = ctx.registry.pools.get(key)
    if pool is None:
        raise ProtocolError(NOT_FOUND, "no subscription with key %s" % key)
    return pool


def only_keys(args: dict, allowed: tuple) -> None:
    for k in args:
        if k not in allowed:
            name = clip(str(k))
            raise invalid(name, "unknown argument %r (%s)" % (
                name, "allowed: " + ", ".join(allowed) if allowed else "this op takes none"))


def number_arg(args: dict, name: str, default: float, minimum: float = 0.0) -> float:
    v = args.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= minimum or v != v:
        raise invalid(name, "%s must be a number >= %s" % (name, minimum))
    return float(v)


def bool_arg(args: dict, name: str, default: bool = False) -> bool:
    v = args.get(name, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise invalid(name, "%s must be true or false" % name)
    return v


def not_shutting_down(ctx: Any) -> None:
    if ctx.shutting_down:
        raise ProtocolError(UNAVAILABLE, "the daemon is shutting down")


def require_running(pool: Any, to: str) -> None:
    """`unavailable` unless the pool runs and is not stopping, saying which it is."""
    if pool.stopping is not None:
        why = "is stopping (a stop waits for its in-flight events)"
    elif pool.state == "running":
        return
    elif pool.state == "backoff":
        why = "is in backoff after repeated worker deaths (start it to retry now)"
    elif pool.state == "failed":
        why = "has failed: its workers kept dying (start it again)"
    else:
        why = "is %s (start it first)" % pool.state
    raise ProtocolError(UNAVAILABLE, "pool %s %s; cannot %s" % (pool.key, why, to))
