"""Subscription selectors (PROTOCOL §4): validation, canonical form and compiled matchers.

normalize() checks a selector once, at `start`, and returns its canonical form (maps with
sorted keys, a tags list as {"any": [...]}); compile_selector() turns a canonical selector
into a closure the parent process runs on every event, so all the work that does not depend
on the event (type dispatch, regexes, sets) happens here, once.

Equality follows §4, not Python: numbers compare by value (1 == 1.0) but booleans are not
numbers (True != 1), and containers compare element by element with the same rule.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Callable

__all__ = ["SELECTOR_TYPES", "SelectorError", "normalize", "compile_selector", "match_all",
           "compile_glob"]

SELECTOR_TYPES = ("stream", "event_type", "event_pattern", "event_payload", "tags")

Matcher = Callable[[Any], bool]

# Nesting limit for event_payload selectors. msgpack lets a frame nest ~1000 levels, which
# would exhaust Python's recursion limit in normalize(); no real selector nests this deep.
MAX_DEPTH = 64

_MISSING = object()
_COMPARE = {"$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le}
_OPERATORS = frozenset(_COMPARE) | {"$ne", "$in", "$nin", "$exists", "$glob"}
_PATTERN_KEYS = ("stream", "type")
_TAGS_KEYS = ("any", "all")


class SelectorError(ValueError):
    """A refused selector.

    .field is a dotted path relative to the selector ('' = the selector itself; list items
    by index, e.g. 'any.1', 'amount.$gte'); .message is human text.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__("%s: %s" % (field or "selector", message))
        self.field = field
        self.message = message


# --------------------------------------------------------------------------- normalize

def a_selector(type_: str) -> str:
    """ "a stream selector", "an event_type selector": for messages."""
    return "%s %s selector" % ("an" if type_[:1] in ("a", "e", "i", "o", "u") else "a", type_)


def normalize(type_: str, selector: Any) -> Any:
    """Validate a selector of type `type_` and return its canonical form (a fresh copy).

    Raises SelectorError for anything §4 refuses; ValueError for an unknown type_.
    """
    if type_ == "stream" or type_ == "event_type":
        if not isinstance(selector, str) or not selector:
            raise SelectorError("", "%s must be a non-empty string" % a_selector(type_))
        return selector
    if type_ == "event_pattern":
        return _normalize_pattern(selector)
    if type_ == "event_payload":
        return _normalize_payload(selector)
    if type_ == "tags":
        return _normalize_tags(selector)
    raise ValueError("unknown selector type %r" % (type_,))


def _join(path: str, key: str) -> str:
    return path + "." + key if path else key


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_str_keys(m: dict, path: str) -> None:
    # Selector maps are matched by key lookup and stored with sorted keys; non-str keys
    # (possible in msgpack) have no place in either, so the map holding one is refused.
    for k in m:
        if not isinstance(k, str):
            raise SelectorError(path, "map keys must be strings, not %s" % type(k).__name__)


def _check_int_range(v: int, path: str) -> None:
    # Only Python callers can get here (a frame cannot carry such an int), but the
    # canonical selector is msgpack-encoded for the subscription key, so refuse it cleanly.
    if not -2 ** 63 <= v < 2 ** 64:
        raise SelectorError(path, "integer out of the msgpack range")


def _normalize_pattern(selector: Any) -> Any:
    if isinstance(selector, str):
        if not selector:
            raise SelectorError("", "an event_pattern glob must be a non-empty string")
        return selector
    if not isinstance(selector, dict):
        raise SelectorError("", "an event_pattern selector must be a glob string or a map "
                                'with "stream" and/or "type"')
    if not selector:
        raise SelectorError("", 'an event_pattern map needs "stream" and/or "type"')
    _check_str_keys(selector, "")
    for k in sorted(selector):
        if k not in _PATTERN_KEYS:
            raise SelectorError(k, 'unknown event_pattern key %r (only "stream" and "type")' % k)
    out = {}
    for k in sorted(selector):
        glob = selector[k]
        # An empty glob could only match an empty stream id or type, which events never
        # have (both are 1..256 chars): refuse it as a mistake, like the string form does.
        if not isinstance(glob, str) or not glob:
            raise SelectorError(k, "%s must be a non-empty glob string" % k)
        out[k] = glob
    return out


