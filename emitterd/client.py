"""Python client library for emitterd (PROTOCOL.md §1-§3).

* :class:`Client` talks to the control socket: one request at a time with
  :meth:`Client.request` (or the per-op helpers), or many at once with
  :meth:`Client.pipeline`.
* :class:`Consumer` is an attached consumer connection (``attach``, §3): it
  yields ``events`` frames and sends ``ack`` / ``nack`` frames.
* :func:`serve_subscriber` runs the other side of a ``subscriber:
  "unix:/path"`` subscription: a small single-threaded server that hands every
  delivered event to a handler and acks or nacks it.

Errors answered by the daemon are raised as :class:`EmitterError`
subclasses (one per error code, see :data:`ERROR_CLASSES`); a daemon that
cannot be reached raises :class:`Unreachable`; a deadline that passes raises
:class:`TimeoutError`. A :class:`Client` is not thread-safe: use one per thread.

Example::

    from emitterd.client import Client

    with Client() as c:                       # default socket (paths.default_socket_path)
        pool = c.start({"name": "mailer", "type": "event_type",
                        "selector": "user.created", "start_from": "origin"})
        c.publish([{"stream": "user-1", "type": "user.created", "data": {"id": 1}}])
        with c.attach(pool["key"]) as consumer:
            for batch in consumer.batches(timeout=5):
                consumer.ack([e["position"] for e in batch])
"""
from __future__ import annotations

import errno
import os
import selectors
import socket
import stat
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union

from emitterd import errors as codes
from emitterd import paths
from emitterd.framing import Decoder, FrameError, encode

__all__ = [
    "EmitterError", "NotFound", "Invalid", "AlreadyStarted", "Conflict", "Unavailable",
    "PermissionDenied", "UnknownOp", "BadFrame", "FrameTooLarge", "Internal",
    "ProtocolViolation", "ERROR_CLASSES", "error_from_wire", "Unreachable",
    "EncodeError", "Client", "Consumer", "serve_subscriber",
]

#: Responses from the daemon are not limited by the client: the daemon's own
#: max_frame_bytes may be configured above the 8 MiB default.
_CLIENT_MAX_FRAME = 0xFFFFFFFF
_RECV_SIZE = 1 << 18
_ANSWER_EVERY = 0.1      # serve_subscriber: a slow handler's verdicts go out this often

Key = Union[str, Dict[str, Any]]


# ---- errors ------------------------------------------------------------------

class EmitterError(Exception):
    """An error answered by the daemon: ``.code``, ``.message``, ``.details``.

    ``.request_id`` is the id of the response that carried it (0 for a
    connection-level error, after which the daemon closed the connection).
    """

    code: str = "error"

    def __init__(self, code: str, message: str = "", details: Any = None,
                 request_id: Optional[int] = None) -> None:
        super().__init__("%s: %s" % (code, message))
        self.code = code
        self.message = message
        self.details = details
        self.request_id = request_id


class NotFound(EmitterError):
    """``not_found``: unknown (or malformed) subscription key."""


class Invalid(EmitterError):
    """``invalid``: ``.details["field"]`` names the offending field (dotted path)."""


class AlreadyStarted(EmitterError):
    """``already_started``: ``.details["key"]`` is the key of the running pool."""


class Conflict(EmitterError):
    """``conflict``: ``expected_version`` did not match."""


class Unavailable(EmitterError):
    """``unavailable``: the daemon is shutting down, or the pool is not running."""


class PermissionDenied(EmitterError):
    """``permission_denied``: this uid/gid may not use the control socket."""


class UnknownOp(EmitterError):
    """``unknown_op``."""


class BadFrame(EmitterError):
    """``bad_frame``: the daemon could not decode a frame (it closed the connection)."""


class FrameTooLarge(EmitterError):
    """``frame_too_large``: a request exceeded max_frame_bytes (connection closed)."""


class Internal(EmitterError):
    """``internal``: a bug in the daemon while handling this request."""


class ProtocolViolation(EmitterError):
    """The daemon sent something PROTOCOL.md does not allow (wrong response id,
    undecodable frame, a response that is not a response). The connection is
    closed when this is raised."""


#: code -> exception class; unknown codes map to EmitterError itself.
ERROR_CLASSES: Dict[str, Type[EmitterError]] = {
    codes.NOT_FOUND: NotFound,
    codes.INVALID: Invalid,
    codes.ALREADY_STARTED: AlreadyStarted,
    codes.CONFLICT: Conflict,
    codes.UNAVAILABLE: Unavailable,
    codes.PERMISSION_DENIED: PermissionDenied,
    codes.UNKNOWN_OP: UnknownOp,
    codes.BAD_FRAME: BadFrame,
    codes.FRAME_TOO_LARGE: FrameTooLarge,
    codes.INTERNAL: Internal,
}

for _code, _cls in ERROR_CLASSES.items():
    _cls.code = _code
ProtocolViolation.code = "protocol_violation"


