"""One daemon per data directory: a lock on <data_dir>/emitterd.lock, held for the daemon's life.

A second daemon on the same log would take the positions the first takes (each caches its
head), so one of them would fail its publishes (SQLite refuses a position taken), and both
would run the same stored pools, each saving its own checkpoints for them: the second one
refuses to start instead. The kernel drops the lock the moment the daemon dies, however it
dies. It is an fcntl record lock (lockf), not flock: a record lock belongs to the process
and does not pass to a child across fork, so even a child that kept the fd (none does
today: the helpers are exec'd and close their fds) could never keep a successor out.
"""
import errno
import fcntl
import os
import stat

from emitterd.paths import ensure_private_dir

LOCK_NAME = "emitterd.lock"


def lock(data_dir: str) -> int:
    """Take the data directory's lock for this process and write our pid into the file;
    return its fd (keep it open: closing any fd of the file in this process drops the
    lock). RuntimeError, naming the holder's pid, when another process holds it, and
    with the path and the reason when the directory cannot be used."""
    path = os.path.join(data_dir, LOCK_NAME)
    try:
        ensure_private_dir(data_dir)
        st = os.stat(data_dir)
        if st.st_mode & stat.S_IWOTH:
            raise RuntimeError("data directory %s is writable by every user (mode %04o): "
                               "anyone could replace the event log; chmod o-w it"
                               % (data_dir, stat.S_IMODE(st.st_mode)))
        # never through a link: whoever owns the directory (a service user, when root runs
        # restore) could point emitterd.lock at /etc/shadow, which we would truncate
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
                     | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise RuntimeError("cannot use data directory %s: %s is a symbolic link (remove "
                               "it; the lock is a plain file)" % (data_dir, path)) from None
        where = "" if e.filename in (None, data_dir) else " (%s)" % e.filename
        raise RuntimeError("cannot use data directory %s: %s%s"
                           % (data_dir, e.strerror or e, where)) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise RuntimeError("cannot use data directory %s: %s is not a plain file of its own "
                           "(%s); remove it" % (data_dir, path, "a hard link to another "
                                                "name" if stat.S_ISREG(st.st_mode)
                                                else "not a regular file"))
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise RuntimeError("data directory %s is in use by another emitterd%s; "
                               "only one daemon may use a data directory"
                               % (data_dir, " (pid %d)" % holder if holder else "")) from None
        raise RuntimeError("cannot lock %s: %s" % (path, e.strerror or e)) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"%d\n" % os.getpid(), 0)
    except OSError:
        pass        # the pid is for the message above; the lock is what counts
    return fd


def _holder(fd: int) -> int:
    """The pid the holder wrote, or 0 (not written yet, or unreadable)."""
    try:
        return int(os.pread(fd, 32, 0).strip() or 0)
    except (OSError, ValueError):
        return 0