def _normalize_tag_list(tags: Any, path: str) -> list:
    if not isinstance(tags, list) or not tags:
        raise SelectorError(path, "tags must be a non-empty list of strings")
    for i, t in enumerate(tags):
        if not isinstance(t, str):
            raise SelectorError(_join(path, str(i)), "a tag must be a string")
    return list(tags)  # order (and duplicates) kept as given: it feeds the subscription key


def _normalize_tags(selector: Any) -> dict:
    if isinstance(selector, list):
        # Errors point into the list the client sent ('1'), not into the {"any": ...} form.
        return {"any": _normalize_tag_list(selector, "")}
    if not isinstance(selector, dict):
        raise SelectorError("", 'a tags selector must be a list of strings or a map with '
                                '"any" and/or "all"')
    if not selector:
        raise SelectorError("", 'a tags map needs "any" and/or "all"')
    _check_str_keys(selector, "")
    for k in sorted(selector):
        if k not in _TAGS_KEYS:
            raise SelectorError(k, 'unknown tags key %r (only "any" and "all")' % k)
    return {k: _normalize_tag_list(selector[k], k) for k in sorted(selector)}


def _normalize_payload(selector: Any) -> dict:
    if not isinstance(selector, dict) or not selector:
        raise SelectorError("", "an event_payload selector must be a non-empty map")
    _check_str_keys(selector, "")
    # Top-level keys name fields of event.data; §4 defines operator maps only as the value
    # of a key, so "$..." keys up here are refused (mixed or not) rather than guessed at.
    dollars = [k.startswith("$") for k in selector]
    if any(dollars):
        if all(dollars):
            raise SelectorError("", "operators ($...) go in the value of a data key, "
                                    "not at the top level of an event_payload selector")
        raise SelectorError("", "a map mixes operator ($...) and plain keys")
    return _normalize_fields(selector, "", 1)


def _normalize_fields(m: dict, path: str, depth: int) -> dict:
    """A plain (subset) map whose keys are already known to be plain strings."""
    return {k: _normalize_field_value(m[k], _join(path, k), depth + 1) for k in sorted(m)}


def _normalize_field_value(v: Any, path: str, depth: int) -> Any:
    if depth > MAX_DEPTH:
        raise SelectorError(path, "selector nests more than %d levels" % (MAX_DEPTH - 1))
    if isinstance(v, dict):
        _check_str_keys(v, path)
        dollars = [k.startswith("$") for k in v]
        if v and all(dollars):
            return _normalize_operators(v, path, depth)
        if any(dollars):
            raise SelectorError(path, "a map mixes operator ($...) and plain keys")
        # {} lands here: an empty subset map, kept, which matches any map value.
        return _normalize_fields(v, path, depth)
    return _normalize_literal(v, path, depth)


def _normalize_operators(m: dict, path: str, depth: int) -> dict:
    out = {}
    for op in sorted(m):
        arg = m[op]
        p = _join(path, op)
        if op in _COMPARE:
            if not (_is_number(arg) or isinstance(arg, str)):
                raise SelectorError(p, "%s needs a number or a string" % op)
            if isinstance(arg, int):
                _check_int_range(arg, p)
        elif op == "$ne":
            arg = _normalize_literal(arg, p, depth + 1)
        elif op == "$in" or op == "$nin":
            if not isinstance(arg, list):
                raise SelectorError(p, "%s needs a list of values" % op)
            arg = _normalize_literal(arg, p, depth + 1)
        elif op == "$exists":
            if not isinstance(arg, bool):
                raise SelectorError(p, "$exists needs true or false")
        elif op == "$glob":
            if not isinstance(arg, str):
                raise SelectorError(p, "$glob needs a string")
        else:
            raise SelectorError(p, "unknown operator %r" % op)
        out[op] = arg
    return out


def _normalize_literal(v: Any, path: str, depth: int) -> Any:
    """A plain value (compared by §4 equality): copied, maps inside it get sorted keys.

    Inside a literal, "$" keys are just keys: only a field's own value can be an operator map.
    """
    if depth > MAX_DEPTH:
        raise SelectorError(path, "selector nests more than %d levels" % (MAX_DEPTH - 1))
    if v is None or isinstance(v, (bool, float, str, bytes)):
        return v
    if isinstance(v, int):
        _check_int_range(v, path)
        return v
    if isinstance(v, list):
        return [_normalize_literal(x, _join(path, str(i)), depth + 1) for i, x in enumerate(v)]
    if isinstance(v, dict):
        _check_str_keys(v, path)
        return {k: _normalize_literal(v[k], _join(path, k), depth + 1) for k in sorted(v)}
    # msgpack extension types (and anything else) have no equality rule in §4.
    raise SelectorError(path, "unsupported value of type %s" % type(v).__name__)


# --------------------------------------------------------------------------- compile

def match_all(event: Any) -> bool:
    """The matcher of the stream selector "$all" (callers may test `m is match_all`)."""
    return True


def _never(value: Any) -> bool:
    return False


def _always(value: Any) -> bool:
    return True


def _is_map(value: Any) -> bool:
    return isinstance(value, dict)


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def compile_selector(type_: str, selector: Any) -> Matcher:
    """Return matcher(event) -> bool for a normalized selector of type `type_`.

    Only event_payload matchers read event.data (it may be decoded lazily). A matcher
    never raises: an event it cannot make sense of simply does not match.
    """
    if type_ == "stream":
        if selector == "$all":
            return match_all
        s = selector
        return lambda event: event.stream == s
    if type_ == "event_type":
        t = selector
        return lambda event: event.type == t
    if type_ == "event_pattern":
        return _compile_pattern(selector)
    if type_ == "event_payload":
        return _compile_payload(selector)
    if type_ == "tags":
        return _compile_tags(selector)
    raise ValueError("unknown selector type %r" % (type_,))


def _compile_pattern(selector: Any) -> Matcher:
    if isinstance(selector, str):
        g = compile_glob(selector)
        return lambda event: g(event.stream)
    gs = compile_glob(selector["stream"]) if "stream" in selector else None
    gt = compile_glob(selector["type"]) if "type" in selector else None
    if gs is not None and gt is not None:
        return lambda event: gs(event.stream) and gt(event.type)
    if gs is not None:
        return lambda event: gs(event.stream)
    return lambda event: gt(event.type)  # type: ignore[misc]


def _compile_tags(selector: Any) -> Matcher:
    if isinstance(selector, list):  # tolerate the un-normalized list form
        selector = {"any": selector}
    any_ = selector.get("any")
    all_ = selector.get("all")
    any_m = _tags_any(any_) if any_ else None
    all_m = _tags_all(all_) if all_ else None
    if any_m is not None and all_m is not None:
        def match(event: Any) -> bool:
            try:
                tags = event.tags
                return any_m(tags) and all_m(tags)
            except Exception:  # e.g. an unhashable "tag": no match, never an exception
                return False
        return match
    one = any_m if any_m is not None else all_m
    if one is None:
        return lambda event: False

    def match1(event: Any) -> bool:
        try:
            return one(event.tags)
        except Exception:
            return False
    return match1


def _tags_any(tags: list) -> Callable[[Any], bool]:
    if len(set(tags)) == 1:
        t = tags[0]
        return lambda event_tags: t in event_tags
    fs = frozenset(tags)
    return lambda event_tags: not fs.isdisjoint(event_tags)


def _tags_all(tags: list) -> Callable[[Any], bool]:
    if len(set(tags)) == 1:
        t = tags[0]
        return lambda event_tags: t in event_tags
    fs = frozenset(tags)
    return lambda event_tags: fs.issubset(event_tags)


# --- globs

