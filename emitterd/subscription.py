"""Subscription model: validation with exact field paths, defaults, key() and name()."""
import hashlib
import os
from typing import Any, Optional

import msgpack

from emitterd import filters
from emitterd.errors import clip, invalid

FIELDS = ("name", "type", "selector", "subscriber", "pool_size", "start_from", "options")
STRATEGIES = ("pinned", "round_robin", "random")
OPTION_NAMES = ("strategy", "batch_size", "max_in_flight", "ack_timeout", "max_retries",
                "retry_backoff", "max_restarts", "restart_period", "ephemeral")
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
MAX_SELECTOR_BYTES = 16 * 1024   # keeps every status (and so `list`) small


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def default_options(cfg: Any) -> dict:
    """The option defaults, from the daemon's default_<option> settings."""
    return {
        "strategy": cfg.default_strategy,
        "batch_size": cfg.default_batch_size,
        "max_in_flight": cfg.default_max_in_flight,
        "ack_timeout": float(cfg.default_ack_timeout),
        "max_retries": cfg.default_max_retries,
        "retry_backoff": [float(x) for x in cfg.default_retry_backoff],
        "max_restarts": cfg.default_max_restarts,
        "restart_period": float(cfg.default_restart_period),
        "ephemeral": bool(cfg.default_ephemeral),
    }


def validate_subscriber(value: Any, field: str) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("unix:"):
        raise invalid(field, 'subscriber must be "unix:/absolute/path.sock" or nil')
    path = value[5:]
    if not os.path.isabs(path):
        raise invalid(field, "the subscriber socket path must be absolute")
    if "\0" in path:
        raise invalid(field, "the subscriber socket path contains a NUL character")
    if len(path.encode("utf-8", "surrogateescape")) > UNIX_PATH_MAX:
        raise invalid(field, "the subscriber socket path is longer than %d bytes" % UNIX_PATH_MAX)
    return value


def check_ephemeral(options: dict, subscriber: Optional[str], field: str) -> None:
    """`invalid` at `field` for an ephemeral subscription with a subscriber (§3: ephemeral
    ones are attached to, and go when their consumers leave)."""
    if options["ephemeral"] and subscriber is not None:
        raise invalid(field, "an ephemeral subscription has no subscriber")


def validate_pool_size(value: Any, field: str) -> int:
    if not _is_int(value) or not 1 <= value <= 64:
        raise invalid(field, "pool_size must be an integer from 1 to 64")
    return value


def validate_options(given: Any, base: dict, field: str) -> dict:
    """Merge the given (partial) options over `base` and validate every value."""
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise invalid(field, "options must be a map")
    out = dict(base)
    for k, v in given.items():
        f = "%s.%s" % (field, k)
        if k not in OPTION_NAMES:
            raise invalid(f, "unknown option %r (known: %s)" % (clip(str(k)), ", ".join(OPTION_NAMES)))
        if k == "strategy":
            if v not in STRATEGIES:
                raise invalid(f, "strategy must be one of %s" % ", ".join(STRATEGIES))
        elif k == "batch_size":
            if not _is_int(v) or not 1 <= v <= 10000:
                raise invalid(f, "batch_size must be an integer from 1 to 10000")
        elif k in ("max_in_flight",):
            if not _is_int(v) or v < 1:
                raise invalid(f, "%s must be an integer >= 1" % k)
        elif k in ("max_retries", "max_restarts"):
            if not _is_int(v) or v < 0:
                raise invalid(f, "%s must be an integer >= 0" % k)
        elif k in ("ack_timeout", "restart_period"):
            if not _is_number(v) or not v > 0 or v != v or v == float("inf"):
                raise invalid(f, "%s must be a number of seconds > 0" % k)
            v = float(v)
        elif k == "retry_backoff":
            if (not isinstance(v, (list, tuple)) or len(v) != 2
                    or not all(_is_number(x) and 0 < x < float("inf") for x in v) or v[0] > v[1]):
                raise invalid(f, "retry_backoff must be [initial, maximum] seconds, 0 < initial <= maximum")
            v = [float(v[0]), float(v[1])]
        elif k == "ephemeral":
            if not isinstance(v, bool):
                raise invalid(f, "ephemeral must be true or false")
        out[k] = v
    return out


