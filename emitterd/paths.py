"""Default locations of the control socket and the data dir (PROTOCOL §2, DESIGN §6)."""
import os
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