def compile_glob(glob: str) -> Callable[[Any], bool]:
    """A predicate: does a str match the §4 glob as a whole (non-str values never match)?

    `*` is any run (also empty), `?` exactly one character, everything else (including
    `[`, `]`, `\\`) only itself. Not fnmatch, and not one big regex either: `.*a.*a.*b`
    backtracks polynomially on long inputs. The glob is split at `*` into fixed-length
    segments matched left to right, leftmost first, which is exact for fixed-length
    segments and costs O(len(value) * len(glob)) at worst.
    """
    if "*" not in glob:
        if "?" not in glob:
            return lambda s: s == glob and isinstance(s, str)
        rx = _segment_regex(glob)
        return lambda s: isinstance(s, str) and rx.fullmatch(s) is not None
    parts = glob.split("*")
    head, mids, tail = parts[0], [p for p in parts[1:-1] if p], parts[-1]
    if not head and not tail and not mids:
        return _is_str  # "*", "**", ...
    if not mids and "?" not in head and "?" not in tail:
        # The common shapes: "orders-*", "*-v2", "a*z".
        if not tail:
            return lambda s: isinstance(s, str) and s.startswith(head)
        if not head:
            return lambda s: isinstance(s, str) and s.endswith(tail)
        n = len(head) + len(tail)
        return lambda s: (isinstance(s, str) and len(s) >= n and s.startswith(head)
                          and s.endswith(tail))
    if len(parts) == 2:
        # One star: a single regex `head.*tail` backtracks at most once per position.
        rx = re.compile(_segment_pattern(head) + ".*" + _segment_pattern(tail), re.DOTALL)
        return lambda s: isinstance(s, str) and rx.fullmatch(s) is not None
    min_len = sum(len(p) for p in parts)
    head_rx = _segment_regex(head) if head else None
    tail_rx = _segment_regex(tail) if tail else None
    ntail = len(tail)
    # Middle segments: (literal, None) searched with str.find, or (None, regex) when the
    # segment holds `?`.
    segs = [(None, _segment_regex(p)) if "?" in p else (p, None) for p in mids]

    def match(s: Any) -> bool:
        if not isinstance(s, str) or len(s) < min_len:
            return False
        pos = 0
        if head_rx is not None:
            if head_rx.match(s) is None:
                return False
            pos = len(head)
        end = len(s) - ntail  # >= pos thanks to min_len
        if tail_rx is not None and tail_rx.fullmatch(s, end) is None:
            return False
        for lit, rx in segs:
            if lit is not None:
                i = s.find(lit, pos, end)
                if i < 0:
                    return False
                pos = i + len(lit)
            else:
                m = rx.search(s, pos, end)  # type: ignore[union-attr]
                if m is None:
                    return False
                pos = m.end()
        return True
    return match


def _segment_pattern(segment: str) -> str:
    """Regex source for a star-free glob segment: `?` is any one character."""
    return ".".join(re.escape(p) for p in segment.split("?"))


def _segment_regex(segment: str) -> "re.Pattern[str]":
    # DOTALL: `?` and `*` match a newline like any other character.
    return re.compile(_segment_pattern(segment), re.DOTALL)


# --- payload

def _compile_payload(selector: dict) -> Matcher:
    m = _compile_subset(selector)

    def match(event: Any) -> bool:
        try:
            return m(event.data)
        except Exception:  # lazily decoded data may be corrupt; matching never raises
            return False
    return match


