"""The control socket: listen, SO_PEERCRED check, request validation, ordered responses."""
import errno
import os
import socket
import stat
from collections import deque
from typing import Any, Callable, Optional

from emitterd import framing, logs
from emitterd.channel import Channel
from emitterd.control.peercred import Peer, peer_of
from emitterd.paths import ensure_private_dir, swappable_by
from emitterd.errors import (INTERNAL, INVALID, PERMISSION_DENIED, UNAVAILABLE, UNKNOWN_OP,
                             ProtocolError)
from emitterd.eventlog import PublishBatch

log = logs.get("control")
DEFERRED = object()      # a handler's "I will answer later through req.reply/req.fail"
# Deferred ops that keep their own order: a publish waits for the turn's group commit
# (a later request of its connection commits it first), an attach ends the control
# connection. Any other deferred op (a stop's drain) finishes before the next request
# of its connection runs, so a pipelined stop + status or stop + start sees the stop done.
_OWN_ORDER = frozenset({"publish", "attach"})


def _error(rid: int, code: str, message: str, details: Any = None) -> dict:
    err = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"id": rid, "ok": False, "error": err}


ADMIN_RESERVE = 4     # connections beyond max_connections for root and the daemon's uid

class Request:
    """One request in flight; answered exactly once, in order with its connection's others."""

    __slots__ = ("id", "op", "args", "conn", "_slot")

    def __init__(self, rid: int, op: str, args: dict, conn: "ControlConn", slot: list) -> None:
        self.id = rid
        self.op = op
        self.args = args
        self.conn = conn
        self._slot = slot

    def reply(self, result: Any) -> None:
        self.conn.fill(self._slot, {"id": self.id, "ok": True, "result": result})

    def fail(self, err: ProtocolError) -> None:
        self.conn.fill(self._slot, {"id": self.id, "ok": False, "error": err.to_wire()})


class ControlConn:
    def __init__(self, server: "ControlServer", sock: socket.socket, peer: tuple) -> None:
        self.server = server
        self.peer = peer
        cfg = server.ctx.cfg
        self.slots: deque = deque()    # [response or None, close_after]
        self.channel = Channel(server.ctx.loop, sock, cfg.max_frame_bytes, self._on_frame,
                               self._on_close, self._on_frame_error,
                               max_out=cfg.output_buffer_bytes, decode=server.decode,
                               backpressure=True)
        self.after_reply = None        # callable run once this connection's slots are all sent
        self._unfinished: Optional[list] = None   # the slot of a deferred op reading waits for
        self._frames = 0               # frames read so far
        # (frames read when the unfinished one was first seen, since when): cut_off_stalled
        self._partial: Optional[tuple] = None

    # ---- requests ----------------------------------------------------------------
    def _on_frame(self, msg: dict) -> None:
        self._frames += 1
        rid = msg.get("id")
        if not (isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < 1 << 64):
            self._answer(_error(0, INVALID, "a request needs an unsigned integer id", {"field": "id"}))
            return
        op = msg.get("op")
        if not isinstance(op, str):
            self._answer(_error(rid, INVALID, "a request needs a string op", {"field": "op"}))
            return
        args = msg.get("args")
        # a PublishBatch: a publish that the server's decode validated as it parsed it
        if args is None:
            args = {}
        elif not isinstance(args, dict) and not (op == "publish" and type(args) is PublishBatch):
            self._answer(_error(rid, INVALID, "args must be a map or nil", {"field": "args"}))
            return
        handler = self.server.ops.get(op)
        if handler is None:
            self._answer(_error(rid, UNKNOWN_OP, "unknown op %r" % (op[:100],)))
            return
        committer = self.server.ctx.committer
        if op != "publish" and committer.waiting_for(self):
            committer.commit(force=True)   # its later requests see its earlier publishes
        slot = [None, False]
        self.slots.append(slot)
        req = Request(rid, op, args, self, slot)
        try:
            result = handler(self.server.ctx, req)
        except ProtocolError as e:
            req.fail(e)
            return
        except Exception as e:  # a bug in one request must not stop the loop
            log.exception("internal error", op=op)
            req.fail(ProtocolError(INTERNAL, "internal error in %s: %s" % (op, type(e).__name__)))
            return
        if result is not DEFERRED:
            req.reply(result)
        elif op not in _OWN_ORDER and slot[0] is None:
            self._unfinished = slot
            self.channel.pause()

    def _answer(self, response: dict, close_after: bool = False) -> None:
        self.slots.append([response, close_after])
        self._flush_slots()

    def fill(self, slot: list, response: dict) -> None:
        slot[0] = response
        self._flush_slots()
        if slot is self._unfinished:
            self._unfinished = None
            # on the next turn: not inside whatever finished this request
            self.server.ctx.loop.call_later(0, self.channel.resume)

    def _flush_slots(self) -> None:
        ch = self.channel
        while self.slots and self.slots[0][0] is not None:
            response, close_after = self.slots.popleft()
            try:
                data = framing.encode(response)
            except Exception as e:
                log.error("response could not be encoded", error=str(e))
                data = framing.encode(_error(response.get("id", 0), INTERNAL,
                                             "response could not be encoded"))
            if len(data) - 4 > self.server.ctx.cfg.max_frame_bytes:
                # PROTOCOL §1: no frame exceeds max_frame_bytes, responses included
                log.error("response over max_frame_bytes replaced by an error", size=len(data))
                data = framing.encode(_error(response.get("id", 0), INTERNAL,
                                             "the response (%d bytes) exceeds max_frame_bytes %d"
                                             % (len(data) - 4, self.server.ctx.cfg.max_frame_bytes)))
            ch.send_raw(data)
            if close_after:
                self.slots.clear()
                ch.close_when_flushed()
                return
        if not self.slots and self.after_reply is not None:
            cb, self.after_reply = self.after_reply, None
            ch.after_flush(cb)

    def close_if_frame_stalled(self, now: float, limit: float) -> None:
        """A frame begun and not finished for `limit` seconds, timed from when it was first
        seen unfinished (checked, not timed per read; no frame completed since), however
        its bytes trickle in: a byte now and then must not keep its buffer for good."""
        ch = self.channel
        pending = ch.decoder.buffered if ch.receiving else 0
        if not pending:
            self._partial = None
        elif self._partial is None or self._partial[0] != self._frames:
            self._partial = (self._frames, now)
        elif now - self._partial[1] >= limit:
            extra = self.server._throttles["partial"].allow()
            if extra is not None:
                log.warning("control connection closed: a frame half sent for %gs" % limit,
                            buffered=pending, peer_pid=self.peer.pid, **extra)
            ch.close("frame half sent for %gs" % limit)

    def _on_frame_error(self, err: framing.FrameError) -> None:
        extra = self.server._throttles["frame"].allow()
        if extra is not None:
            log.info("framing error, closing connection", code=err.code, reason=err.message,
                     peer_pid=self.peer.pid, peer_uid=self.peer.uid, **extra)
        self._answer(_error(0, err.code, err.message), close_after=True)

    def _on_close(self, reason: str) -> None:
        self.server.conns.discard(self)
        if reason.startswith("send failed"):
            # the client left before its answer: its business, not the operator's
            log.debug("control connection closed", reason=reason, peer_pid=self.peer.pid)
        elif reason.startswith("output buffer"):
            extra = self.server._throttles["cutoff"].allow()
            if extra is not None:
                log.warning("control connection closed", reason=reason, peer_pid=self.peer.pid,
                            **extra)