def normalize_selector(type_: Any, selector: Any, field: str) -> Any:
    try:
        return filters.normalize(type_, selector)
    except filters.SelectorError as e:
        raise invalid(field + ("." + e.field if e.field else ""), e.message) from None


def _encoded_size(value: Any) -> int:
    """Its msgpack size, or 0 when msgpack cannot encode it (normalize then says why)."""
    try:
        return len(msgpack.packb(value, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return 0


def validate_identity(sub: Any, field: str = "subscription") -> tuple:
    """Check name/type/selector; return (name, type, selector, normalized selector)."""
    if not isinstance(sub, dict):
        raise invalid(field, "subscription must be a map")
    name = sub.get("name")
    if not isinstance(name, str) or not 1 <= len(name) <= 200:
        raise invalid(field + ".name", "name must be a string of 1 to 200 characters")
    type_ = sub.get("type")
    if type_ not in filters.SELECTOR_TYPES:
        raise invalid(field + ".type", "type must be one of %s" % ", ".join(filters.SELECTOR_TYPES))
    if "selector" not in sub:
        raise invalid(field + ".selector", "selector is required")
    selector = sub["selector"]
    # results show the selector as given, so it is bounded as given too, and first: a
    # selector of megabytes is refused for its size in C, never walked item by item
    if _encoded_size(selector) > MAX_SELECTOR_BYTES:
        raise invalid(field + ".selector", "selector is over %d bytes encoded" % MAX_SELECTOR_BYTES)
    normalized = normalize_selector(type_, selector, field + ".selector")
    if len(msgpack.packb(normalized, use_bin_type=True)) > MAX_SELECTOR_BYTES:
        raise invalid(field + ".selector", "selector is over %d bytes encoded" % MAX_SELECTOR_BYTES)
    return name, type_, selector, normalized


def validate(sub: Any, cfg: Any, field: str = "subscription") -> dict:
    """A complete, validated Subscription map with every default filled in."""
    name, type_, selector, _ = validate_identity(sub, field)
    for k in sub:
        if k not in FIELDS:
            raise invalid("%s.%s" % (field, k), "unknown subscription field %r" % (clip(str(k)),))
    subscriber = validate_subscriber(sub.get("subscriber"), field + ".subscriber")
    pool_size = sub.get("pool_size")
    pool_size = cfg.default_pool_size if pool_size is None else validate_pool_size(
        pool_size, field + ".pool_size")
    start_from = sub.get("start_from", "now")
    if start_from is None:
        start_from = "now"
    # positions are SQLite integers: start_from - 1 (the checkpoint) must fit in 63 bits
    if not (start_from in ("origin", "now") or (_is_int(start_from) and 1 <= start_from <= 1 << 63)):
        raise invalid(field + ".start_from",
                      'start_from must be "origin", "now" or a position from 1 to 2**63')
    defaults = default_options(cfg)
    if subscriber is not None:
        defaults["ephemeral"] = False     # default_ephemeral is for subscriptions without one
    options = validate_options(sub.get("options"), defaults, field + ".options")
    check_ephemeral(options, subscriber, field + ".options.ephemeral")
    return {"name": name, "type": type_, "selector": selector, "subscriber": subscriber,
            "pool_size": pool_size, "start_from": start_from, "options": options}


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return [[_canonical(k), _canonical(v)] for k, v in
                sorted(value.items(), key=lambda kv: msgpack.packb(kv[0], use_bin_type=True))]
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def key(type_: str, normalized_selector: Any, name: str) -> str:
    """16 lowercase hex characters, the same for the same triple in every daemon run."""
    blob = msgpack.packb(["emitterd-key-v1", type_, _canonical(normalized_selector), name],
                         use_bin_type=True)
    return hashlib.sha256(blob).hexdigest()[:16]


def key_of(sub: dict) -> str:
    return key(sub["type"], filters.normalize(sub["type"], sub["selector"]), sub["name"])


def pool_name(store_id: str, key_: str) -> str:
    """The pool's name, unique per daemon; used in logs and process titles."""
    return "%s:%s" % (store_id, key_)


def is_key(value: Any) -> bool:
    return (isinstance(value, str) and len(value) == 16
            and all(c in "0123456789abcdef" for c in value))
