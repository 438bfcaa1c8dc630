"""systemd integration with the standard library only (DESIGN §6).

* Readiness and status: the sd_notify(3) datagram protocol on $NOTIFY_SOCKET
  (``notify()`` for one-off messages, ``Notifier`` for the daemon's loop).
* Watchdog: ``Notifier.watchdog_interval()`` reads $WATCHDOG_USEC/$WATCHDOG_PID
  like sd_watchdog_enabled(3) and suggests pinging every half of it.
* Socket activation: ``listen_fds()`` takes the sockets passed with
  $LISTEN_PID/$LISTEN_FDS (fds from 3 on) like sd_listen_fds(3).
* Journal: ``journal_stream_active()`` tells whether stderr is connected to
  journald ($JOURNAL_STREAM, see systemd.exec(5)).

Nothing here blocks or starts a thread: the notify socket is non-blocking, a
message that cannot be queued at once is dropped (the call returns False), and
no call raises for a missing or broken $NOTIFY_SOCKET.
"""
import os
import socket
import time
from typing import List, Mapping, MutableMapping, Optional, Tuple

__all__ = ["SD_LISTEN_FDS_START", "notify", "Notifier", "listen_fds", "listen_fds_with_names",
           "journal_stream_active"]

SD_LISTEN_FDS_START = 3

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _notify_address(env: Mapping[str, str]) -> Optional[bytes]:
    """The AF_UNIX address named by $NOTIFY_SOCKET, or None (unset, empty, or a kind we do not speak)."""
    value = env.get("NOTIFY_SOCKET") or ""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + os.fsencode(value[1:])   # abstract namespace
    if value.startswith("/"):
        return os.fsencode(value)
    return None   # unset, relative, or e.g. "vsock:..." (not supported here)


def _open_dgram() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    return sock


def notify(state: str, env: Optional[Mapping[str, str]] = None) -> bool:
    """Send one sd_notify datagram (e.g. "READY=1\\nSTATUS=...") to $NOTIFY_SOCKET.

    A name starting with '@' is in the abstract namespace. The send is non-blocking.
    Returns False when NOTIFY_SOCKET is unset (or not a unix address), `state` is empty,
    or the send fails; never raises.
    """
    env = os.environ if env is None else env
    addr = _notify_address(env)
    if addr is None or not state:
        return False
    try:
        data = state.encode("utf-8")
        with _open_dgram() as sock:
            return sock.sendto(data, addr) == len(data)
    except (OSError, UnicodeError, ValueError):
        return False


def _one_line(text: str) -> str:
    return " ".join(str(text).splitlines())


