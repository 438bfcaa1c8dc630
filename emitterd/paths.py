"""Default locations of the control socket and the data dir (PROTOCOL §2, DESIGN §6)."""
import os
import stat
from typing import Mapping, Optional


def default_socket_path(env: Optional[Mapping[str, str]] = None, uid: Optional[int] = None) -> str:
    """$EMITTERD_SOCKET, else $XDG_RUNTIME_DIR/emitterd/emitterd.sock, else /run (root) or /tmp."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if env.get("EMITTERD_SOCKET"):
        return env["EMITTERD_SOCKET"]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "emitterd", "emitterd.sock")
    if uid == 0:
        return "/run/emitterd/emitterd.sock"
    return "/tmp/emitterd-%d/emitterd.sock" % uid


def default_data_dir(env: Optional[Mapping[str, str]] = None, uid: Optional[int] = None) -> str:
    """$XDG_STATE_HOME/emitterd, else /var/lib/emitterd (root), else ~/.local/state/emitterd."""
    env = os.environ if env is None else env
    uid = os.getuid() if uid is None else uid
    if env.get("XDG_STATE_HOME"):
        return os.path.join(env["XDG_STATE_HOME"], "emitterd")
    if uid == 0:
        return "/var/lib/emitterd"
    home = env.get("HOME") or os.path.expanduser("~")
    return os.path.join(home, ".local", "state", "emitterd")


def swappable_by(st: os.stat_result, uid: int, group_trusted: bool = False) -> Optional[str]:
    """Who, besides root and `uid`, could swap what lies in the directory (or symbolic link)
    `st` (an lstat result) describes: "owner" (it is another user's), "others" or "group"
    (writable by them, no sticky bit; a link's mode means nothing); None if nobody. The one
    rule for the daemon's socket directory and the client's /tmp fallback."""
    if st.st_uid not in (0, uid):
        return "owner"
    if stat.S_ISLNK(st.st_mode) or st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & 0o002:
        return "others"
    if st.st_mode & 0o020 and not group_trusted:
        return "group"
    return None


def ensure_private_dir(path: str) -> None:
    """Create a directory and every missing parent with mode 0700 (existing ones untouched)."""
    path = os.path.abspath(path)
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)     # mkdir's mode is filtered by the umask
