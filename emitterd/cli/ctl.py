"""emitterctl: the command line of emitterd (PROTOCOL.md §6).

Exit status: 0 success, 1 an error answered by the daemon (``error: <code>:
<message>`` on stderr), 2 usage error, 3 the daemon could not be reached
(no socket, nobody listening, no permission, connection lost, no answer in time),
74 the output could not be written (or an input file read), 130 interrupted (Ctrl-C; tail
and top end with 0 that way).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import select
import signal
import stat
import sys
import time
from collections import deque
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import click

from emitterd import __version__, filters, framing
from emitterd.cli import render
from emitterd.client import (Client, EmitterError, EncodeError, FrameTooLarge,
                             Unreachable)

SUB_TYPES = ("stream", "event_type", "event_pattern", "event_payload", "tags")
STRATEGIES = ("pinned", "round_robin", "random")
PUBLISH_BATCH = 1000
PARKED_LIST, PARKED_MAX = 100, 100_000      # parked: the protocol's default limit, its maximum
# --file batches stay near this much JSON, so their frames keep well below the daemon's
# default max_frame_bytes (8 MiB); one that is still too large is split in two and sent again
BATCH_BYTES = 4 << 20

EXIT_OK, EXIT_DAEMON_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_IO = 74           # sysexits' EX_IOERR: writing the output (or reading a file) failed
EXIT_STOPPED = 130     # interrupted (Ctrl-C), or publish --file stopped with lines not sent


# ---- shared state ------------------------------------------------------------

class State:
    """What the group options give every command."""

    def __init__(self, socket_path: Optional[str], as_json: bool, timeout: float) -> None:
        self.socket_path = socket_path
        self.as_json = as_json
        self.timeout = timeout
        self._client: Optional[Client] = None

    def client(self) -> Client:
        if self._client is None:
            self._client = Client(self.socket_path, timeout=self.timeout)
        return self._client

    @property
    def resolved_socket(self) -> str:
        return self.client().socket_path

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def out(text: str = "") -> None:
    try:
        click.echo(text)
    except BrokenPipeError:
        # the reader is gone (`| head -1`): the rest of the output goes nowhere, and the
        # command ends with its own status (a stopped publish --file still says what it did
        # not send, and exits 130); click's main() would turn this EPIPE into exit 1
        _quiet_stdout()


def emit(st: State, result: Any, human: Any) -> None:
    """Print `result` as one JSON document with --json, else `human` (str or callable)."""
    if st.as_json:
        out(render.dumps(result))
    else:
        out(human() if callable(human) else human)


# ---- parameter parsing -------------------------------------------------------

def _not_json(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError("%s is too large for a float" % text[:40])
    return value


def _json_loads(text: str) -> Any:
    """json.loads for JSON only: Python's also takes NaN and Infinity, which no JSON parser
    downstream would (nor a number too large for a float, which it reads as infinity);
    and nesting too deep for it is a ValueError, not a crash."""
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def parse_json_param(value: Optional[str], param_hint: str) -> Any:
    if value is None:
        return None
    try:
        return _json_loads(value)
    except ValueError as e:
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise click.BadParameter("not valid JSON (%s): %r" % (e, shown), param_hint=param_hint) \
            from None


def parse_selector(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Any:
    """JSON when it starts with { or [ (bad JSON: usage error), else the string itself."""
    if value is None:
        return None
    if not value.startswith(("{", "[")):
        return value
    try:
        return parse_json_param(value, "--selector")
    except click.BadParameter as e:
        if not value.startswith("["):
            raise
        # PROTOCOL §6 reads "[x]-*" as JSON; an event_pattern has the map form left, a
        # stream or event_type nothing on the command line (--type may come later in argv)
        sub_type = ctx.params.get("sub_type")
        form = "--selector '{\"stream\": %s}'" % json.dumps(value)
        tags = "a tags selector is a JSON list of quoted strings: --selector '[\"vip\", \"gold\"]'"
        if sub_type == "event_pattern":
            hint = "as an event_pattern it can be given in the map form: " + form
        elif sub_type == "tags":
            hint = tags
        elif sub_type == "event_payload":
            hint = "an event_payload selector is a JSON map: --selector '{\"field\": value}'"
        elif sub_type is not None:
            hint = ("%s that starts with [ cannot be given on the command line (the Python "
                    "client takes it)" % filters.a_selector(sub_type))
        else:
            hint = ("%s; an event_pattern that starts with [ can be given in the map form: "
                    "%s; a stream or event_type selector cannot" % (tags, form))
        raise click.BadParameter("%s; %s" % (e.message, hint), param_hint="--selector") from None


def parse_options(ctx: click.Context, param: click.Parameter,
                  values: Sequence[str]) -> Dict[str, Any]:
    """--option KEY=VALUE ...: values parsed as JSON when valid JSON, else strings."""
    opts: Dict[str, Any] = {}
    for item in values or ():
        k, sep, v = item.partition("=")
        k = k.strip()
        if not sep or not k:
            raise click.BadParameter("expected KEY=VALUE, got %r" % item, ctx=ctx, param=param)
        try:
            opts[k] = _json_loads(v)
        except ValueError:
            opts[k] = v
    return opts


class Seconds(click.FloatRange):
    """A finite number of seconds within bounds (click's FloatRange takes inf and nan, which
    the clock cannot wait for)."""

    def __init__(self, low: float, high: float, low_open: bool = False) -> None:
        super().__init__(min=low, max=high, min_open=low_open)

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> Any:
        v = super().convert(value, param, ctx)
        if math.isnan(v):
            self.fail("%r is not a number of seconds" % (value,), param, ctx)
        return v


MAX_WAIT = 10_000_000.0          # seconds (115 days): more is a typo, or "forever"


class StartFrom(click.ParamType):
    """origin | now | a position (int)."""

    name = "origin|now|POS"

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> Any:
        if isinstance(value, int) or value in ("origin", "now"):
            return value
        # ASCII digits only: int() also takes "+7", "1_000", " 9" and other scripts' digits
        if isinstance(value, str) and value.isascii() and value.isdigit():
            return int(value)
        self.fail("%r is not origin, now or a position (digits)" % (value,), param, ctx)


class Subscriber(click.ParamType):
    """unix:/absolute/path.sock, or `none` (update only) for no subscriber."""

    name = "unix:PATH"

    def __init__(self, allow_none: bool) -> None:
        self.allow_none = allow_none

    def convert(self, value: Any, param: Optional[click.Parameter],
                ctx: Optional[click.Context]) -> Any:
        if value is None:
            return None
        if self.allow_none and value.lower() == "none":
            return None
        if not value.startswith("unix:"):
            self.fail("expected unix:/absolute/path.sock%s, got %r"
                      % (" or none" if self.allow_none else "", value), param, ctx)
        return value


def _no_value_given(ctx: click.Context, name: str) -> bool:
    src = ctx.get_parameter_source(name)
    return src is None or src == click.core.ParameterSource.DEFAULT


# ---- the group ---------------------------------------------------------------

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT, epilog="""\b
Examples:
  emitterctl ping
  emitterctl start mailer --type event_type --selector user.created \\
      --subscriber unix:/run/mailer.sock --pool-size 4 --option batch_size=100
  emitterctl start audit --type event_payload --selector '{"amount": {"$gt": 100}}'
  emitterctl list
  emitterctl status 3f2a9c0d5e6b7a81
  emitterctl update 3f2a9c0d5e6b7a81 --pool-size 8
  emitterctl publish --stream user-1 --type user.created --data '{"id": 1}'
  emitterctl publish --file events.jsonl
  emitterctl tail --type stream --selector '$all'
  emitterctl --json status 3f2a9c0d5e6b7a81 | jq .checkpoint
  emitterctl top

\b
Exit status: 0 success, 1 an error answered by the daemon (its code and
message on stderr), 2 usage error, 3 the daemon could not be reached,
74 the output could not be written, 130 interrupted by Ctrl-C (tail, top: 0).""")
@click.option("--socket", "socket_path", metavar="PATH", default=None,
              help="Control socket of the daemon. Default: $EMITTERD_SOCKET, else "
                   "$XDG_RUNTIME_DIR/emitterd/emitterd.sock, else /run/emitterd/emitterd.sock "
                   "(root) or /tmp/emitterd-<uid>/emitterd.sock.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON document on stdout (bytes as base64 strings; "
                   "tail: one JSON event per line).")
@click.option("--timeout", type=Seconds(0, MAX_WAIT, low_open=True), default=30.0,
              show_default=True, metavar="SECONDS", help="How long to wait for each answer.")
@click.version_option(__version__, "--version", prog_name="emitterctl")
@click.pass_context
def cli(ctx: click.Context, socket_path: Optional[str], as_json: bool, timeout: float) -> None:
    """Control a running emitterd: manage subscriptions (pools of emitter
    workers), publish events, and watch them being delivered.

    Group options (--socket, --json, --timeout) come before the command.
    KEY is the 16-hex-digit key of a subscription, as printed by `start` and `list`.
    """
    if socket_path is not None and not socket_path.strip():
        # `--socket "$UNSET"` must not fall back to another daemon's socket
        raise click.BadParameter("an empty path (an unset variable?)", param_hint="--socket")
    st = State(socket_path, as_json, timeout)
    ctx.obj = st
    ctx.call_on_close(st.close)


def state(ctx: click.Context) -> State:
    return ctx.find_object(State)


# ---- ping --------------------------------------------------------------------

@cli.command()
@click.pass_context
def ping(ctx: click.Context) -> None:
    """Check that the daemon answers; show its version, pid, store id, uptime
    and the head (last position) of the event log."""
    st = state(ctx)
    r = st.client().ping()
    emit(st, r, lambda: render.ping_block(r, st.resolved_socket))


# ---- start -------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  emitterctl start mailer --type event_type --selector user.created \\
      --subscriber unix:/run/mailer.sock --pool-size 4
  emitterctl start orders --type event_pattern --selector '{"stream": "order-*"}' \\
      --start-from origin --strategy round_robin --option batch_size=100
  emitterctl start vip --type tags --selector '["vip", "gold"]'""")
@click.argument("name")
@click.option("--type", "sub_type", required=True, type=click.Choice(SUB_TYPES),
              help="How the selector matches events.")
@click.option("--selector", required=True, callback=parse_selector, metavar="SEL",
              help="A string, or JSON when it starts with { or [ (a map or a list).")
@click.option("--subscriber", type=Subscriber(allow_none=False), default=None,
              help="Unix socket every worker connects to. Without it, consumers "
                   "attach (see `tail`).")
@click.option("--pool-size", type=int, default=None, metavar="N",
              help="Number of worker processes (1..64, daemon default 1).")
@click.option("--start-from", type=StartFrom(), default=None,
              help="First event to deliver: origin, now (default) or a position.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default=None,
              help="How events are spread over workers (sets options.strategy).")
@click.option("--option", "options", multiple=True, callback=parse_options,
              metavar="KEY=VALUE",
              help="A subscription option (repeatable); VALUE is JSON when it is valid JSON "
                   "(batch_size=5 is the integer 5), else a string.")
@click.pass_context
def start(ctx: click.Context, name: str, sub_type: str, selector: Any, subscriber: Optional[str],
          pool_size: Optional[int], start_from: Any, strategy: Optional[str],
          options: Dict[str, Any]) -> None:
    """Register subscription NAME and start its pool of workers.

    The same NAME, type and selector always give the same KEY. A stopped,
    backing-off or failed subscription starts again from its checkpoint, with
    the options given here and its stored settings for those left out.
    """
    st = state(ctx)
    sub: Dict[str, Any] = {"name": name, "type": sub_type, "selector": selector}
    if subscriber is not None:
        sub["subscriber"] = subscriber
    if pool_size is not None:
        sub["pool_size"] = pool_size
    if start_from is not None:
        sub["start_from"] = start_from
    opts = dict(options)
    if strategy is not None:
        opts["strategy"] = strategy
    if opts:
        sub["options"] = opts
    r = st.client().start(sub)
    emit(st, r, lambda: "started %s\n\n%s" % (r.get("key"), render.pool_block(r)))


# ---- stop --------------------------------------------------------------------

@cli.command()
@click.argument("key")
@click.option("--delete", is_flag=True, help="Also forget the subscription and its checkpoint.")
@click.option("--drain-timeout", type=Seconds(0, MAX_WAIT), default=None, metavar="S",
              help="Seconds to wait for in-flight events to be acked (daemon default 10). "
                   "The stop's answer is awaited this long plus 30 s, --timeout or not.")
@click.pass_context
def stop(ctx: click.Context, key: str, delete: bool, drain_timeout: Optional[float]) -> None:
    """Stop the pool of KEY: wait for in-flight acks, save the checkpoint,
    stop every worker. Stopping a stopped pool is fine."""
    st = state(ctx)
    r = st.client().stop(key, delete=delete, drain_timeout=drain_timeout)

    def human() -> str:
        text = "%s %s (checkpoint %s of %s)" % (
            "stopped and deleted" if delete else "stopped", r.get("key", key),
            render.num(r.get("checkpoint")), render.num(r.get("head")))
        unacked = r.get("in_flight")
        if isinstance(unacked, int) and unacked > 0:
            text += ("\n%s %s not acked (the drain timed out, or no consumer was "
                     "connected to take them); %s" % (
                render.events(unacked), "was" if unacked == 1 else "were", "they are gone with the subscription" if delete else
                "they are delivered again when the pool starts"))
        return text
    emit(st, r, human)


# ---- update ------------------------------------------------------------------

@cli.command(epilog="""\b
Examples:
  emitterctl update 3f2a9c0d5e6b7a81 --pool-size 8
  emitterctl update 3f2a9c0d5e6b7a81 --subscriber none
  emitterctl update 3f2a9c0d5e6b7a81 --option max_retries=3 --option ack_timeout=5.5
  emitterctl update 3f2a9c0d5e6b7a81 --checkpoint 0     # deliver everything again""")
@click.argument("key")
@click.option("--pool-size", type=int, default=None, metavar="N", help="New number of workers.")
@click.option("--subscriber", type=Subscriber(allow_none=True), default=None,
              metavar="unix:PATH|none", help="New subscriber socket, or none for attached "
                                             "consumers.")
@click.option("--option", "options", multiple=True, callback=parse_options, metavar="KEY=VALUE",
              help="Change one option (repeatable); VALUE is JSON when valid JSON, else a string.")
@click.option("--checkpoint", type=int, default=None, metavar="POS",
              help="Move the cursor: events after POS are delivered (again), up to POS are not.")
@click.pass_context
def update(ctx: click.Context, key: str, pool_size: Optional[int], subscriber: Optional[str],
           options: Dict[str, Any], checkpoint: Optional[int]) -> None:
    """Change a pool live (or a stopped pool's stored settings): workers that
    stay keep their pids and nothing in flight is lost."""
    st = state(ctx)
    fields: Dict[str, Any] = {}
    if pool_size is not None:
        fields["pool_size"] = pool_size
    if not _no_value_given(ctx, "subscriber"):
        fields["subscriber"] = subscriber      # None (from "none") clears it
    if options:
        fields["options"] = options
    if checkpoint is not None:
        fields["checkpoint"] = checkpoint
    if not fields:
        raise click.UsageError("nothing to update: give --pool-size, --subscriber, --option "
                               "or --checkpoint", ctx=ctx)
    r = st.client().update(key, **fields)
    emit(st, r, lambda: "updated %s\n\n%s" % (r.get("key", key), render.pool_block(r)))


# ---- list / status -----------------------------------------------------------

@cli.command("list")
@click.pass_context
def list_(ctx: click.Context) -> None:
    """List every subscription with its state, workers, checkpoint and counters."""
    st = state(ctx)
    r = st.client().list()
    emit(st, r, lambda: render.pools_table(r.get("subscriptions") or []))


@cli.command()
@click.argument("key")
@click.pass_context
def status(ctx: click.Context, key: str) -> None:
    """Show one subscription: settings, checkpoint, counters, and a table of
    its workers (pid, state, memory, CPU, in flight, delivered, consumers)."""
    st = state(ctx)
    r = st.client().status(key)
    emit(st, r, lambda: render.pool_block(r))


# ---- publish -----------------------------------------------------------------

_BOM = b"\xef\xbb\xbf"


def _event_of(lineno: int, text: str) -> Dict[str, Any]:
    """The event on one (non-blank) line; BadParameter naming the line otherwise."""
    try:
        obj = _json_loads(text)
    except ValueError as e:
        raise click.BadParameter("line %d: not valid JSON (%s)" % (lineno, e),
                                 param_hint="--file") from None
    if not isinstance(obj, dict):
        raise click.BadParameter("line %d: an event must be a JSON object" % lineno,
                                 param_hint="--file")
    try:
        # as the publish request carries it: three levels down ({"args": {"events": [obj]}}),
        # which counts against msgpack's nesting limit too
        framing.pack({"args": {"events": [obj]}})
    except (TypeError, OverflowError, ValueError, RecursionError) as e:
        raise click.BadParameter("line %d: cannot be sent (%s)" % (lineno, e),
                                 param_hint="--file") from None
    return obj


def _read_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any], bool, int]]:
    """(line number, event, more, bytes) for each non-blank line; BadParameter on bad lines.
    `more` is false where the input has nothing more to give right now: standard input
    is read as it comes (a generator may write a line a minute, or never end), and what
    has arrived is published then instead of waiting for a full batch."""
    if path == "-":
        if sys.stdin is None:
            raise click.BadParameter("standard input is closed", param_hint="--file")
        lines: Iterator[Tuple[int, bytes, bool]] = _stream_lines(sys.stdin.fileno())
    elif _is_stream(path):
        lines = _fifo_lines(path)
    else:
        lines = _file_lines(path)
    for lineno, raw, more in lines:
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]       # a UTF-8 byte order mark, as some editors write
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise click.BadParameter("line %d: not UTF-8 text (%s)" % (lineno, e),
                                     param_hint="--file") from None
        if text:
            yield lineno, _event_of(lineno, text), more, len(raw)