class Notifier:
    """Holds the notify socket open for the daemon's loop.

    One AF_UNIX SOCK_DGRAM socket, non-blocking and close-on-exec, created once.
    ``enabled`` is False when $NOTIFY_SOCKET is unset/unusable (every method then
    returns False and does nothing) and after ``close()``. Each message method
    returns True when the datagram was queued, False otherwise; none raises.

    The environment is read when needed from the mapping given (os.environ by
    default), so the same object works in tests with a plain dict.
    """

    __slots__ = ("_env", "_addr", "_sock", "enabled")

    def __init__(self, env: Optional[Mapping[str, str]] = None) -> None:
        self._env = os.environ if env is None else env
        self._addr = _notify_address(self._env)
        self._sock: Optional[socket.socket] = None
        if self._addr is not None:
            try:
                self._sock = _open_dgram()
            except OSError:
                self._sock = None
        self.enabled = self._sock is not None

    # -- plumbing ---------------------------------------------------------------------------

    def fileno(self) -> int:
        """The notify socket's fd (-1 when disabled), e.g. for a list of fds a forked child keeps closed."""
        return self._sock.fileno() if self._sock is not None else -1

    def send(self, state: str) -> bool:
        """Send a raw sd_notify message (newline-separated VAR=value assignments)."""
        sock = self._sock
        if sock is None or not state:
            return False
        try:
            data = state.encode("utf-8")
            return sock.sendto(data, self._addr) == len(data)
        except (OSError, UnicodeError, ValueError):
            # EAGAIN (the manager's queue is full), ECONNREFUSED/ENOENT (it went away), ...:
            # dropped; the loop sends the next one on time.
            return False

    def close(self) -> None:
        sock, self._sock = self._sock, None
        self.enabled = False
        if sock is not None:
            sock.close()

    def __enter__(self) -> "Notifier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the messages ------------------------------------------------------------------------

    def ready(self, status: Optional[str] = None) -> bool:
        """READY=1 (start-up or a reload finished), with an optional STATUS= line."""
        msg = "READY=1"
        if status is not None:
            msg += "\nSTATUS=" + _one_line(status)
        return self.send(msg)

    def status(self, text: str) -> bool:
        """STATUS=<one line> (shown by `systemctl status`); newlines become spaces."""
        return self.send("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the keep-alive ping, every watchdog_interval() seconds."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: Optional[str] = None) -> bool:
        """STOPPING=1: shutdown has begun (optional STATUS= line)."""
        msg = "STOPPING=1"
        if status is not None:
            msg += "\nSTATUS=" + _one_line(status)
        return self.send(msg)

    def reloading(self, status: Optional[str] = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC= (CLOCK_MONOTONIC, µs); send ready() when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        msg = "RELOADING=1\nMONOTONIC_USEC=%d" % usec
        if status is not None:
            msg += "\nSTATUS=" + _one_line(status)
        return self.send(msg)

    def watchdog_interval(self) -> Optional[float]:
        """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC.

        Only when $WATCHDOG_PID is unset/empty or equals os.getpid() (so a forked worker
        gets None); None when there is no watchdog or the values are not valid numbers.
        It does not depend on ``enabled``: without a notify socket the pings are no-ops.
        """
        env = self._env
        try:
            usec = int(env.get("WATCHDOG_USEC") or "0")
        except ValueError:
            return None
        if usec <= 0:
            return None
        pid = env.get("WATCHDOG_PID") or ""
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        return usec / 2.0 / 1_000_000


def _socket_from_fd(fd: int) -> Optional[socket.socket]:
    """Wrap an inherited fd (family/type detected from the fd), CLOEXEC; None if it is no socket."""
    try:
        os.set_inheritable(fd, False)
    except OSError:
        return None   # not an open fd
    try:
        return socket.socket(fileno=fd)
    except OSError:
        return None   # e.g. a FIFO from ListenFIFO=: left open (CLOEXEC), not returned


def listen_fds_with_names(env: Optional[MutableMapping[str, str]] = None,
                          unset: bool = True) -> List[Tuple[str, socket.socket]]:
    """Like listen_fds(), with each socket's name from $LISTEN_FDNAMES ("unknown" when absent)."""
    env = os.environ if env is None else env
    try:
        pid_s = env.get("LISTEN_PID") or ""
        fds_s = env.get("LISTEN_FDS") or ""
        names_s = env.get("LISTEN_FDNAMES")
    finally:
        if unset:
            for var in _LISTEN_VARS:
                env.pop(var, None)
    try:
        if int(pid_s) != os.getpid():
            return []
        count = int(fds_s)
    except ValueError:
        return []
    if count <= 0:
        return []
    names = names_s.split(":") if names_s else []
    out: List[Tuple[str, socket.socket]] = []
    for i in range(count):
        sock = _socket_from_fd(SD_LISTEN_FDS_START + i)
        if sock is not None:
            out.append((names[i] if i < len(names) and names[i] else "unknown", sock))
    return out


def listen_fds(env: Optional[MutableMapping[str, str]] = None, unset: bool = True) -> List[socket.socket]:
    """Sockets passed by systemd socket activation, in the order of the .socket unit.

    $LISTEN_PID must equal os.getpid() and $LISTEN_FDS gives the count; the fds start at 3
    (SD_LISTEN_FDS_START). Each is returned as a socket.socket (family and type taken from
    the fd, blocking mode left as inherited) with CLOEXEC set; fds that are not sockets are
    skipped. With unset=True (the default) LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are removed
    from `env` (os.environ by default, which also unsets them for the process) whatever the
    outcome, so forked workers and children never see them. [] when not activated.
    """
    return [sock for _name, sock in listen_fds_with_names(env, unset)]


def journal_stream_active(env: Optional[Mapping[str, str]] = None, fd: Optional[int] = None) -> bool:
    """True when $JOURNAL_STREAM ("<st_dev>:<st_ino>") matches stderr (or `fd`).

    Then stderr is a stream connected to journald: lines need no timestamp, and the
    "<N>" priority prefix of sd-daemon(3) would be understood.
    """
    env = os.environ if env is None else env
    value = env.get("JOURNAL_STREAM") or ""
    dev_s, sep, ino_s = value.partition(":")
    if not sep:
        return False
    try:
        dev, ino = int(dev_s), int(ino_s)
        st = os.fstat(2 if fd is None else fd)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino
