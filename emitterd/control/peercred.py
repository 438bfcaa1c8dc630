"""Who is at the other end of a Unix socket: SO_PEERCRED's pid, uid and gid, and the
peer's supplementary groups (SO_PEERGROUPS), all as they were when it connected."""
import errno
import socket
import struct
from typing import NamedTuple, Tuple

_UCRED = struct.Struct("iII")
# not in Python 3.11's socket module; Linux >= 4.13
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_GID = struct.Struct("I")
_FEW_GROUPS = 64                 # bytes enough for most peers; else the kernel says ERANGE
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
    for size in (_FEW_GROUPS * _GID.size, _MAX_GROUPS * _GID.size):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE:
                continue
            return _from_proc(pid)      # an older kernel: the peer's groups now, not at connect
        return tuple(g for (g,) in _GID.iter_unpack(raw))
    return _from_proc(pid)


def _from_proc(pid: int) -> Tuple[int, ...]:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()
