"""May this client name that `unix:` subscriber? The daemon connects to it with its own rights,
which may reach sockets the client cannot (a confused deputy): a client may only name a socket
it could connect to itself, and never the daemon's own control socket."""
import os
from typing import Any, Optional

from emitterd import socketpath
from emitterd.control.peercred import Peer
from emitterd.errors import PERMISSION_DENIED, ProtocolError, invalid


def check(ctx: Any, peer: Peer, subscriber: Optional[str], field: str) -> Optional[list]:
    """Raise ProtocolError unless the client `peer` may make the daemon deliver to
    `subscriber`. Returns the rights ([uid, groups]) the workers reach it with, every time
    they connect (socketpath): None when nothing is to be checked, for root and the
    daemon's own user."""
    if subscriber is None:
        return None
    path = subscriber[len("unix:"):]
    # the socket it listens on: --socket's, or (socket activation) the inherited one's
    if any(_same_file(path, own) for own in {ctx.cfg.socket, ctx.server.path} if own):
        raise invalid(field, "the subscriber is the daemon's own control socket")
    uid = peer.uid
    if uid in (0, os.geteuid()):
        return None      # root could anyway; the daemon's own user gains nothing
    rights = [uid, sorted(peer.groups)]
    why = socketpath.why_not(path, rights)
    if why is not None:
        raise ProtocolError(PERMISSION_DENIED, "uid %d could not connect to %s itself (%s): "
                            "the daemon does not connect there for it" % (uid, path, why),
                            {"field": field})
    return rights


def _same_file(a: str, b: str) -> bool:
    if a.startswith("\0") or b.startswith("\0"):
        return a == b            # abstract names (an activated socket): no file to compare
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