def _is_operator_map(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(
        isinstance(k, str) and k.startswith("$") for k in v)


def _compile_subset(selector: dict) -> Callable[[Any], bool]:
    """Predicate on a value: a map holding (at least) what the plain selector map says."""
    checks = []
    for key, sel in selector.items():
        if _is_operator_map(sel):
            pred, missing_ok = _compile_operators(sel)
        elif isinstance(sel, dict):
            pred, missing_ok = _compile_subset(sel), False
        else:
            pred, missing_ok = _literal_matcher(sel), False
        checks.append((key, pred, missing_ok))
    if not checks:
        # An empty plain map (only allowed nested) asks for nothing but a map: it matches any
        # map value, and, like every non-$exists:false selector, not a missing key.
        return _is_map
    if len(checks) == 1:
        key, pred, missing_ok = checks[0]

        def match1(value: Any) -> bool:
            if not isinstance(value, dict):
                return False
            x = value.get(key, _MISSING)
            if x is _MISSING:
                return missing_ok
            return pred(x)
        return match1

    def match(value: Any) -> bool:
        if not isinstance(value, dict):
            return False
        for key, pred, missing_ok in checks:
            x = value.get(key, _MISSING)
            if x is _MISSING:
                if not missing_ok:
                    return False
            elif not pred(x):
                return False
        return True
    return match


def _compile_operators(ops: dict) -> tuple:
    """(predicate on a present value, whether a missing key matches)."""
    # §4: a missing key matches only {"$exists": false}, alone.
    missing_ok = len(ops) == 1 and ops.get("$exists") is False
    preds = []
    for op, arg in ops.items():
        if op == "$exists":
            if arg is False:
                return _never, missing_ok  # the key is present, so this can never hold
            continue  # $exists: true holds for any present value
        if op in _COMPARE:
            preds.append(_compare_pred(_COMPARE[op], arg))
        elif op == "$ne":
            preds.append(_negate(_literal_matcher(arg)))
        elif op == "$in":
            preds.append(_membership(arg))
        elif op == "$nin":
            preds.append(_negate(_membership(arg)))
        elif op == "$glob":
            preds.append(compile_glob(arg))
        else:  # not normalized: refuse to guess, match nothing
            return _never, False
    if not preds:
        return _always, missing_ok
    if len(preds) == 1:
        return preds[0], missing_ok
    if len(preds) == 2:
        p1, p2 = preds
        return (lambda v: p1(v) and p2(v)), missing_ok
    return (lambda v: all(p(v) for p in preds)), missing_ok


def _negate(pred: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: not pred(v)


def _compare_pred(cmp: Callable[[Any, Any], bool], arg: Any) -> Callable[[Any], bool]:
    # Numbers with numbers, strings with strings; any other pairing simply does not hold.
    if isinstance(arg, str):
        return lambda v: isinstance(v, str) and cmp(v, arg)
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and cmp(v, arg)


def _literal_matcher(lit: Any) -> Callable[[Any], bool]:
    """Predicate: the value equals `lit` under §4 equality (specialized by lit's type)."""
    if lit is None:
        return lambda v: v is None
    if isinstance(lit, bool):
        return lambda v: v is lit
    if isinstance(lit, (int, float)):
        if lit != lit:  # NaN equals nothing, by value
            return _never
        return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                          and v == lit)
    if isinstance(lit, str):
        return lambda v: isinstance(v, str) and v == lit
    if isinstance(lit, bytes):
        return lambda v: isinstance(v, bytes) and v == lit
    return lambda v: _eq(lit, v)


def _eq(a: Any, b: Any) -> bool:
    """§4 equality of a normalized selector literal `a` and a data value `b`."""
    if a is None:
        return b is None
    if isinstance(a, bool):
        return b is a
    if isinstance(a, (int, float)):
        return isinstance(b, (int, float)) and not isinstance(b, bool) and a == b
    if isinstance(a, str):
        return isinstance(b, str) and a == b
    if isinstance(a, bytes):
        return isinstance(b, bytes) and a == b
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return False
        for x, y in zip(a, b):
            if not _eq(x, y):
                return False
        return True
    if isinstance(a, dict):
        # A map inside a plain value is compared for equality, not as a subset. The
        # literal's keys are all str (normalize), so equal sizes + every key found with an
        # equal value means the key sets are the same.
        if not isinstance(b, dict) or len(a) != len(b):
            return False
        for k, x in a.items():
            y = b.get(k, _MISSING)
            if y is _MISSING or not _eq(x, y):
                return False
        return True
    return False


def _membership(values: list) -> Callable[[Any], bool]:
    """Predicate: the value equals one of `values` (§4 equality), via hashed sets."""
    strs, blobs, nums = set(), set(), set()
    has_none = has_true = has_false = False
    others = []  # lists and maps: compared one by one
    for x in values:
        if x is None:
            has_none = True
        elif x is True:
            has_true = True
        elif x is False:
            has_false = True
        elif isinstance(x, (int, float)):
            if x == x:  # drop NaN: it equals nothing (a set would match it by identity)
                nums.add(x)  # int/float hash alike when equal, so 1 in {1.0}
        elif isinstance(x, str):
            strs.add(x)
        elif isinstance(x, bytes):
            blobs.add(x)
        else:
            others.append(x)
    fstrs, fblobs, fnums = frozenset(strs), frozenset(blobs), frozenset(nums)
    fothers = tuple(others)

    def pred(v: Any) -> bool:
        if isinstance(v, str):
            return v in fstrs
        if v is None:
            return has_none
        if isinstance(v, bool):  # before numbers: True would hash-match 1
            return has_true if v else has_false
        if isinstance(v, (int, float)):
            return v in fnums
        if isinstance(v, bytes):
            return v in fblobs
        for o in fothers:
            if _eq(o, v):
                return True
        return False
    return pred