class ControlServer:
    def __init__(self, ctx: Any, ops: dict,
                 decode: Optional[Callable[[bytes], Any]] = None) -> None:
        self.ctx = ctx
        self.ops = ops
        self.decode = decode      # request payload -> map (default framing.decode_payload)
        self.conns: set = set()
        self.sock: Optional[socket.socket] = None
        self.path: Optional[str] = None
        self.owns_path = False
        self._bound: tuple = ()
        # lines a client can cause per connection: a flood of them must not flood the log
        self._throttles = {k: logs.Throttle() for k in ("peer", "full", "frame", "cutoff",
                                                                 "partial")}

    def listen(self, inherited: Optional[socket.socket] = None) -> None:
        cfg = self.ctx.cfg
        self.path = cfg.socket
        if inherited is not None:
            self.sock = inherited          # socket activation: systemd owns the file
            try:
                self.path = os.fsdecode(inherited.getsockname()) or cfg.socket
            except OSError:
                pass
        else:
            self.sock = bind_control_socket(cfg.socket, cfg.socket_mode)
            self.owns_path = True
            st = os.lstat(cfg.socket)
            self._bound = (st.st_dev, st.st_ino)   # to unlink at exit only the file we made
        self.sock.setblocking(False)
        self.ctx.loop.add_reader(self.sock, self._on_accept)
        log.info("listening", socket=self.path, activated=inherited is not None)

    def _on_accept(self, mask: int) -> None:
        for _ in range(64):
            sock = self.ctx.loop.accept(self.sock, "control connections", log)
            if sock is None:
                return
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        cfg = self.ctx.cfg
        peer = peer_of(sock)
        pid, uid, gid = peer.pid, peer.uid, peer.gid
        if not self.allowed(peer):
            extra = self._throttles["peer"].allow()
            if extra is not None:
                log.warning("connection refused: peer not allowed", pid=pid, uid=uid, gid=gid,
                            **extra)
            self._refuse(sock, PERMISSION_DENIED, "uid %d / gid %d may not use this socket" % (uid, gid))
            return
        # attached consumers live in workers now, but they are still connections to us.
        # Root and our own uid have a few more: an allowed client holding every connection
        # must not lock out the administrator who would stop it
        limit = cfg.max_connections + (ADMIN_RESERVE if uid in (0, os.getuid()) else 0)
        if len(self.conns) + self.ctx.registry.consumer_count() >= limit:
            extra = self._throttles["full"].allow()
            if extra is not None:
                log.warning("connection refused: max_connections reached",
                            limit=cfg.max_connections, pid=pid, uid=uid, **extra)
            self._refuse(sock, UNAVAILABLE, "too many connections (max_connections %d)"
                         % cfg.max_connections)
            return
        self.conns.add(ControlConn(self, sock, peer))

    def allowed(self, peer: Peer) -> bool:
        """Root, our own uid, allow_uids, or a member (primary or supplementary) of a group
        in allow_gids: socket_mode 0660 lets a group's members in, whichever group is their
        primary one."""
        cfg = self.ctx.cfg
        uid = peer.uid
        return (uid == 0 or uid == os.getuid() or uid in cfg.allow_uids
                or any(g in cfg.allow_gids for g in peer.groups))

    def _refuse(self, sock: socket.socket, code: str, message: str) -> None:
        try:
            sock.setblocking(False)
            sock.send(framing.encode(_error(0, code, message)))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        sock.close()

    def apply_limits(self) -> None:
        """A reload's max_frame_bytes and output_buffer_bytes, for the connections open."""
        cfg = self.ctx.cfg
        for c in self.conns:
            c.channel.set_limits(cfg.max_frame_bytes, cfg.output_buffer_bytes)

    def cut_off_stalled(self, now: float) -> None:
        """Close clients that stopped reading their responses (over output_buffer_bytes),
        or stopped sending in the middle of a frame (partial_frame_timeout)."""
        limit = self.ctx.cfg.partial_frame_timeout
        for c in list(self.conns):
            if not c.channel.close_if_stalled(now):
                c.close_if_frame_stalled(now, limit)

    def detach(self, conn: ControlConn) -> socket.socket:
        self.conns.discard(conn)
        return conn.channel.detach()

    def close(self) -> None:
        if self.sock is not None:
            self.ctx.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
        if self.owns_path and self.path:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._bound:
                    os.unlink(self.path)
                else:
                    # someone removed ours, and another daemon may listen on this path now
                    log.warning("the socket file is not the one this daemon made; left in "
                                "place", socket=self.path)
            except OSError:
                pass
        for c in list(self.conns):
            c.channel.flush()
            c.channel.close("daemon exiting")