def error_from_wire(error: Any, request_id: Optional[int] = None) -> EmitterError:
    """Build the typed exception for the ``error`` map of a failure response."""
    if not isinstance(error, dict) or not isinstance(error.get("code"), str):
        return ProtocolViolation("protocol_violation", "malformed error in response: %r" % (error,),
                                 request_id=request_id)
    code = error["code"]
    message = error.get("message")
    if not isinstance(message, str):
        message = "" if message is None else str(message)
    cls = ERROR_CLASSES.get(code, EmitterError)
    return cls(code, message, error.get("details"), request_id)


class Unreachable(ConnectionError):
    """The daemon could not be reached: no socket file, nobody listening
    (ECONNREFUSED), no permission to connect (EACCES), or the connection
    was closed before a response arrived. ``.path`` is the socket path.
    ``.results`` holds what a :meth:`Client.pipeline` got before the loss."""

    def __init__(self, message: str, path: Optional[str] = None,
                 results: Optional[list] = None) -> None:
        super().__init__(message)
        self.path = path
        self.results = results if results is not None else []


class EncodeError(ValueError):
    """A request that cannot be encoded as msgpack (an integer outside -2**63..2**64-1, a
    string that is not valid Unicode, a value of no msgpack type, nesting too deep); nothing
    was sent."""


class _ConnectTimeout(TimeoutError):
    """Internal: connect() found the daemon's accept queue full until the deadline; nothing
    was sent, and its message says so."""


class _Closed(Exception):
    """Internal: EOF or reset on a connection. `unsent`: it failed a send before any byte of
    that send went out."""

    def __init__(self, message: str = "", unsent: bool = False) -> None:
        super().__init__(message)
        self.unsent = unsent
        self.ids: Any = None       # the request ids whose send failed (Client._send)


# ---- a framed, non-blocking connection ---------------------------------------

def _seconds(timeout: Optional[float]) -> str:
    return "ever" if timeout is None else "%gs" % timeout


def _is_shared_fallback(socket_path: Optional[str]) -> bool:
    """Whether a client given `socket_path` connects to the default of last resort, in
    /tmp/emitterd-<uid> (no --socket, EMITTERD_SOCKET nor XDG_RUNTIME_DIR)."""
    return (socket_path is None and os.getuid() != 0 and not os.environ.get("EMITTERD_SOCKET")
            and not os.environ.get("XDG_RUNTIME_DIR"))


def _check_shared_default(path: str) -> None:
    """The default socket without XDG_RUNTIME_DIR lies in /tmp/emitterd-<uid>, a name any
    user can take first: refuse a directory there that is not ours (the daemon refuses it
    too), or a fake daemon could take what this client publishes."""
    uid = os.getuid()
    d = os.path.dirname(path)
    try:
        st = os.lstat(d)
    except OSError:
        return                      # connect() says what is missing
    who = "link" if stat.S_ISLNK(st.st_mode) else paths.swappable_by(st, uid)
    if who is not None:
        raise Unreachable("%s is not this user's own private directory (%s): another user "
                          "could have put a socket there; refusing to connect (give --socket "
                          "or EMITTERD_SOCKET if it is meant)" % (
                              d, "a symbolic link" if who == "link" else
                              "owned by uid %d" % st.st_uid if who == "owner" else
                              "writable by %s, mode %04o" % (
                                  "others" if who == "others" else "its group",
                                  stat.S_IMODE(st.st_mode))), path)


def _connect(path: str, deadline: Optional[float]) -> socket.socket:
    """Connect a Unix stream socket by `deadline` (None: no limit); every way of failing
    becomes Unreachable or TimeoutError."""
    started = time.monotonic()
    pause = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # blocking without a deadline: an AF_UNIX connect then waits for room in a
            # full accept queue by itself
            sock.settimeout(None if deadline is None
                            else max(0.001, deadline - time.monotonic()))
            sock.connect(path)
        except socket.timeout:
            sock.close()
            raise _ConnectTimeout("connecting to %s took more than %.1fs"
                                  % (path, time.monotonic() - started)) from None
        except FileNotFoundError:
            sock.close()
            raise Unreachable("no daemon socket at %s (is emitterd running?)" % path, path) \
                from None
        except ConnectionRefusedError:
            sock.close()
            if not _is_socket(path):
                raise Unreachable("%s is not a socket (is --socket right?)" % path, path) \
                    from None
            raise Unreachable("nobody listens on %s (stale socket file? is emitterd running?)"
                              % path, path) from None
        except PermissionError as e:
            sock.close()
            raise Unreachable("permission denied connecting to %s: %s" % (path, e.strerror),
                              path) from None
        except BlockingIOError:
            # EAGAIN: the daemon's accept queue is full (it is busy, or stopped), not gone;
            # connect() does not wait for room, so wait here, within the timeout
            sock.close()
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise _ConnectTimeout("connecting to %s took more than %.1fs (its accept "
                                      "queue stayed full: the daemon is busy or stopped)"
                                      % (path, time.monotonic() - started)) from None
            time.sleep(min(pause, left))
            pause = min(pause * 2, 0.1)
            continue
        except OSError as e:
            sock.close()
            raise Unreachable("cannot connect to %s: %s" % (path, e.strerror or e), path) \
                from None
        sock.setblocking(False)
        return sock


