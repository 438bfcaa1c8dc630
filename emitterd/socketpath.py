"""Reach a unix socket by its path as another local user would: one name at a time, each
directory held open (O_PATH) and judged by that user's mode bits, each symbolic link followed
only from a directory that user may search. The control check (`start`, `update`) and a
worker's connect both walk this way; the worker then connects through the file descriptor
it holds, so a link swapped in after the check leads nowhere the user could not go."""
import os
import stat
from typing import Optional, Sequence, Tuple

MAX_LINKS = 40       # Linux's own limit on links followed in one lookup
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

Rights = Tuple[int, Sequence[int]]      # (uid, the uid's groups)


class Refused(Exception):
    """The user could not reach the socket itself; str() says why (names only what the
    user could see)."""


def open_as(path: str, rights: Rights) -> int:
    """An O_PATH descriptor of the file `path` names, reached with `rights` (the caller
    closes it). Refused when the user could not connect there; OSError when the path
    leads nowhere (it does not exist, or a name on the way is no directory)."""
    uid, groups = rights
    todo = [n for n in path.split("/") if n]
    shown = "/"                  # the directory held, as the messages name it
    fd = os.open("/", _O_PATH | os.O_DIRECTORY)
    hops = 0
    try:
        while todo:
            if not _allows(os.fstat(fd), uid, groups, 0o1):
                raise Refused("no search permission on directory %s" % shown)
            name = todo.pop(0)
            if name == ".":
                continue
            nxt = os.open(name, _O_PATH, dir_fd=fd)
            st = os.fstat(nxt)
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink("", dir_fd=nxt)
                finally:
                    os.close(nxt)
                hops += 1
                if hops > MAX_LINKS:
                    raise Refused("too many symbolic links in %s" % path)
                todo = [n for n in target.split("/") if n] + todo
                if target.startswith("/"):
                    os.close(fd)
                    fd = -1
                    fd = os.open("/", _O_PATH | os.O_DIRECTORY)
                    shown = "/"
                continue
            os.close(fd)
            fd = nxt
            if not todo:
                if not _allows(st, uid, groups, 0o2):
                    raise Refused("no write permission on %s" % os.path.join(shown, name))
                return fd
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(os.path.join(shown, name))
            shown = (os.path.dirname(shown) or "/") if name == ".." else os.path.join(shown, name)
        return fd                # the path named "/" itself: connect() will say what it is
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise


def why_not(path: str, rights: Rights) -> Optional[str]:
    """Why the user could not connect to `path` itself, judged by mode bits (ACLs are not
    read: they can only be refused here, never let through); None if it could, or if the
    path leads nowhere yet (connect() will say so, to the daemon alone)."""
    try:
        os.close(open_as(path, rights))
    except Refused as e:
        return str(e)
    except OSError:
        pass
    return None


def fd_path(fd: int) -> str:
    """A path that connect() follows to the very file `fd` holds."""
    return "/proc/self/fd/%d" % fd


def _allows(st: os.stat_result, uid: int, groups: Sequence[int], bit: int) -> bool:
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid == uid:
        return bool(mode & (bit << 6))
    if st.st_gid in groups:
        return bool(mode & (bit << 3))
    return bool(mode & bit)
