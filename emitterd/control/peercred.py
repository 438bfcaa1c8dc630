"""Who is at the other end of a Unix socket: SO_PEERCRED's pid, uid and gid, and the
peer's supplementary groups (SO_PEERGROUPS), all as they were when it connected."""
import ctypes
import errno
import socket
import struct
from typing import NamedTuple, Optional, Tuple

_UCRED = struct.Struct("iII")
# not in Python 3.11's socket module; Linux >= 4.13
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")
_PY_MAX_BUFLEN = 1024            # socket.getsockopt's largest buffer
_MAX_GROUPS = 65536              # NGROUPS_MAX


class Peer(NamedTuple):
    pid: int
    uid: int
    gid: int
    groups: Tuple[int, ...]      # primary gid first, then the supplementary ones


UNKNOWN = Peer(0, -1, -1, ())


def peer_of(sock: socket.socket) -> Peer:
    """The peer's credentials; UNKNOWN (a uid nobody has) if the kernel will not say."""
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _UCRED.size))
    except OSError:
        return UNKNOWN
    return Peer(pid, uid, gid, (gid,) + _supplementary(sock, pid))


def _supplementary(sock: socket.socket, pid: int) -> Tuple[int, ...]:
    try:
        # socket.getsockopt returns at most 1024 bytes: 256 groups, enough for nearly all
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, _PY_MAX_BUFLEN)
    except OSError as e:
        if e.errno != errno.ERANGE:
            return _from_proc(pid)      # an older kernel: the peer's groups now, not at connect
        raw = _getsockopt_large(sock.fileno(), _MAX_GROUPS * _GID.size)
        if raw is None:
            return _from_proc(pid)
    return tuple(g for (g,) in _GID.iter_unpack(raw))


def _getsockopt_large(fd: int, size: int) -> Optional[bytes]:
    """SO_PEERGROUPS into a buffer larger than socket.getsockopt allows, through libc."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(size)
        n = ctypes.c_uint32(size)
        if libc.getsockopt(fd, socket.SOL_SOCKET, _SO_PEERGROUPS, buf, ctypes.byref(n)) != 0:
            return None
        return buf.raw[:n.value]
    except (OSError, AttributeError):
        return None


def _from_proc(pid: int) -> Tuple[int, ...]:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()
