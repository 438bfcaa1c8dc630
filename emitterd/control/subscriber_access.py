"""May this client name that `unix:` subscriber? The daemon connects to it with its own rights,
which may reach sockets the client cannot (a confused deputy): a client may only name a socket
it could connect to itself, and never the daemon's own control socket."""
import os
import stat
from typing import Any, Optional, Sequence

from emitterd.control.peercred import Peer
from emitterd.errors import PERMISSION_DENIED, ProtocolError, invalid


def check(ctx: Any, peer: Peer, subscriber: Optional[str], field: str) -> None:
    """Raise ProtocolError unless the client `peer` may make the daemon
    deliver to `subscriber`."""
    if subscriber is None:
        return
    path = subscriber[len("unix:"):]
    # the socket it listens on: --socket's, or (socket activation) the inherited one's
    if any(_same_file(path, own) for own in {ctx.cfg.socket, ctx.server.path} if own):
        raise invalid(field, "the subscriber is the daemon's own control socket")
    uid = peer.uid
    if uid in (0, os.geteuid()):
        return       # root could anyway; the daemon's own user gains nothing
    why = why_not(path, uid, peer.groups)
    if why is not None:
        raise ProtocolError(PERMISSION_DENIED, "uid %d could not connect to %s itself (%s): "
                            "the daemon does not connect there for it" % (uid, path, why),
                            {"field": field})


def why_not(path: str, uid: int, groups: Sequence[int]) -> Optional[str]:
    """Why `uid` (in `groups`) could not connect to the unix socket `path`, judged by mode
    bits (ACLs are not read: they can only be refused here, never let through); None if
    it could. A path that does not exist yet needs searchable directories up to it.

    The path is walked as the client's connect() would walk it, one name at a time, a
    symbolic link followed only from a directory the client may search: resolved with the
    daemon's rights first, it named (and judged) a link's target inside a directory the
    client cannot look into."""
    todo = [n for n in path.split("/") if n]
    d = "/"
    hops = 0
    while todo:
        st = _stat(d)
        if st is None:
            return None          # not there yet: connect() will say so, to the daemon alone
        if not _allows(st, uid, groups, 0o1):
            return "no search permission on directory %s" % d
        name = todo.pop(0)
        here = os.path.join(d, name)
        try:
            lst = os.lstat(here)
        except OSError:
            return None
        if stat.S_ISLNK(lst.st_mode):
            hops += 1
            if hops > 40:
                return "too many symbolic links in %s" % path
            try:
                target = os.readlink(here)
            except OSError:
                return None
            todo = [n for n in target.split("/") if n] + todo
            if target.startswith("/"):
                d = "/"
            continue
        if not todo:
            if not _allows(lst, uid, groups, 0o2):
                return "no write permission on %s" % here
            return None
        if name == "..":
            d = os.path.dirname(d) or "/"
        elif name != ".":
            d = here
    return None


def _allows(st: os.stat_result, uid: int, groups: Sequence[int], bit: int) -> bool:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid:
        return bool(mode & (bit << 6))
    if st.st_gid in groups:
        return bool(mode & (bit << 3))
    return bool(mode & bit)


def _stat(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except OSError:
        return None


def _same_file(a: str, b: str) -> bool:
    if a.startswith("\0") or b.startswith("\0"):
        return a == b            # abstract names (an activated socket): no file to compare
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
