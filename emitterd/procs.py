"""The only code that forks, signals and reaps processes, and makes worker socketpairs."""
import errno
import gc
import os
import signal
import socket
import sys
import traceback
from typing import Callable, NoReturn, Optional, Sequence

from setproctitle import setproctitle


def spawn(title: str, child_main: Callable[[socket.socket], None]) -> tuple:
    """Fork a child running child_main(its end of a fresh socketpair); return (pid, parent end).

    The child keeps only stdio and its own socket, so it holds no other worker's pipe and
    sees EOF as soon as the parent is gone.
    """
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    # Until the child has dropped the parent's handlers and wakeup fd, a signal sent to it
    # would be written into the PARENT's wakeup pipe: keep them blocked across the fork.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        raise
    if pid == 0:
        run_child(title, child_end, child_main, old_mask)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    child_end.close()
    parent_end.setblocking(False)
    return pid, parent_end


HANDLED_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1,
                   signal.SIGUSR2}


def run_child(title: str, sock: socket.socket, child_main: Callable[[socket.socket], None],
              old_mask: set) -> NoReturn:
    """In a freshly forked child: drop the parent's signal set-up and every fd but stdio and
    `sock`, take `title`, run child_main(sock) and exit (never returns)."""
    code = 0
    try:
        # Objects inherited from the parent must never be finalized here: a collected
        # socket object would close an fd number this child may have reused.
        gc.freeze()
        _own_process_group()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        # Ctrl-C and reloads are the parent's business; it ends workers itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)   # a pending SIGTERM acts now
        keep = sock.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, 1 << 20)
        setproctitle(title)
        child_main(sock)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0
    except BaseException:
        traceback.print_exc()
        code = 70
    finally:
        try:
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code)


def _own_process_group() -> None:
    """Leave the daemon's process group: a signal sent to the whole group (`kill -TERM -PGID`,
    `timeout`, a shell's job control) is then the daemon's alone, which stops its children
    itself, after draining; it used to kill the workers and helpers before the drain began.
    A child still dies with the daemon (EOF on its socket, or PR_SET_PDEATHSIG)."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass          # already a group leader (or not allowed): nothing to gain


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this child when its parent dies (for children that may
    block where they cannot notice EOF on their pipe, e.g. inside SQLite's lock retries)."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() == 1:
        os._exit(0)          # the parent died before the prctl took effect


# The daemon's children that serve it rather than a pool, by module: their process titles.
SERVICE_TITLES = {"checkpointer": "emitterd: checkpointer", "forkserver": "emitterd: fork server",
                  "spare": "emitterd: spare worker"}


def service_name(cmdline: Sequence[str]) -> Optional[str]:
    """Which service child (a key of SERVICE_TITLES) a process is, from its command line:
    its title, or, for one started by spawn_module that has not set it yet, `-m emitterd.X`;
    None for a pool worker (for tests, the bench and the chaos run)."""
    cmd = " ".join(cmdline) + " "
    for name, title in SERVICE_TITLES.items():
        if cmd.startswith(title) or "-m emitterd.%s " % name in cmd:
            return name
    return None


def spawn_module(module: str, *args: str) -> tuple:
    """Start `python -m module <fd> args...` as a child, a fresh interpreter that shares no
    state with this process (SQLite's, for one: its lock table must never cross a fork);
    return (pid, parent end of a fresh socketpair whose other end is <fd>). posix_spawn: no
    copy of this (large) process is made on the way to the exec. Raises OSError."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # the service manager's variables are the daemon's only: a child that pinged the
        # watchdog or sent READY=1 would speak for it (sd_notify(3) unset_environment)
        env = {k: v for k, v in os.environ.items() if k not in _MANAGER_VARS}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        argv = [sys.executable, "-P", "-m", module, str(child_end.fileno())] + list(args)
        os.set_inheritable(child_end.fileno(), True)
        pid = os.posix_spawn(argv[0], argv, env, setpgroup=0)   # see _own_process_group
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()
    parent_end.setblocking(False)
    return pid, parent_end


def helper_main(fd: int, title: str) -> socket.socket:
    """First steps of a process started by spawn_module: keep only stdio and the socket
    (fd), die with the parent, leave Ctrl-C and reloads to it, take `title`."""
    os.closerange(3, fd)
    os.closerange(fd + 1, 1 << 20)
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setproctitle(title)
    return socket.socket(fileno=fd)


_MANAGER_VARS = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID",
                           "LISTEN_FDS", "LISTEN_FDNAMES"})


def fork_orphan(title: str, sock: socket.socket, child_main: Callable[[socket.socket], None],
                prepare: Callable[[], None]) -> int:
    """Fork a child that runs child_main(sock) (after prepare()) with an intermediate process
    in between, which exits at once: the child is re-parented to the nearest subreaper (the
    daemon, see become_subreaper). Returns the child's pid; runs in the fork server."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            try:
                pid = os.fork()
            except OSError as e:
                # out of processes or memory: the fork server reports it (no traceback)
                pid = -(e.errno or errno.EAGAIN)
            if pid == 0:
                os.close(w)
                prepare()
                run_child(title, sock, child_main, set())
        except BaseException:
            traceback.print_exc()
            os._exit(70)
        try:
            os.write(w, pid.to_bytes(4, "little", signed=True))
        except OSError:
            pass    # the fork server died meanwhile (with the daemon): the child sees EOF
        os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 4)
    finally:
        os.close(r)
        os.waitpid(middle, 0)
    if len(got) != 4:
        raise OSError("the intermediate process could not fork the child")
    pid = int.from_bytes(got, "little", signed=True)
    if pid < 0:
        raise OSError(-pid, os.strerror(-pid))
    return pid


def become_subreaper() -> None:
    """Linux: orphaned descendants (workers whose forking intermediate exited, see
    forkserver) are re-parented to this process, so it reaps them like its own children."""
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def kill(pid: int, sig: int) -> bool:
    """Send a signal; False when the process is already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


def reap() -> list:
    """(pid, wait status) of every child that has exited, without blocking."""
    out = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        out.append((pid, status))
    return out


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        try:
            return "killed by %s" % signal.Signals(os.WTERMSIG(status)).name
        except ValueError:
            return "killed by signal %d" % os.WTERMSIG(status)
    return "exited with status %d" % os.waitstatus_to_exitcode(status)