def _file_lines(path: str) -> Iterator[Tuple[int, bytes, bool]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw, True


def _is_stream(path: str) -> bool:
    """Standard input, or a path that is not a regular file (a FIFO, /dev/stdin): read once,
    as it comes, never checked in a first pass."""
    try:
        return path == "-" or not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False            # open() then says what is wrong with it


def _fifo_lines(path: str) -> Iterator[Tuple[int, bytes, bool]]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield from _stream_lines(fd)
    finally:
        os.close(fd)


def _stream_lines(fd: int) -> Iterator[Tuple[int, bytes, bool]]:
    """The lines of a pipe or terminal as they arrive, each with whether another complete
    line is already there to read."""
    part: List[bytes] = []      # the line being read, as it came: joined once, when it ends
    lineno = 0
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            if part:
                yield lineno + 1, b"".join(part), False
            return
        if b"\n" not in data:
            part.append(data)   # the middle of a long line (no rescan of what came before)
            continue
        lines = data.split(b"\n")
        if part:
            part.append(lines[0])
            lines[0] = b"".join(part)
        rest = lines.pop()
        part = [rest] if rest else []
        waiting = bool(select.select([fd], [], [], 0)[0])
        last = len(lines) - 1
        for i, raw in enumerate(lines):
            lineno += 1
            yield lineno, raw, waiting or i < last


def _batches(items: Iterator[Tuple[int, Dict[str, Any], bool, int]], size: int,
             max_bytes: int = BATCH_BYTES) -> Iterator[List[Tuple[int, Dict[str, Any]]]]:
    """Batches of up to `size` events and about `max_bytes` of input; one ends early where
    the input pauses."""
    batch: List[Tuple[int, Dict[str, Any]]] = []
    nbytes = 0
    for lineno, event, more, n in items:
        if batch and nbytes + n > max_bytes:
            yield batch
            batch, nbytes = [], 0
        batch.append((lineno, event))
        nbytes += n
        if len(batch) >= size or not more:
            yield batch
            batch, nbytes = [], 0
    if batch:
        yield batch


def _maybe_stored(what: str, retry: str) -> None:
    """After a publish sent but not answered (the daemon may have stored it before the
    connection went): say so, and what publishing it again would do."""
    click.echo("%s may or may not have been stored: %s" % (what, retry), err=True)


def _where(e: EmitterError, batch: list, path: str) -> str:
    """The file line (and field) an error's details.field points at, if any."""
    field = e.details.get("field") if isinstance(e.details, dict) else None
    if isinstance(field, str) and field.startswith("events."):
        idx, _, rest = field[len("events."):].partition(".")
        if idx.isdigit() and int(idx) < len(batch):
            return " (line %d of %s%s)" % (batch[int(idx)][0], path,
                                           ", field " + rest if rest else "")
    return ""


class _Stopped(Exception):
    """SIGINT or SIGTERM during `publish --file`, at a point where no publish is unanswered."""


class _StopBetweenPublishes:
    """SIGINT / SIGTERM handlers for `publish --file`: a signal that arrives while a publish
    is unanswered is held until its answer is in (so its outcome is known), one that arrives
    while input is read stops at once (all that was read and answered is counted)."""

    def __init__(self) -> None:
        self.busy = False
        self.pending = False
        self._old: Dict[int, Any] = {}

    def __enter__(self) -> "_StopBetweenPublishes":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.busy:
            self.pending = True
        else:
            raise _Stopped()

    def publish(self, client: Client, events: List[Dict[str, Any]]) -> Dict[str, Any]:
        """client.publish() with a signal held until the answer is in; the caller counts
        the answer, then calls stop_if_asked()."""
        self.busy = True
        try:
            return client.publish(events)
        finally:
            self.busy = False

    def stop_if_asked(self) -> None:
        if self.pending:
            self.pending = False
            raise _Stopped()


def _publish_file(ctx: click.Context, st: State, path: str, batch_size: int) -> None:
    total: Optional[int] = None
    source = "standard input" if path == "-" else path
    if not _is_stream(path):
        # first pass: validate every line before anything is published, and count
        try:
            with _StopBetweenPublishes():
                total = sum(1 for _ in _read_jsonl(path))
        except _Stopped:
            click.echo("stopped by a signal while checking %s: nothing was published"
                       % source, err=True)
            ctx.exit(EXIT_STOPPED)
    client = st.client().connect()      # a failure here is plain: nothing was sent
    published = 0
    low: Optional[int] = None
    high: Optional[int] = None
    queue: deque = deque()              # batches (or halves of one) read and not yet sent
    sending: List[Tuple[int, Dict[str, Any]]] = []    # the request in flight
    last_line = 0                                     # of the last event answered
    # no bar with --json: stdout is for the one JSON document, even on a terminal
    show_bar = sys.stdout.isatty() and not st.as_json and total is not None and total > 0
    bar_cm = click.progressbar(length=total, label="publishing", file=sys.stdout,
                               show_pos=True) if show_bar else None
    bar = bar_cm.__enter__() if bar_cm is not None else None
    batches = _batches(_read_jsonl(path), batch_size)
    stopped = False
    try:
        with _StopBetweenPublishes() as guard:
            while True:
                if not queue:
                    try:
                        queue.append(next(batches))
                    except StopIteration:
                        break
                    except click.BadParameter as e:
                        if published:   # only from a stream: a file is checked first
                            e.message += " (%s published before it)" % render.events(published)
                        raise
                sending = queue.popleft()
                try:
                    r = guard.publish(client, [e for _, e in sending])
                except FrameTooLarge:
                    # refused whole (nothing of it stored): send it again in halves
                    if len(sending) == 1:
                        raise
                    half = len(sending) // 2
                    queue.extendleft((sending[half:], sending[:half]))
                    continue
                last_line = sending[-1][0]
                positions = r.get("positions") or []
                if positions:
                    low = min(positions + ([] if low is None else [low]))
                    high = max(positions + ([] if high is None else [high]))
                published += len(sending)
                if bar is not None:
                    bar.update(len(sending))
                guard.stop_if_asked()
    except _Stopped:
        stopped = True
    except (EmitterError, Unreachable, TimeoutError) as e:
        if bar_cm is not None:
            bar_cm.__exit__(None, None, None)
            bar_cm = None
        _report_failed_batch(ctx, e, sending, published, path, source)
    finally:
        if bar_cm is not None:
            bar_cm.__exit__(None, None, None)
    result = {"published": published, "first": low, "last": high}
    emit(st, result, lambda: "published %s%s" % (
        render.events(published), "" if low is None else " (positions %d..%d)" % (low, high)))
    if stopped and (queue or (total is not None and published < total)):
        # lines read (or, in a file, left) and not sent; a stream stopped between its
        # publishes has none: everything it gave was published
        click.echo("stopped by a signal: the lines of %s after line %d were not sent"
                   % (source, last_line), err=True)
        ctx.exit(EXIT_STOPPED)


def _report_failed_batch(ctx: click.Context, e: Exception, batch: list, published: int,
                         path: str, source: str) -> None:
    """publish --file: say why `batch` failed and what of it may be stored; exit."""
    if isinstance(e, EmitterError):
        at = _where(e, batch, source)
        if isinstance(e, FrameTooLarge) and len(batch) == 1:
            at = " (line %d of %s)" % (batch[0][0], source)
        click.echo("error: %s: %s%s%s" % (e.code, e.message, _details_suffix(e), at), err=True)
    else:
        click.echo("error: daemon unreachable: %s" % e, err=True)
    click.echo("%s published before this batch" % render.events(published), err=True)
    if isinstance(e, EmitterError):
        if e.code == "invalid" and isinstance(e.details, dict) and \
                e.details.get("field") == "events" and len(batch) > 1:
            # the daemon's max_publish_events is below --batch-size
            click.echo("hint: the daemon takes fewer events per publish: give a smaller "
                       "--batch-size", err=True)
        ctx.exit(EXIT_DAEMON_ERROR)
    if all(ev.get("id") is not None for _, ev in batch):
        retry = "its events all have ids, so publishing them again stores each once"
    else:
        retry = ("publishing them again may store some twice (an event with an "
                 "\"id\" would be stored once)")
    _maybe_stored("this batch (lines %d..%d of %s)" % (batch[0][0], batch[-1][0], source), retry)
    ctx.exit(EXIT_UNREACHABLE)


@cli.command(epilog="""\b
Examples:
  emitterctl publish --stream user-1 --type user.created --data '{"id": 1}' --tag vip
  emitterctl publish --file events.jsonl
  generate-events | emitterctl publish --file -

\b
A line of EVENTS.jsonl is one event object:
  {"stream": "user-1", "type": "user.created", "data": {"id": 1}, "tags": ["vip"]}""")
@click.option("--stream", default=None, metavar="S", help="Stream of the event.")
@click.option("--type", "event_type", default=None, metavar="T", help="Type of the event.")
@click.option("--data", default=None, metavar="JSON", help="Payload, as JSON (default null).")
@click.option("--metadata", default=None, metavar="JSON", help="Metadata, a JSON object.")
@click.option("--tag", "tags", multiple=True, metavar="TAG", help="A tag (repeatable).")
@click.option("--id", "event_id", default=None, metavar="ID",
              help="Event id (idempotent publish: an id already in the log is not appended again).")
@click.option("--expected-version", type=int, default=None, metavar="N",
              help="Fail with conflict unless the stream's last version is N (-1: must not exist).")
@click.option("--file", "file_path", type=click.Path(exists=True, dir_okay=False, allow_dash=True),
              default=None, metavar="EVENTS.jsonl",
              help="Publish every event of a JSON-lines file (- for stdin, read as it "
                   "comes), in batches.")
@click.option("--batch-size", type=click.IntRange(1, 10000), default=PUBLISH_BATCH,
              show_default=True, help="Events per publish request with --file.")
@click.pass_context
def publish(ctx: click.Context, stream: Optional[str], event_type: Optional[str],
            data: Optional[str], metadata: Optional[str], tags: Tuple[str, ...],
            event_id: Optional[str], expected_version: Optional[int], file_path: Optional[str],
            batch_size: int) -> None:
    """Append one event (--stream and --type), or every event of a file (--file).

    The answer comes once the events are durable. With --json a single
    event prints {"positions": [...], "versions": [...]} and --file prints
    {"published": n, "first": pos, "last": pos}: the events answered (those
    whose id was already in the log included) and the lowest and highest
    position among them.

    A regular file is checked line by line for JSON objects before anything
    is sent (a progress bar is shown on a terminal). An event the daemon
    refuses (invalid, conflict) stops the run at its batch: the batches
    before it stay published, and the message names the line and how many
    events went before. Standard input (and a pipe or FIFO) is published as
    it comes: a batch goes out once it has --batch-size events or the input
    pauses, so a generator that writes a line a minute, or never ends, is
    published line by line. SIGINT or SIGTERM ends it after the publish in
    flight is answered: exit 0 with the summary when every line read was
    published, else 130 naming the last line published.
    """
    st = state(ctx)
    if file_path is not None:
        single = [n for n, v in (("--stream", stream), ("--type", event_type), ("--data", data),
                                 ("--metadata", metadata), ("--id", event_id),
                                 ("--expected-version", expected_version)) if v is not None]
        if tags:
            single.append("--tag")
        if single:
            raise click.UsageError("--file cannot be combined with %s" % ", ".join(single), ctx=ctx)
        _publish_file(ctx, st, file_path, batch_size)
        return
    if stream is None or event_type is None:
        raise click.UsageError("give --stream and --type (or --file)", ctx=ctx)
    event: Dict[str, Any] = {"stream": stream, "type": event_type}
    if data is not None:
        event["data"] = parse_json_param(data, "--data")
    if metadata is not None:
        event["metadata"] = parse_json_param(metadata, "--metadata")
    if tags:
        event["tags"] = list(tags)
    if event_id is not None:
        event["id"] = event_id
    client = st.client().connect()      # a failure here is plain: nothing was sent
    retry = ("it has an id, so publishing it again stores it once" if event_id is not None
             else "publishing it again may store it twice (with an --id it would not)")
    try:
        r = client.publish([event], expected_version=expected_version)
    except (Unreachable, TimeoutError) as e:
        click.echo("error: daemon unreachable: %s" % e, err=True)
        _maybe_stored("the event", retry)
        ctx.exit(EXIT_UNREACHABLE)
    except KeyboardInterrupt:
        click.echo("\nerror: interrupted before the daemon answered", err=True)
        _maybe_stored("the event", retry)
        ctx.exit(EXIT_STOPPED)

    def human() -> str:
        pos = (r.get("positions") or [None])[0]
        ver = (r.get("versions") or [None])[0]
        return "published at position %s (stream %s, version %s)" % (
            render.num(pos), stream, render.num(ver))
    emit(st, r, human)


# ---- tail --------------------------------------------------------------------

class _Terminated(Exception):
    pass


_terminated: list = []      # set by the SIGTERM handler
TAIL_POLL = 0.5


def _raise_terminated(signum: int, frame: Any) -> None:
    _terminated.append(signum)
    raise _Terminated()


@cli.command(epilog="""\b
Examples:
  emitterctl tail 3f2a9c0d5e6b7a81
  emitterctl tail --type stream --selector '$all'
  emitterctl --json tail --type event_type --selector order.paid | jq .data""")
@click.argument("key", required=False)
@click.option("--type", "sub_type", type=click.Choice(SUB_TYPES), default=None,
              help="With --selector: tail a new ephemeral subscription instead of KEY.")
@click.option("--selector", callback=parse_selector, default=None, metavar="SEL",
              help="Selector of the ephemeral subscription (JSON when it starts with { or [).")
@click.option("--start-from", type=StartFrom(), default="now", show_default=True,
              help="Ephemeral subscription only: origin, now or a position.")
@click.pass_context
def tail(ctx: click.Context, key: Optional[str], sub_type: Optional[str], selector: Any,
         start_from: Any) -> None:
    """Attach to KEY (a subscription without subscriber) and print events as
    they arrive, acking each batch once printed. Ctrl-C stops (exit 0), and so
    does the reader of a pipe going away (`tail KEY | head -5`). Printed means
    written to stdout: lines a reader leaves unread in the pipe count as
    delivered: a program that must see every event attaches with the client
    library (Client.attach) and acks what it has handled.

    With --type and --selector instead of KEY, a new ephemeral subscription
    named tail-<random> is started; the daemon deletes it when tail exits.
    Lines are `position stream type data` (control characters escaped); with
    --json one JSON event per line.

    When the worker serving tail exits (killed, recycled, retired by a
    resize) while the pool runs on, tail attaches again and goes on; its
    unacked events come again. It gives up when its worker exits within 5 s
    of attaching four times in a row.

    Exit status: 0 stopped by Ctrl-C, SIGTERM or the reader going away; 1 the
    pool was stopped or deleted by another client (or kept losing its
    worker); 3 the daemon went away or is shutting down.
    """
    st = state(ctx)
    if key is not None and (sub_type is not None or selector is not None):
        raise click.UsageError("give either KEY or --type and --selector, not both", ctx=ctx)
    if key is None and (sub_type is None or selector is None):
        raise click.UsageError("give KEY, or --type and --selector", ctx=ctx)
    if key is not None and not _no_value_given(ctx, "start_from"):
        raise click.UsageError("--start-from needs --type and --selector", ctx=ctx)

    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    consumer = None
    try:
        client = st.client()
        if key is None:
            sub = {"name": "tail-" + secrets.token_hex(4), "type": sub_type, "selector": selector,
                   "options": {"ephemeral": True}, "start_from": start_from}
            key = client.start(sub)["key"]
        quick_ends = 0
        while True:
            # the daemon holds the attach until the new pool's first worker is ready
            consumer = client.attach(key)
            attached_at = time.monotonic()
            client.close()
            if not st.as_json:
                click.echo("tailing %s (worker %s); Ctrl-C to stop"
                           % (consumer.key, consumer.worker), err=True)
            # the SIGTERM handler raises _Terminated; should that land where it is swallowed
            # (in a __del__, say) the flag it sets still ends the loop within TAIL_POLL seconds
            while not _terminated and not consumer.closed and not _reader_gone():
                for batch in consumer.batches(timeout=TAIL_POLL):
                    lines = [render.compact(e) if st.as_json else render.event_line(e)
                             for e in batch]
                    sys.stdout.write("\n".join(lines) + "\n")
                    sys.stdout.flush()
                    consumer.ack([e["position"] for e in batch
                                  if isinstance(e.get("position"), int)])
                    if _terminated:
                        break
            if not consumer.closed_by_peer:
                break
            code, why, worker_gone = _why_tail_ended(st, key)
            quick_ends = quick_ends + 1 if time.monotonic() - attached_at < 5.0 else 1
            if worker_gone and quick_ends <= 3:
                # the pool runs on (an ephemeral one waits for us): attach again
                click.echo("tail: %s; attaching again" % why, err=True)
                continue
            click.echo("error: %s" % why, err=True)
            ctx.exit(code)
    except (KeyboardInterrupt, _Terminated):
        pass
    except BrokenPipeError:
        _quiet_stdout()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        if consumer is not None:
            consumer.close()


def _why_tail_ended(st: Any, key: str) -> Tuple[int, str, bool]:
    """The daemon closed tail's consumer connection: asked again, it says whether the pool
    stopped (exit 1, the daemon answered) or the daemon went away (exit 3); the last field
    is True when only the worker serving tail went and the pool runs on."""
    try:
        with Client(st.socket_path, timeout=5.0) as c:
            pool = c.status(key)
            # a stop closes the consumers before the daemon has reaped the workers
            deadline = time.monotonic() + 2.0
            while pool.get("state") == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
                pool = c.status(key)
            # a daemon draining its pools to exit still answers, and says "stopped": that
            # is the daemon going away, not another client's stop
            shutting_down = pool.get("state") != "running" and c.ping().get("shutting_down")
    except Unreachable:
        return EXIT_UNREACHABLE, "the daemon closed the connection and no longer answers", False
    except EmitterError as e:
        if e.code == "not_found":
            return EXIT_DAEMON_ERROR, "subscription %s was deleted" % key, False
        return EXIT_DAEMON_ERROR, "the daemon closed the connection (status: %s)" % e, False
    except TimeoutError:
        return EXIT_UNREACHABLE, "the daemon closed the connection and does not answer", False
    if shutting_down:
        return EXIT_UNREACHABLE, "the daemon is shutting down", False
    if pool.get("state") != "running":
        return EXIT_DAEMON_ERROR, "the pool of %s is %s" % (key, pool.get("state")), False
    return EXIT_DAEMON_ERROR, ("the daemon closed the connection (the worker serving it "
                               "exited); the pool of %s is running" % key), True


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has exited (`tail KEY | head -3`): with no
    event to write there is no EPIPE to end tail, so ask poll(), as coreutils' tail -f
    does (a pipe's write end reports POLLERR once its read end is closed)."""
    try:
        p = select.poll()
        p.register(sys.stdout.fileno(), 0)      # errors and hang-ups are reported anyway
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in p.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_stdout() -> None:
    """After EPIPE on stdout: point it at /dev/null so the exit flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:
        pass


# ---- parked ------------------------------------------------------------------

@cli.command()
@click.argument("key")
@click.option("--replay", is_flag=True, help="Deliver the parked events again (attempt 1).")
@click.option("--purge", is_flag=True, help="Forget the parked events.")
@click.option("--limit", type=click.IntRange(1, PARKED_MAX), default=None,
              help="Most events to list (default 100), or to replay or purge (default: all, "
                   "up to %s), the oldest first." % format(PARKED_MAX, ","))
@click.pass_context
def parked(ctx: click.Context, key: str, replay: bool, purge: bool,
           limit: Optional[int]) -> None:
    """List the events of KEY parked after too many retries (or a nack park),
    or --replay them, or --purge them."""
    st = state(ctx)
    if replay and purge:
        raise click.UsageError("--replay and --purge are exclusive", ctx=ctx)
    action = "replay" if replay else "purge" if purge else "list"
    if limit is None:
        # the protocol's default (100) suits a listing; `--purge` means all of them
        limit = PARKED_LIST if action == "list" else PARKED_MAX
    r = st.client().parked(key, action=action, limit=limit)
    if action == "list":
        def human() -> str:
            rows = r.get("events") or []
            text = render.parked_table(rows)
            total = st.client().status(key).get("parked")
            if isinstance(total, int) and total > len(rows):
                why = ("--limit N for more" if len(rows) >= limit else
                       "no more fit in one answer of max_frame_bytes; --purge or --replay "
                       "some to see the rest")
                text += "\n(%s of %s parked events shown, the oldest; %s)" % (
                    render.num(len(rows)), render.num(total), why)
            return text
        emit(st, r, human)
    else:
        emit(st, r, lambda: "%s %s events" % ("replayed" if replay else "purged",
                                               render.num(r.get("count"))))


# ---- top ---------------------------------------------------------------------

def _top_sample(client: Client) -> Tuple[float, Dict[str, Any], List[Dict[str, Any]]]:
    ping_r, list_r = client.pipeline([("ping", None), ("list", None)])
    for r in (ping_r, list_r):
        if isinstance(r, EmitterError):
            raise r
    return time.monotonic(), ping_r, list_r.get("subscriptions") or []


def _per_s(now: int, before: Optional[int], dt: Optional[float]) -> Optional[float]:
    if before is None or dt is None or dt <= 0 or not isinstance(now, int):
        return None
    return max(0.0, (now - before) / dt)


def top_frame(prev: Optional[Tuple[float, Dict[Any, int]]], t: float, ping_r: Dict[str, Any],
              pools: List[Dict[str, Any]]) -> Tuple[Dict[str, Any], Tuple[float, Dict[Any, int]]]:
    """Build one `top` frame (rates against the previous sample) and the next `prev`."""
    dt = t - prev[0] if prev else None
    before = prev[1] if prev else {}
    counters: Dict[Any, int] = {}
    rows = []
    for p in pools:
        key = p.get("key")
        sub = p.get("subscription") or {}
        head, cp = p.get("head"), p.get("checkpoint")
        delivered = p.get("delivered") or 0
        counters[key] = delivered
        wrows = []
        for w in p.get("workers") or []:
            wk = (key, w.get("index"), w.get("pid"))
            wd = w.get("delivered") or 0
            counters[wk] = wd
            wrows.append({"index": w.get("index"), "pid": w.get("pid"), "state": w.get("state"),
                          "rss": w.get("rss"), "cpu_percent": w.get("cpu_percent"),
                          "in_flight": w.get("in_flight"), "delivered": wd,
                          "delivered_per_s": _per_s(wd, before.get(wk), dt),
                          "restarts": w.get("restarts"), "consumers": w.get("consumers")})
        ready = sum(1 for w in p.get("workers") or [] if w.get("state") == "ready")
        rows.append({
            "key": key, "name": sub.get("name"), "state": p.get("state"),
            "pool_size": sub.get("pool_size"), "workers_ready": ready,
            "workers": "%d/%s" % (ready, render.num(sub.get("pool_size"))),
            "head": head, "checkpoint": cp,
            "lag": head - cp if isinstance(head, int) and isinstance(cp, int) else None,
            "delivered": delivered, "delivered_per_s": _per_s(delivered, before.get(key), dt),
            "in_flight": p.get("in_flight"), "parked": p.get("parked"),
            "restarts": p.get("restarts"), "worker_rows": wrows,
        })
    frame = {"time": time.time(), "interval": dt, "daemon": ping_r, "pools": rows}
    return frame, (t, counters)


@cli.command()
@click.option("--interval", type=Seconds(0.1, 86400.0), default=2.0, show_default=True,
              metavar="S", help="Seconds between refreshes.")
@click.option("--once", is_flag=True, help="Print one frame and exit (rates show as -).")
@click.pass_context
def top(ctx: click.Context, interval: float, once: bool) -> None:
    """A live view of pools and workers, refreshed every --interval seconds:
    delivered/s (between refreshes), lag (head - checkpoint), in flight,
    RSS, CPU% and restarts. Ctrl-C exits. With --json, one JSON document
    per frame, one per line (with --once, one indented document, as the other
    commands print)."""
    st = state(ctx)
    client = st.client()
    tty = sys.stdout.isatty()
    prev = None
    old_term = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        first = True
        while True:
            t, ping_r, pools = _top_sample(client)
            frame, prev = top_frame(prev, t, ping_r, pools)
            if st.as_json:
                text = render.dumps(frame, indent=None if not once else 2)
            else:
                text = render.top_frame(frame)
                if tty and not once:
                    text = "\x1b[H\x1b[2J" + text
                elif not first:
                    text = "\n" + text
            click.echo(text)
            sys.stdout.flush()
            first = False
            if once:
                return
            time.sleep(interval)
    except (KeyboardInterrupt, _Terminated):
        pass
    except BrokenPipeError:
        _quiet_stdout()
    finally:
        signal.signal(signal.SIGTERM, old_term)


# ---- entry point -------------------------------------------------------------

def _details_suffix(e: EmitterError) -> str:
    d = e.details
    if d is None:
        return ""
    if isinstance(d, dict) and set(d) == {"field"}:
        return " (field %s)" % d["field"]
    if isinstance(d, dict) and set(d) == {"key"}:
        return " (key %s)" % d["key"]
    return " (details %s)" % render.compact(d)


def _not_utf8_argument(args: List[str]) -> Optional[str]:
    """The first argument holding bytes that are not UTF-8 (Python gives them to us as lone
    surrogates), named by its option, or None."""
    for i, a in enumerate(args):
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            if a.startswith("--") and "=" in a:
                where, _, a = a.partition("=")
                where = "the value of " + where
            elif i and args[i - 1].startswith("-"):
                where = "the value of %s" % args[i - 1]
            else:
                where = "argument %d" % (i + 1)
            return "%s is not UTF-8 text: %s" % (
                where, a.encode("utf-8", "surrogateescape").decode("ascii", "backslashreplace"))
    return None


def main(argv: Optional[List[str]] = None) -> None:
    """Run emitterctl; never returns (exits with the §6 status)."""
    if sys.stdout is None:
        # started with stdout closed (`>&-`): Python gives None; the output is discarded,
        # as a shell's `> /dev/null` would (every use below expects a file)
        sys.stdout = open(os.devnull, "w")
    # the daemon takes values nested up to 1,024 deep (framing); rendering one as JSON takes
    # two Python frames a level, and json.dumps counts its own against the same limit
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * 1024 + 500))
    try:
        # not standalone: click would turn Ctrl-C into "Aborted!" and exit 1, which §6
        # keeps for an error the daemon answered
        code = cli.main(args=argv, prog_name="emitterctl", standalone_mode=False)
        sys.stdout.flush()     # here, where a failed write is reported (not at exit)
        sys.exit(code if isinstance(code, int) else EXIT_OK)   # ctx.exit(n) returns n
    except click.Abort:
        # Ctrl-C (click has ended the ^C line); a command with a request in flight has
        # said what may have happened to it
        click.echo("error: interrupted (a request already sent may still take effect: "
                   "see emitterctl status or list)", err=True)
        sys.exit(EXIT_STOPPED)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except EmitterError as e:
        click.echo("error: %s: %s%s" % (e.code, e.message, _details_suffix(e)), err=True)
        sys.exit(EXIT_DAEMON_ERROR)
    except (Unreachable, TimeoutError) as e:
        click.echo("error: daemon unreachable: %s" % e, err=True)
        sys.exit(EXIT_UNREACHABLE)
    except EncodeError as e:
        # an argument msgpack has no form for (an integer past 64 bits, text that is not
        # Unicode): nothing was sent, so it is the command line's fault
        click.echo("error: %s" % (_not_utf8_argument(sys.argv[1:] if argv is None else argv)
                                  or e), err=True)
        sys.exit(EXIT_USAGE)
    except BrokenPipeError:
        _quiet_stdout()
        sys.exit(EXIT_OK)
    except OSError as e:
        # a local file or stdout failed (a full disk under `> out.json`): no traceback, and
        # not 1, which says the daemon refused (a publish may well have been stored)
        _quiet_stdout()
        if e.filename is not None:
            click.echo("error: %s: %s" % (e.filename, e.strerror or e), err=True)
        else:
            click.echo("error: cannot write the output: %s" % (e.strerror or e), err=True)
        sys.exit(EXIT_IO)


if __name__ == "__main__":
    main()