def _check_socket_dir(where: str) -> None:
    """Refuse a socket directory someone else could swap the socket in: owned by another
    user (root aside), or writable by group or others without the sticky bit (/tmp has it).
    Peer credentials protect the daemon; this protects its clients, which would otherwise
    talk to whatever listens there (a /tmp/emitterd-<uid> made first by another user).
    Every directory above it must be root's or ours too, and not writable by others
    without the sticky bit (whoever may rename one may swap what is below; a group-writable
    one such as Debian's /usr/local, 2775 root:staff, trusts its group), and so must a
    symbolic link on the way: the path as given and as reached are checked."""
    euid = os.geteuid()
    seen = set()
    for p in _ancestors(where) + _ancestors(os.path.realpath(where)):
        if p in seen:
            continue
        seen.add(p)
        st = os.lstat(p)
        # a link of root's or ours is judged by its owner; where it leads, as reached
        who = swappable_by(st, euid, group_trusted=p != where)
        if who is None:
            continue
        what = "socket directory %s" % where if p == where else "%s (above socket directory " \
            "%s)" % (p, where)
        if who == "owner":
            raise RuntimeError("%s belongs to uid %d, not to this user: anyone owning it could "
                               "replace the socket; refusing" % (what, st.st_uid))
        raise RuntimeError("%s is writable by %s (mode %04o, no sticky bit): %s could "
                           "replace the socket; refusing"
                           % (what, "others" if who == "others" else "its group",
                              stat.S_IMODE(st.st_mode), "anyone" if who == "others"
                              else "its group's members"))


def _ancestors(path: str) -> list:
    """`path` (absolute) and every directory above it, from / down."""
    out = [path]
    while True:
        parent = os.path.dirname(out[-1])
        if parent == out[-1]:
            return out[::-1]
        out.append(parent)


def bind_control_socket(path: str, mode: int) -> socket.socket:
    """Bind the control socket; replace a stale file, refuse when a daemon answers there.
    RuntimeError, with the path and the reason, when it cannot."""
    try:
        return _bind(path, mode)
    except OSError as e:
        raise RuntimeError("cannot create the control socket %s: %s"
                           % (path, e.strerror or e)) from None


def _bind(path: str, mode: int) -> socket.socket:
    ensure_private_dir(os.path.dirname(path) or ".")
    _check_socket_dir(os.path.dirname(os.path.abspath(path)))
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError("%s exists and is not a socket; refusing to replace it" % path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)        # stale: nobody listens
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise RuntimeError("cannot probe existing socket %s: %s" % (path, e))
        else:
            raise RuntimeError("another daemon is already listening on %s" % path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o177)      # never exposed wider than 0600 before the chmod below
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
