"""`emitterd backup` and `emitterd restore`: a consistent copy of the event log, taken while the
daemon runs, and its return into a data directory while no daemon runs.

The copy is SQLite's VACUUM INTO: one read transaction, so it is the log as of one commit
(events, subscriptions with their checkpoints, parked events), whatever the daemon commits
meanwhile. Copying the files with cp is not: the database and its WAL change between the two
reads. A restore goes through a second VACUUM INTO (which checks every page on the way) into
the data directory, never over files a daemon might have open: it takes the directory's lock
first, and moves the log it replaces aside rather than deleting it.

Restoring rewinds the log to the backup's head, so the positions after it are given out again.
The ids the daemon generates are derived from the position and a per-store salt; a restore
draws a new salt, so no new event gets the generated id of an event the restore dropped, and
keeps the old one with the last position it covers, so a republished event of the backup is
still recognised by its generated id (eventlog.sqlite.SqliteLog._lookup_id).
"""
import errno
import glob
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import time
from typing import Any, Dict

import msgpack
import psutil

from emitterd import datalock
from emitterd.eventlog.sqlite import HEAD_SQL, SCHEMA_VERSION, TABLES, tables_of

LOG_NAME = "emitterd.db"
LOG_FILES = (LOG_NAME, LOG_NAME + "-wal", LOG_NAME + "-shm")


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what is untouched."""


def _open_existing(path: str) -> sqlite3.Connection:
    """A connection to an existing database file: never creates one where none is."""
    if not os.path.isfile(path):
        raise BackupError("no event log at %s" % path)
    try:
        # leave the directory as it was: where a WAL is (a daemon runs, or was killed) read
        # only, since a read-write connection that closes last would checkpoint and remove
        # it; where none is, read-write, which removes the WAL files it creates on close (a
        # read-only one would leave them behind, root's, where a service user runs)
        mode = "ro" if os.path.exists(path + "-wal") else "rw"
        db = sqlite3.connect("file:%s?mode=%s" % (_uri_path(path), mode), uri=True,
                             isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
    except sqlite3.Error as e:
        raise BackupError("cannot open %s: %s" % (path, e)) from None
    return db


def _uri_path(path: str) -> str:
    return os.path.abspath(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")


def summary(db: sqlite3.Connection, path: str) -> Dict[str, Any]:
    """Head, subscriptions and salt of an event log; BackupError if it is not one."""
    try:
        tables = tables_of(db)
        older = "events" in tables and "chunks" not in tables
        # the current schema, whole; or an older one (one row per event), which the daemon
        # migrates when it opens it (README: back up before upgrading)
        missing = ({"meta", "events", "subscriptions", "parked"} if older else TABLES) - tables
        if missing:
            raise BackupError("%s is not an emitterd event log (tables missing: %s)"
                              % (path, ", ".join(sorted(missing))))
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            # the daemon would refuse to start on it: better said now, before a restore
            raise BackupError("%s was written by a newer emitterd (log schema %d; this one "
                              "knows up to %d)" % (path, version, SCHEMA_VERSION))
        row = db.execute("SELECT MAX(position) FROM events" if older else HEAD_SQL).fetchone()
        subs = db.execute("SELECT count(*) FROM subscriptions").fetchone()[0]
        salt = db.execute("SELECT value FROM meta WHERE name = 'id_salt'").fetchone()
        before = db.execute("SELECT value FROM meta WHERE name = 'id_salts_before'").fetchone()
    except sqlite3.DatabaseError as e:
        raise BackupError("%s is not an emitterd event log: %s" % (path, e)) from None
    return {"head": row[0] if row and row[0] else 0, "subscriptions": subs,
            "salt": salt[0] if salt else None,
            "salts_before": msgpack.unpackb(before[0]) if before else []}


def _vacuum_into(db: sqlite3.Connection, dest: str) -> None:
    """One consistent copy of `db` at `dest` (which must not exist), on disk when it returns,
    mode 0600 from its first byte."""
    old = os.umask(0o077)
    try:
        db.execute("VACUUM INTO ?", (dest,))
    finally:
        os.umask(old)
    # VACUUM INTO does not sync what it wrote: a backup must survive a power loss too
    _fsync(dest)
    _fsync(os.path.dirname(os.path.abspath(dest)))


def _fsync(path: str) -> None:
    """fsync a file or a directory (whose entries a rename changed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backup(data_dir: str, dest: str) -> Dict[str, Any]:
    """Copy the event log of `data_dir` to the new file `dest`; works while a daemon runs."""
    if os.path.lexists(dest):
        raise _exists(dest)
    where = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(where):
        raise BackupError("directory %s does not exist" % where)
    src = os.path.join(data_dir, LOG_NAME)
    db = _open_existing(src)
    try:
        summary(db, src)      # refuses a file that is not an event log, before copying it
        _remove_dead_partials(dest)
        # The copy is made in a new directory only we can enter: a name of our own beside
        # DEST could be a symlink someone planted there, which VACUUM INTO would follow
        # (a root backup writing wherever it points).
        private = tempfile.mkdtemp(prefix="%s.partial-%d-" % (os.path.basename(dest),
                                                               os.getpid()), dir=where)
        tmp = os.path.join(private, "copy.db")
        try:
            _vacuum_into(db, tmp)
            _check(tmp)
            _place(tmp, dest)
        except (sqlite3.Error, OSError, BackupError) as e:
            raise BackupError("backup to %s failed: %s" % (dest, e)) from None
        finally:
            shutil.rmtree(private, ignore_errors=True)
    finally:
        db.close()
    # the head of the copy, not of the log (which the daemon may have moved on since)
    copy = sqlite3.connect("file:%s?mode=ro" % _uri_path(dest), uri=True)
    try:
        info = summary(copy, dest)
    finally:
        copy.close()
    info["bytes"] = os.path.getsize(dest)
    return info


def _exists(dest: str) -> BackupError:
    return BackupError("%s exists; name a new file (a backup never overwrites one)" % dest)


def _place(tmp: str, dest: str) -> None:
    """Give the finished copy its name: never over an existing DEST (link() refuses one,
    a symlink included), by rename on a filesystem without hard links."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise _exists(dest) from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dest):
            raise _exists(dest) from None
        os.rename(tmp, dest)
    _fsync(os.path.dirname(os.path.abspath(dest)))


def _remove_dead_partials(dest: str) -> None:
    """What a killed backup to `dest` left (its private directory, or the unfinished copy
    and journals of an older emitterd); a backup still running keeps its own."""
    for path in glob.glob(glob.escape(dest) + ".partial-*"):
        m = re.fullmatch(r"\.partial-(\d+)(-\w+)?", path[len(dest):])
        if not m or psutil.pid_exists(int(m.group(1))):
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _unlink_quietly(path)


def restore(source: str, data_dir: str) -> Dict[str, Any]:
    """Make the backup `source` the event log of `data_dir`, which no daemon may be using; a
    log already there is moved aside into a replaced-<time> directory, never deleted."""
    src = _open_existing(source)
    try:
        info = summary(src, source)
        if info["salt"] is None:
            raise BackupError("%s is not an emitterd event log (no id salt)" % source)
        try:
            _check(source)
        except sqlite3.DatabaseError as e:
            raise BackupError("%s is damaged: %s" % (source, e)) from None
        try:
            lock_fd = datalock.lock(data_dir)
        except RuntimeError as e:
            raise BackupError("%s; stop it before restoring (nothing was changed)" % e) from None
        try:
            info["replaced"] = _replace(src, info, data_dir)
        finally:
            os.close(lock_fd)
    finally:
        src.close()
    return info


def _replace(src: sqlite3.Connection, info: Dict[str, Any], data_dir: str) -> str:
    """restore() with the directory locked: the path the old log went to, or "". The copy is
    made and checked beside the old log first, so a backup that cannot be read leaves the
    data directory as it was."""
    tmp = os.path.join(data_dir, "%s.restoring" % LOG_NAME)
    try:
        _owned_like(os.path.join(data_dir, datalock.LOCK_NAME), data_dir)
        _unlink_quietly(tmp)
        _vacuum_into(src, tmp)
        _check(tmp)
        _new_salt(tmp, info)
        _owned_like(tmp, data_dir)
    except (sqlite3.Error, OSError, BackupError) as e:
        _unlink_quietly(tmp)
        raise BackupError("restore into %s failed, nothing was changed: %s" % (data_dir, e)) \
            from None
    moved = ""
    try:
        moved = _move_aside(data_dir)
        os.rename(tmp, os.path.join(data_dir, LOG_NAME))
        _fsync(data_dir)
    except OSError as e:
        raise BackupError("restore into %s failed: %s%s" % (
            data_dir, e, "; the log it replaced is in %s" % moved if moved else "")) from None
    return moved


def _check(path: str) -> None:
    """SQLite's quick_check of a database file; BackupError with what it found if not ok."""
    db = sqlite3.connect("file:%s?mode=ro" % _uri_path(path), uri=True)
    try:
        rows = [r[0] for r in db.execute("PRAGMA quick_check(5)")]
    finally:
        db.close()
    if rows != ["ok"]:
        raise BackupError("%s is damaged: %s" % (path, "; ".join(map(str, rows))))


def _move_aside(data_dir: str) -> str:
    """Move the log files in `data_dir` (database, WAL, shared memory: together, or SQLite
    would replay a WAL onto the wrong database) into a new subdirectory; its path, or ""."""
    present = [n for n in LOG_FILES if os.path.lexists(os.path.join(data_dir, n))]
    if not present:
        return ""
    if LOG_NAME not in present:
        # a WAL without its database: an earlier restore was killed between these renames;
        # they go where it put the database, so the replaced log stays whole
        earlier = _interrupted_aside(data_dir, present)
        if earlier:
            for name in present:
                os.rename(os.path.join(data_dir, name), os.path.join(earlier, name))
            _fsync(data_dir)
            return earlier
    base = aside = os.path.join(data_dir, "replaced-%s" % time.strftime("%Y%m%dT%H%M%S"))
    n = 1
    while True:
        try:
            os.mkdir(aside, 0o700)         # ours, new: never a name someone planted
            break
        except FileExistsError:            # two restores within a second
            n += 1
            aside = "%s-%d" % (base, n)
    os.chmod(aside, 0o700)
    _owned_like(aside, data_dir)
    for name in present:
        os.rename(os.path.join(data_dir, name), os.path.join(aside, name))
    _fsync(data_dir)
    return aside


def _interrupted_aside(data_dir: str, left: list) -> str:
    """The newest replaced-* directory holding a database but none of the files `left` in
    `data_dir` (what a restore killed inside _move_aside leaves: the WAL, or the shared
    memory alone when it was killed after moving the WAL too), or ""."""
    for path in sorted(glob.glob(os.path.join(glob.escape(data_dir), "replaced-*")),
                       key=lambda p: os.lstat(p).st_mtime, reverse=True):
        if os.path.isdir(path) and not os.path.islink(path) \
                and os.path.lexists(os.path.join(path, LOG_NAME)) \
                and not any(os.path.lexists(os.path.join(path, n)) for n in left):
            return path
    return ""


def _owned_like(path: str, data_dir: str) -> None:
    """Give what a restore creates the data directory's owner: root restores, but the daemon
    runs as its own user (systemd's StateDirectory) and could not open a root-owned log."""
    st = os.stat(data_dir)
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
        # the link itself if one was planted there meanwhile, never what it points to
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)


def _new_salt(path: str, info: Dict[str, Any]) -> None:
    """Give the restored log a new id salt, keeping the old ones with the last position each
    covers (see the module's docstring)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        history = [list(s) for s in info["salts_before"]]
        history.append([info["salt"], info["head"]])
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('id_salts_before', ?)",
                   (msgpack.packb(history),))
        db.execute("UPDATE meta SET value = ? WHERE name = 'id_salt'",
                   (secrets.randbits(60).to_bytes(8, "big"),))
        db.execute("COMMIT")
    finally:
        db.close()
    _fsync(path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