class _Conn:
    """A non-blocking Unix socket with a frame decoder and deadline-based I/O."""

    def __init__(self, sock: socket.socket, path: str, decoder: Optional[Decoder] = None) -> None:
        self.sock = sock
        self.path = path
        self.decoder = decoder or Decoder(_CLIENT_MAX_FRAME)
        self.sel = selectors.DefaultSelector()
        self.sel.register(sock, selectors.EVENT_READ)
        self.eof = False
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.closed = True
        try:
            self.sel.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def _wait(self, events: int, deadline: Optional[float]) -> bool:
        """Wait until the socket is ready for `events`; False on deadline. _Closed when
        close() is called meanwhile from another thread: a wait on the socket is not
        woken by its close (the kernel drops the closed fd from the epoll set before the
        waiter looks), so it wakes every second to look."""
        self.sel.modify(self.sock, events)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self.sel.select(1.0 if left is None else min(left, 1.0)):
                return True
            if self.closed:
                raise _Closed("closed")
            if left is not None and left <= 1.0:
                return False

    def _read_some(self) -> None:
        """One recv into the decoder; raises _Closed on EOF or reset."""
        try:
            data = self.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except (ConnectionResetError, BrokenPipeError) as e:
            self.eof = True
            raise _Closed(str(e)) from None
        if not data:
            self.eof = True
            raise _Closed("EOF")
        self.decoder.feed(data)

    def _next_frame(self) -> Optional[dict]:
        try:
            return self.decoder.next()
        except FrameError as e:
            raise ProtocolViolation("protocol_violation",
                                    "undecodable frame from the daemon: %s" % e.message) from None

    def send(self, data: bytes, deadline: Optional[float], read_while_blocked: bool = True) -> None:
        """Send every byte; while the socket is full, keep reading incoming frames into
        the decoder (so a peer blocked on writing to us cannot deadlock us)."""
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
                view = view[n:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except (BrokenPipeError, ConnectionResetError) as e:
                self.eof = True
                raise _Closed(str(e), unsent=len(view) == len(data)) from None
            mask = selectors.EVENT_WRITE | (selectors.EVENT_READ if read_while_blocked and
                                            not self.eof else 0)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self.sel.modify(self.sock, mask)
            ready = self.sel.select(timeout)
            if not ready:
                raise TimeoutError("sending to %s timed out" % self.path)
            for _key, ev in ready:
                if ev & selectors.EVENT_READ:
                    try:
                        self._read_some()
                    except _Closed:
                        pass  # the write will fail with EPIPE and report it

    def recv(self, deadline: Optional[float]) -> dict:
        """The next frame; raises TimeoutError on the deadline, _Closed on EOF."""
        while True:
            frame = self._next_frame()
            if frame is not None:
                return frame
            if self.eof:
                raise _Closed("EOF")
            if not self._wait(selectors.EVENT_READ, deadline):
                raise TimeoutError("no frame from %s within the timeout" % self.path)
            self._read_some()


def _encode_request(msg: dict) -> bytes:
    try:
        return encode(msg)
    except (TypeError, OverflowError, UnicodeEncodeError, ValueError, RecursionError) as e:
        raise EncodeError("the request to %r cannot be encoded as msgpack: %s"
                          % (msg.get("op"), e)) from None


def _drain(conn: "_Conn") -> None:
    """Read what the daemon sent before it closed the connection (up to a second)."""
    deadline = time.monotonic() + 1.0
    try:
        # conn.eof may be set by the failed send: the answers can still be unread
        while time.monotonic() < deadline:
            if not conn._wait(selectors.EVENT_READ, deadline):
                break
            conn._read_some()
    except (_Closed, OSError):
        pass


def _parting_error(conn: "_Conn") -> Optional["EmitterError"]:
    """The connection-level error (id 0) a daemon sent before it closed the connection under
    a request still being sent (frame_too_large: the frame was refused whole, nothing of it
    was done), if one is there to read; else None."""
    _drain(conn)
    try:
        frame = conn._next_frame()
    except EmitterError:
        return None
    if frame is not None and frame.get("id") == 0 and frame.get("ok") is False:
        return error_from_wire(frame.get("error"), 0)
    return None


def _deadline(timeout: Optional[float]) -> Optional[float]:
    return None if timeout is None else time.monotonic() + timeout


def _target(key: Key) -> Dict[str, Any]:
    """`key or triple` args: a str is a key, a map is a subscription triple."""
    if isinstance(key, dict):
        return {"subscription": key}
    return {"key": key}


# ---- control client ----------------------------------------------------------

class Client:
    """A blocking client of the control socket (PROTOCOL §2).

    The connection is opened lazily by the first request (or :meth:`connect`)
    and re-opened by the next request after it was lost or timed out; request
    ids count from 1 on each connection. `timeout` (seconds, None = wait
    forever) bounds each request; a request that times out raises
    :class:`TimeoutError` and drops the connection (a late answer could not
    be matched any more).
    """

    def __init__(self, socket_path: Optional[str] = None, timeout: Optional[float] = 30.0) -> None:
        self._fallback = _is_shared_fallback(socket_path)
        self.socket_path = socket_path or paths.default_socket_path()
        self.timeout = timeout
        self._conn: Optional[_Conn] = None
        self._next_id = 1

    # -- connection
    def connect(self, deadline: Optional[float] = None) -> "Client":
        """Open the connection now (raises Unreachable, or TimeoutError when the daemon's
        accept queue stays full past `deadline`, a time.monotonic() value; by default the
        client's timeout from now); a no-op when open."""
        if self._conn is None:
            if deadline is None:
                deadline = _deadline(self.timeout)
            if self._fallback:
                _check_shared_default(self.socket_path)
            sock = _connect(self.socket_path, deadline)
            self._conn = _Conn(sock, self.socket_path)
            self._next_id = 1
        return self

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def close(self) -> None:
        """Close the connection (the client may be used again: it reconnects)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # -- requests
    def _build(self, op: str, args: Optional[dict]) -> Tuple[int, bytes]:
        rid = self._next_id
        self._next_id += 1
        msg: Dict[str, Any] = {"id": rid, "op": op}
        if args is not None:
            msg["args"] = args
        return rid, _encode_request(msg)

    def _read_response(self, conn: _Conn, rid: int, deadline: Optional[float]) -> Any:
        """The result of request `rid`, or an EmitterError instance for a failure.

        Raises ProtocolViolation (a response out of order), the typed error of
        a connection-level (id 0) error, TimeoutError or _Closed."""
        resp = conn.recv(deadline)
        got = resp.get("id")
        ok = resp.get("ok")
        if got == 0 and ok is False and rid != 0:
            # a connection-level error (framing, permission): the daemon closes now
            raise error_from_wire(resp.get("error"), 0)
        if got != rid or not isinstance(ok, bool):
            raise ProtocolViolation("protocol_violation",
                                    "expected the response to request %d, got %r"
                                    % (rid, _short(resp)), request_id=got if isinstance(got, int)
                                    else None)
        if ok:
            return resp.get("result")
        return error_from_wire(resp.get("error"), rid)

    def _lost(self, why: str, results: Optional[list] = None) -> Unreachable:
        self.close()
        return Unreachable("connection to emitterd at %s lost before a response (%s)"
                           % (self.socket_path, why), self.socket_path, results)

    def _send(self, build: Callable[[], Tuple[Any, bytes]],
              deadline: Optional[float]) -> Tuple["_Conn", Any]:
        """Connect if need be, build (ids, bytes) and send them; (connection, ids). A
        connection the daemon closed before any byte of them went out (it exited or
        restarted while we were idle) is replaced once: nobody got the request, so sending
        it again repeats nothing. Raises _Closed otherwise, with the connection open for
        the caller to read a parting error from."""
        for fresh in (False, True):
            self.connect(deadline)
            conn = self._conn
            assert conn is not None
            ids, data = build()      # after connect(): request ids start again on a new one
            try:
                conn.send(data, deadline)
                return conn, ids
            except _Closed as e:
                e.ids = ids
                if fresh or not e.unsent:
                    raise
                _drain(conn)
                if conn.decoder.buffered:
                    raise            # the daemon said why it closed: the caller reads it
                self.close()
        raise AssertionError("unreachable")

    def request(self, op: str, args: Optional[dict] = None, timeout: Optional[float] = None) -> Any:
        """Send one request and return its result; raise its EmitterError on failure.

        `args` None sends no ``args`` key. `timeout` overrides the client's
        timeout for this request.
        """
        deadline = _deadline(self.timeout if timeout is None else timeout)
        try:
            conn, rid = self._send(lambda: self._build(op, args), deadline)
            res = self._read_response(conn, rid, deadline)
        except _Closed as e:
            conn = self._conn          # the one that failed, still open
            assert conn is not None
            parting = _parting_error(conn)
            if parting is not None:
                self.close()
                raise parting from None
            raise self._lost(str(e)) from None
        except _ConnectTimeout:
            raise              # nothing was sent: its own message says why
        except TimeoutError:
            self.close()
            raise TimeoutError("no answer to %r from %s within %s"
                               % (op, self.socket_path, _seconds(self.timeout if timeout is None
                                                                 else timeout))) from None
        except EmitterError:
            self.close()   # id-0 error or protocol violation: the connection is done
            raise
        except EncodeError:
            raise              # raised before anything was sent: the connection is in step
        except BaseException:
            # interrupted (Ctrl-C, a signal handler's exception) while sending or waiting:
            # a half-sent frame or a late answer would put the next request out of step
            self.close()
            raise
        if isinstance(res, EmitterError):
            raise res
        return res

    def pipeline(self, requests: Sequence[Tuple[str, Optional[dict]]],
                 timeout: Optional[float] = None) -> List[Any]:
        """Send every request before reading any response; return, in request
        order, each result or the EmitterError instance it failed with.

        A connection-level error (id 0) fills the remaining places with that
        error. A lost connection raises Unreachable with ``.results`` set to
        the answers read so far. `timeout` bounds the whole exchange.
        """
        if not requests:
            return []
        deadline = _deadline(self.timeout if timeout is None else timeout)

        def build() -> Tuple[List[int], bytes]:
            built = [self._build(op, args) for op, args in requests]
            return [rid for rid, _ in built], b"".join(data for _, data in built)
        results: List[Any] = []
        ids: List[int] = []
        try:
            # send() keeps reading into the decoder while the socket is full
            conn, ids = self._send(build, deadline)
            for rid in ids:
                try:
                    results.append(self._read_response(conn, rid, deadline))
                except EmitterError as e:
                    if isinstance(e, ProtocolViolation):
                        raise
                    results.extend([e] * (len(ids) - len(results)))
                    self.close()
                    break
        except _Closed as e:
            conn = self._conn          # the one that failed, still open
            assert conn is not None
            ids = ids or e.ids         # e.ids: its send failed
            if self._answers_left(conn, ids, results):
                return results       # a connection-level error answered the rest
            raise self._lost("%s; %d of %d answered" % (e, len(results), len(ids)), results) \
                from None
        except _ConnectTimeout:
            raise
        except TimeoutError:
            self.close()
            raise TimeoutError("no answers from %s within the timeout (%d of %d answered)"
                               % (self.socket_path, len(results), len(requests))) from None
        except EmitterError:
            self.close()
            raise
        except EncodeError:
            raise
        except BaseException:
            self.close()       # interrupted: as in request()
            raise
        return results

    def _answers_left(self, conn: _Conn, ids: List[int], results: List[Any]) -> bool:
        """After the daemon closed a pipeline's connection: add to `results` the answers it
        sent first, and its connection-level error (frame_too_large) for the requests after
        them. True if every request is then accounted for."""
        _drain(conn)
        self.close()
        try:
            while len(results) < len(ids):
                frame = conn._next_frame()
                if frame is None:
                    return False
                if frame.get("id") == 0 and frame.get("ok") is False:
                    err = error_from_wire(frame.get("error"), 0)
                    results.extend([err] * (len(ids) - len(results)))
                    return True
                rid = ids[len(results)]
                if frame.get("id") != rid:
                    return False
                results.append(frame.get("result") if frame.get("ok") else
                               error_from_wire(frame.get("error"), rid))
        except EmitterError:
            return False
        return True

    # -- operations (each returns the op's `result` as PROTOCOL §2 describes it)
    def ping(self) -> Dict[str, Any]:
        """``{"version", "pid", "store_id", "uptime", "head"}``."""
        return self.request("ping")

    def start(self, subscription: Dict[str, Any]) -> Dict[str, Any]:
        """Register and start a pool; returns its pool status."""
        return self.request("start", {"subscription": subscription})

    def stop(self, key: Optional[Key] = None, *, subscription: Optional[Dict[str, Any]] = None,
             delete: bool = False, drain_timeout: Optional[float] = None) -> Dict[str, Any]:
        """Stop a pool (by key, or by ``subscription`` triple); ``delete`` forgets it.

        The request waits up to the drain timeout, so its own timeout is at
        least ``drain_timeout`` + 30 s; without ``drain_timeout``, 10 + 30 s (10 s
        is the built-in default: pass ``drain_timeout`` when the daemon is
        configured with a longer one)."""
        if (key is None) == (subscription is None):
            raise TypeError("stop() needs exactly one of key or subscription")
        args = _target(key) if key is not None else {"subscription": subscription}
        args["delete"] = bool(delete)
        if drain_timeout is not None:
            if not 0 <= float(drain_timeout) < float("inf"):
                raise ValueError("drain_timeout must be a finite number of seconds >= 0")
            args["drain_timeout"] = drain_timeout
        wait = (10.0 if drain_timeout is None else float(drain_timeout)) + 30.0
        timeout = None if self.timeout is None else max(self.timeout, wait)
        return self.request("stop", args, timeout=timeout)

    _UPDATE_FIELDS = frozenset({"pool_size", "subscriber", "options", "checkpoint"})

    def update(self, key: Key, **fields: Any) -> Dict[str, Any]:
        """Change ``pool_size``, ``subscriber`` (None removes it), ``options``
        (partial map) and/or ``checkpoint`` of a pool; returns its status."""
        unknown = set(fields) - self._UPDATE_FIELDS
        if unknown:
            raise TypeError("update() got unknown fields: %s" % ", ".join(sorted(unknown)))
        args = _target(key)
        args.update(fields)
        return self.request("update", args)

    def list(self) -> Dict[str, Any]:
        """``{"subscriptions": [pool status, ...]}``."""
        return self.request("list")

    def status(self, key: Key) -> Dict[str, Any]:
        """The pool status of one subscription (key, or subscription triple map)."""
        return self.request("status", _target(key))

    def publish(self, events: List[Dict[str, Any]],
                expected_version: Optional[int] = None) -> Dict[str, Any]:
        """Append events atomically; ``{"positions": [...], "versions": [...]}``.

        The answer comes once they are on disk. Should it not come (TimeoutError,
        or :class:`Unreachable` after the request went out) they may or may not
        be stored: publishing them again stores twice those without an ``id``,
        and once those with one (an event whose id is stored gets its first
        position back)."""
        args: Dict[str, Any] = {"events": events}
        if expected_version is not None:
            args["expected_version"] = expected_version
        return self.request("publish", args)

    def parked(self, key: Key, action: str = "list", limit: int = 100) -> Dict[str, Any]:
        """``list`` -> ``{"events": [...]}``; ``replay`` / ``purge`` -> ``{"count": n}``."""
        args = _target(key)
        args["action"] = action
        args["limit"] = limit
        return self.request("parked", args)

    def metrics(self) -> Dict[str, Any]:
        """``{"text": <Prometheus text exposition>}``."""
        return self.request("metrics")

    def attach(self, key: str, timeout: Optional[float] = None) -> "Consumer":
        """Attach to a running pool without subscriber on a NEW connection and
        return the :class:`Consumer` that owns it (this client's own connection
        is not touched)."""
        t = self.timeout if timeout is None else timeout
        data = _encode_request({"id": 1, "op": "attach", "args": {"key": key}})
        deadline = _deadline(t)
        if self._fallback:
            _check_shared_default(self.socket_path)
        sock = _connect(self.socket_path, deadline)
        conn = _Conn(sock, self.socket_path)
        try:
            conn.send(data, deadline)
            resp = conn.recv(deadline)
            if resp.get("id") not in (0, 1) or not isinstance(resp.get("ok"), bool):
                raise ProtocolViolation("protocol_violation",
                                        "expected the response to attach, got %r" % (_short(resp),))
            if not resp["ok"]:
                raise error_from_wire(resp.get("error"), resp.get("id"))
            result = resp.get("result") or {}
        except _Closed as e:
            conn.close()
            raise Unreachable("connection to emitterd at %s lost before the attach response (%s)"
                              % (self.socket_path, e), self.socket_path) from None
        except BaseException:
            conn.close()
            raise
        return Consumer(conn, result.get("key", key), result.get("worker", -1), timeout=t)


def _short(obj: Any, limit: int = 300) -> str:
    s = repr(obj)
    return s if len(s) <= limit else s[:limit] + "..."


# ---- attached consumer -------------------------------------------------------

def _positions(positions: Sequence[int]) -> List[int]:
    """Positions as ints, checked here: int() would turn 7.9 into 7 (acking an event that
    was never handled) and an event map into a puzzling message."""
    out = list(positions)
    for p in out:
        if type(p) is not int:
            raise TypeError("positions must be ints, got %s" % (
                "an event map: pass event[\"position\"]" if isinstance(p, dict)
                else "%s %r" % (type(p).__name__, p)))
        if not -(1 << 63) <= p < 1 << 64:
            # msgpack has no form for it (an OverflowError from deep inside otherwise)
            raise ValueError("position %d is out of range: positions are 1 .. 2**64 - 1" % p)
    return out


class Consumer:
    """An attached consumer connection (PROTOCOL §3), made by :meth:`Client.attach`.

    ``key`` and ``worker`` come from the attach result. Events must be acked
    (or nacked) by position; unfinished events are delivered again after the
    connection closes. Iterating ends when the daemon closes the connection
    (``closed_by_peer`` is then True). An ack or nack that does not go out
    whole within `timeout` (TimeoutError) or is interrupted closes the
    consumer: part of its frame may have gone out.
    """

    def __init__(self, conn: _Conn, key: str, worker: int, timeout: Optional[float] = 30.0) -> None:
        self._conn: Optional[_Conn] = conn
        self.key = key
        self.worker = worker
        self.timeout = timeout
        self.closed_by_peer = False

    def recv(self, timeout: Optional[float] = None) -> Optional[dict]:
        """The next frame from the worker (normally ``{"op": "events", ...}``).

        Returns None once the daemon has closed the connection; raises
        TimeoutError when nothing arrives within `timeout` (None = forever),
        and the typed EmitterError when the daemon sends an error frame."""
        conn = self._conn
        if conn is None:
            return None
        try:
            frame = conn.recv(_deadline(timeout))
        except _Closed:
            if self._conn is None:     # close() from another thread: iteration ends
                return None
            self.closed_by_peer = True
            self.close()
            return None
        except (OSError, ValueError, RuntimeError, KeyError):
            if self._conn is None:     # the same, caught on a closed socket or selector
                return None
            raise
        if frame.get("ok") is False and "error" in frame:
            err = error_from_wire(frame.get("error"), frame.get("id"))
            self.closed_by_peer = True      # the daemon closes the connection after one
            self.close()
            raise err
        return frame

    def batches(self, timeout: Optional[float] = None) -> Iterator[List[Dict[str, Any]]]:
        """Yield the ``events`` list of each events frame as it arrives.

        `timeout` is an idle limit: the iterator ends (without error) when no
        frame arrives for that many seconds; None waits forever. It also ends
        when the daemon closes the connection. Frames other than events are
        skipped."""
        while self._conn is not None:
            try:
                frame = self.recv(timeout)
            except TimeoutError:
                return
            if frame is None:
                return
            if frame.get("op") == "events" and isinstance(frame.get("events"), list):
                yield frame["events"]

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        """Events one by one (no idle limit); ack or nack each one yourself."""
        for batch in self.batches():
            yield from batch

    def _send(self, msg: dict) -> None:
        if self._conn is None:
            raise Unreachable("the consumer connection is closed")
        data = _encode_request(msg)
        try:
            self._conn.send(data, _deadline(self.timeout))
        except _Closed as e:
            self.closed_by_peer = True
            self.close()
            raise Unreachable("the consumer connection was closed by the daemon (%s)" % e) \
                from None
        except BaseException:
            # a timeout or an interrupt may leave part of the frame sent: a later ack would
            # become bytes inside it and be lost, so the connection ends here (its events
            # come again, §3)
            self.close()
            raise

    def ack(self, positions: Sequence[int]) -> None:
        """Acknowledge events by position (one ack frame)."""
        self._send({"op": "ack", "positions": _positions(positions)})

    def nack(self, positions: Sequence[int], action: str = "retry",
             reason: Optional[str] = None) -> None:
        """Refuse events: ``action`` is ``retry``, ``park`` or ``skip`` (ValueError for any
        other: the daemon would close the connection over it; TypeError for a reason that
        is not a str, for the same cause). The daemon keeps at most 1000 characters of it."""
        if action not in _NACK_ACTIONS:
            raise ValueError("nack action must be one of %s, got %r"
                             % (", ".join(_NACK_ACTIONS), action))
        if reason is not None and not isinstance(reason, str):
            raise TypeError("nack reason must be a str, got %s" % type(reason).__name__)
        msg: Dict[str, Any] = {"op": "nack", "positions": _positions(positions),
                               "action": action}
        if reason is not None:
            msg["reason"] = reason
        self._send(msg)

    @property
    def closed(self) -> bool:
        return self._conn is None

    def close(self) -> None:
        """Close the connection (unacked events are delivered again). Another thread may
        call it to end an iteration blocked in recv()."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)   # wakes a thread waiting on it
            except OSError:
                pass
            conn.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- unix subscriber server --------------------------------------------------

Verdict = Tuple[str, Optional[str]]   # (action, reason); action "ack" | "retry" | "park" | "skip"
_NACK_ACTIONS = ("retry", "park", "skip")


def _verdict(result: Any) -> Verdict:
    """Map a handler's return value to (action, reason)."""
    if result is None or result is True or result == "ack":
        return ("ack", None)
    if result is False or result == "nack":
        return ("retry", None)
    if isinstance(result, str) and result in _NACK_ACTIONS:
        return (result, None)
    if isinstance(result, (tuple, list)) and result and result[0] == "nack":
        action = result[1] if len(result) > 1 else "retry"
        reason = result[2] if len(result) > 2 else None
        if action not in _NACK_ACTIONS:
            return ("retry", "handler returned an unknown nack action %r" % (action,))
        return (action, None if reason is None else str(reason))
    return ("retry", "handler returned an unexpected value %r" % (_short(result, 100),))


class _SubConn:
    __slots__ = ("sock", "decoder", "out", "hello")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder(_CLIENT_MAX_FRAME)
        self.out = bytearray()
        self.hello: Optional[dict] = None


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return True        # cannot tell: say what the connect said


def _prepare_socket_path(path: str) -> None:
    """Remove a stale socket file at `path`; refuse to remove anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)          # nobody listens: stale
        return
    except FileNotFoundError:
        return                   # gone meanwhile
    except (BlockingIOError, socket.timeout):
        raise OSError(errno.EADDRINUSE, "another program listens on this socket (its accept "
                      "queue is full)", path) from None
    except OSError as e:
        # EACCES and the like: whoever listens there may be alive; never remove it unseen
        raise OSError(e.errno, "cannot tell whether another program listens on this socket "
                      "(%s)" % (e.strerror or e), path) from None
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another program listens on this socket", path)


def serve_subscriber(path: str, handler: Callable[[dict], Any], *,
                     stop: Optional[threading.Event] = None,
                     ready: Optional[threading.Event] = None,
                     on_hello: Optional[Callable[[dict], Any]] = None) -> None:
    """Run a ``unix:`` subscriber program on `path` until `stop` is set.

    Listens on `path` (a stale socket file there is removed first; a live
    one or a non-socket raises OSError), accepts one connection per worker
    (any number at once; one thread, a selector), reads each connection's
    ``hello`` frame (passed to `on_hello` when given) and then its ``events``
    frames, calling ``handler(event)`` for every event in order:

    * ``None``, ``True`` or ``"ack"`` acks it;
    * ``("nack", action[, reason])`` nacks it (action ``retry``, ``park``
      or ``skip``); the strings ``"retry"``, ``"park"``, ``"skip"`` and
      ``False`` / ``"nack"`` (= retry) are shorthands;
    * an exception nacks it with ``retry`` and reason ``str(exc)`` (any
      other return value too, with a reason naming it); an exception from
      `on_hello` ends the server.

    One ``ack`` frame answers each events frame (plus one ``nack`` frame per
    distinct action and reason), or more when the handler is slow: what it
    has handled goes out every 0.1 s, so an event answered in time is not
    taken for timed out because the rest of its frame took long. `ready` is
    set once the socket listens. The socket file is created with the
    process's umask (workers running as another user need write permission
    on it) and removed on return. Without `stop` it runs forever.
    """
    _prepare_socket_path(path)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sel = selectors.DefaultSelector()
    conns: Dict[int, _SubConn] = {}
    bound_ino: Optional[int] = None
    try:
        lsock.bind(path)
        bound_ino = os.stat(path).st_ino
        lsock.listen(64)
        lsock.setblocking(False)
        sel.register(lsock, selectors.EVENT_READ, None)
        if ready is not None:
            ready.set()

        def drop(c: _SubConn) -> None:
            conns.pop(c.sock.fileno(), None)
            try:
                sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
            c.sock.close()

        def flush(c: _SubConn) -> None:
            while c.out:
                try:
                    n = c.sock.send(c.out)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    drop(c)
                    return
                del c.out[:n]
            mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0)
            sel.modify(c.sock, mask, c)

        def handle_frame(c: _SubConn, frame: dict) -> None:
            op = frame.get("op")
            if op == "hello" and c.hello is None:
                c.hello = frame
                if on_hello is not None:
                    on_hello(frame)
                return
            if op != "events" or not isinstance(frame.get("events"), list):
                return   # unknown frames are ignored (forward compatible)
            acks: List[int] = []
            nacks: Dict[Verdict, List[int]] = {}

            def answer() -> None:
                if acks:
                    c.out += encode({"op": "ack", "positions": acks})
                for (action, reason), positions in nacks.items():
                    msg: Dict[str, Any] = {"op": "nack", "positions": positions,
                                           "action": action}
                    if reason is not None:
                        msg["reason"] = reason
                    c.out += encode(msg)
                acks.clear()
                nacks.clear()

            started = time.monotonic()
            for event in frame["events"]:
                try:
                    action, reason = _verdict(handler(event))
                except Exception as exc:  # noqa: BLE001 - the handler's failure nacks the event
                    action, reason = "retry", str(exc) or type(exc).__name__
                if reason is not None:
                    # a message from os.fsdecode() holds lone surrogates: no UTF-8 for them
                    reason = reason.encode("utf-8", "backslashreplace").decode("utf-8")
                pos = event.get("position") if isinstance(event, dict) else None
                if not isinstance(pos, int):
                    continue
                if action == "ack":
                    acks.append(pos)
                else:
                    nacks.setdefault((action, reason), []).append(pos)
                if time.monotonic() - started >= _ANSWER_EVERY:
                    # a slow handler: what it has handled goes out now, not after the
                    # frame's last event (the first ones' ack_timeout runs meanwhile)
                    answer()
                    flush(c)
                    if c.sock.fileno() < 0:
                        return
                    started = time.monotonic()
            answer()

        while stop is None or not stop.is_set():
            for skey, mask in sel.select(0.1):
                if skey.data is None:
                    try:
                        s, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        continue
                    s.setblocking(False)
                    c = _SubConn(s)
                    conns[s.fileno()] = c
                    sel.register(s, selectors.EVENT_READ, c)
                    continue
                c = skey.data
                if mask & selectors.EVENT_READ:
                    try:
                        data = c.sock.recv(_RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        drop(c)
                        continue
                    if data == b"":
                        drop(c)
                        continue
                    if data:
                        c.decoder.feed(data)
                        try:
                            while True:
                                frame = c.decoder.next()
                                if frame is None:
                                    break
                                handle_frame(c, frame)
                        except FrameError:
                            drop(c)
                            continue
                if c.sock.fileno() in conns:
                    flush(c)
    finally:
        for c in list(conns.values()):
            try:
                c.sock.close()
            except OSError:
                pass
        sel.close()
        lsock.close()
        try:
            if bound_ino is not None and os.stat(path).st_ino == bound_ino:
                os.unlink(path)      # only our own socket file
        except OSError:
            pass
