"""`emitterd backup` / `emitterd restore` (emitterd/backup.py) against a real daemon and
SQLite file: a backup taken while publishes go on is the log as of one commit; a restore
brings back its events, subscriptions and checkpoints, keeps the log it replaces, refuses
while a daemon runs, and gives no new event the generated id of an event it dropped."""
from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Tuple

import pytest

from old_logs import write_v2_log
from waits import wait_for

BATCH = 50


def emitterd(*args: Any, timeout: float = 60) -> Tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "emitterd"] + [str(a) for a in args],
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       env={k: v for k, v in os.environ.items() if not k.startswith("EMITTERD_")})
    return r.returncode, r.stdout, r.stderr


def events(n: int, start: int) -> List[dict]:
    return [{"stream": "s-%d" % ((start + i) % 7), "type": "t", "data": {"n": start + i}}
            for i in range(n)]


def read_events(d: Any, first: int, last: int) -> Dict[int, dict]:
    """Events first..last as delivered (with their ids), through a new attached pool."""
    c = d.client()
    key = c.start({"name": "read-%d-%d" % (first, last), "type": "stream", "selector": "$all",
                   "start_from": first})["key"]
    wait_for(lambda: any(w["state"] == "ready" for w in c.status(key)["workers"]), 20,
             "a ready worker in the reading pool")
    got: Dict[int, dict] = {}
    with c.attach(key) as consumer:
        for batch in consumer.batches(timeout=10):
            consumer.ack([e["position"] for e in batch])
            got.update((e["position"], e) for e in batch if e["position"] <= last)
            if len(got) == last - first + 1:
                break
    c.stop(key, delete=True)
    assert sorted(got) == list(range(first, last + 1)), "events %d..%d not all read" % (first, last)
    return got


@pytest.mark.timeout(120)
def test_backup_while_publishing_then_restore(make_daemon: Any, short_tmp: str) -> None:
    d = make_daemon()
    c = d.client()
    key = c.start({"name": "audit", "type": "stream", "selector": "$all", "start_from": "origin"})["key"]
    c.publish(events(BATCH, 0))
    done = threading.Event()
    published: List[List[int]] = []

    def publisher() -> None:
        with d.client() as pc:
            k = 1
            while not done.is_set():
                published.append(pc.publish(events(BATCH, k * BATCH))["positions"])
                k += 1

    t = threading.Thread(target=publisher)
    t.start()
    dest = os.path.join(short_tmp, "backup.db")
    try:
        rc, out, err = emitterd("backup", "--data-dir", d.data_dir, dest)
    finally:
        done.set()
        t.join(30)
    assert rc == 0, err
    assert len(published) >= 1
    assert os.stat(dest).st_mode & 0o777 == 0o600
    with sqlite3.connect("file:%s?mode=ro" % dest, uri=True) as b:
        head = b.execute("SELECT max(last) FROM chunks").fetchone()[0]
        subs = [r[0] for r in b.execute("SELECT key FROM subscriptions")]
    # one commit's log: whole publishes only, and what the command said
    assert head % BATCH == 0 and head >= BATCH
    assert "head %d, 1 subscription(s)" % head in out, out
    assert subs == [key]

    extra = c.publish(events(3, 10_000))["positions"]     # after the backup: dropped by restore
    before = read_events(d, head, head + 1)
    lost = before[head + 1]          # the first event the restore drops
    assert d.stop() == 0

    # while a daemon runs on the directory, restore refuses and changes nothing
    d.start()
    listing = sorted(os.listdir(d.data_dir))
    rc, out, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 1 and "in use by another emitterd" in err and "nothing was changed" in err, err
    assert sorted(os.listdir(d.data_dir)) == listing
    assert d.client().ping()["head"] >= extra[-1]
    assert d.stop() == 0

    rc, out, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    assert "head %d, 1 subscription(s)" % head in out
    aside = [n for n in os.listdir(d.data_dir) if n.startswith("replaced-")]
    assert len(aside) == 1 and aside[0] in out
    with sqlite3.connect("file:%s?mode=ro" % os.path.join(d.data_dir, aside[0], "emitterd.db"),
                         uri=True) as old:
        assert old.execute("SELECT max(last) FROM chunks").fetchone()[0] == extra[-1]

    d.start()
    c = d.client()
    assert c.ping()["head"] == head
    st = c.status(key)
    assert st["subscription"]["name"] == "audit" and st["checkpoint"] <= head
    # a new event takes the dropped event's position, not its generated id
    new = c.publish(events(1, 20_000))["positions"][0]
    assert new == head + 1
    now = read_events(d, head, new)
    assert now[new]["id"] != lost["id"]
    # an event of the backup, republished with its generated id, is recognised...
    kept = before[head]
    again = {"stream": kept["stream"], "type": kept["type"], "data": kept["data"], "id": kept["id"]}
    assert c.publish([again])["positions"] == [head]
    # ...and the dropped one, republished with its id, is stored again, once
    lost_again = {"stream": lost["stream"], "type": lost["type"], "data": lost["data"],
                  "id": lost["id"]}
    assert c.publish([lost_again])["positions"] == [head + 2]
    assert c.publish([lost_again])["positions"] == [head + 2]
    assert c.ping()["head"] == head + 2


def test_backup_and_restore_refuse_bad_paths(short_tmp: str) -> None:
    data = os.path.join(short_tmp, "data")
    os.mkdir(data)
    rc, _, err = emitterd("backup", "--data-dir", data, os.path.join(short_tmp, "b.db"))
    assert rc == 1 and "no event log at %s" % os.path.join(data, "emitterd.db") in err, err
    assert os.listdir(data) == [] and not os.path.exists(os.path.join(short_tmp, "b.db"))

    taken = os.path.join(short_tmp, "taken.db")
    with open(taken, "w") as f:
        f.write("mine")
    rc, _, err = emitterd("backup", "--data-dir", data, taken)
    assert rc == 1 and "exists" in err
    assert open(taken).read() == "mine"

    not_a_log = os.path.join(short_tmp, "other.db")
    with sqlite3.connect(not_a_log) as db:
        db.execute("CREATE TABLE meta (name TEXT, value BLOB)")
    for bad, why in ((taken, "not an emitterd event log"), (not_a_log, "not an emitterd event log"),
                     (os.path.join(short_tmp, "missing.db"), "no event log at")):
        rc, _, err = emitterd("restore", "--data-dir", data, bad)
        assert rc == 1 and why in err, (bad, err)
        assert os.listdir(data) == [], "restore of %s changed %s" % (bad, data)

    rc, _, err = emitterd("backup", "--data-dir", data)
    assert rc == 2 and "DEST" in err
    rc, _, err = emitterd("backup", "--data-dir", data, "")
    assert rc == 2 and "an empty path" in err, err


NOBODY = 65534


@pytest.mark.timeout(60)
def test_a_restore_by_root_leaves_the_log_to_the_daemons_user(make_daemon: Any, short_tmp: str) -> None:
    """The daemon runs as its own user (systemd's StateDirectory); root restores. What the
    restore creates belongs to the data directory's owner, so that daemon can open it."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the test chowns the data directory to uid 65534")
    d = make_daemon()
    head = d.client().publish(events(10, 0))["positions"][-1]
    dest = os.path.join(short_tmp, "b.db")
    assert emitterd("backup", "--data-dir", d.data_dir, dest)[0] == 0
    assert d.stop() == 0
    for root, dirs, files in os.walk(d.data_dir):
        for name in dirs + files + ["."]:
            os.chown(os.path.join(root, name), NOBODY, NOBODY)
    rc, out, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    for root, dirs, files in os.walk(d.data_dir):
        for name in dirs + files:
            st = os.stat(os.path.join(root, name))
            assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY), os.path.join(root, name)
    # and that user can do what its daemon does there: lock the directory, write the log
    # (a forked child: this machine's interpreter may be out of that user's reach to exec)
    os.chmod(d.root, 0o755)               # mkdtemp's 0700 would stop uid 65534 on the way
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            from emitterd import datalock
            os.close(datalock.lock(d.data_dir))
            db = sqlite3.connect(os.path.join(d.data_dir, "emitterd.db"), isolation_level=None)
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO meta (name, value) VALUES ('restore-test', x'00')")
            db.execute("COMMIT")
            assert db.execute("SELECT max(last) FROM chunks").fetchone()[0] == head
            db.close()
            code = 0
        except BaseException as e:  # noqa: BLE001 - reported through the exit status
            os.write(2, ("as uid %d: %r\n" % (NOBODY, e)).encode())
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "uid 65534 cannot use the restored log"


@pytest.mark.timeout(60)
def test_a_damaged_backup_is_refused_and_changes_nothing(make_daemon: Any, short_tmp: str) -> None:
    """A restore checks the backup (copied and quick_check'ed beside the old log) before it
    moves the old log aside: a damaged one leaves the data directory as it was. A backup
    leaves a killed daemon's WAL where it is, and names a missing directory."""
    d = make_daemon()
    d.client().publish(events(3000, 0))
    dest = os.path.join(short_tmp, "b.db")
    assert emitterd("backup", "--data-dir", d.data_dir, dest)[0] == 0
    d.proc.kill()                      # SIGKILL: the WAL stays, and the backup must leave it
    d.proc.wait(10)
    before = {n: os.path.getsize(os.path.join(d.data_dir, n)) for n in os.listdir(d.data_dir)}
    assert "emitterd.db-wal" in before
    assert emitterd("backup", "--data-dir", d.data_dir, os.path.join(short_tmp, "c.db"))[0] == 0
    assert {n: os.path.getsize(os.path.join(d.data_dir, n)) for n in os.listdir(d.data_dir)} \
        == before
    rc, _, err = emitterd("backup", "--data-dir", d.data_dir,
                          os.path.join(short_tmp, "nodir", "x.db"))
    assert rc == 1 and "directory %s does not exist" % os.path.join(short_tmp, "nodir") in err
    size = os.path.getsize(dest)
    with open(dest, "r+b") as f:       # damage pages past the schema
        f.seek(size // 2)
        f.write(b"\xff" * 20000)
    rc, out, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 1 and "damaged" in err, (rc, err)
    assert {n: os.path.getsize(os.path.join(d.data_dir, n)) for n in os.listdir(d.data_dir)} \
        == before, "a refused restore changed the data directory"
    d.start()
    assert d.client().ping()["head"] == 3000


@pytest.mark.timeout(90)
def test_a_restore_interrupted_between_its_renames_is_refused_then_run_again(
        make_daemon: Any, short_tmp: str) -> None:
    """restore moves the old log aside, then renames the checked copy in: killed between the
    two, the data directory has no emitterd.db, and a start used to begin a new, empty log
    there (positions from 1 again). It refuses, naming the restore; running it again ends it."""
    d = make_daemon()
    d.client().publish(events(100, 0))
    dest = os.path.join(short_tmp, "b.db")
    assert emitterd("backup", "--data-dir", d.data_dir, dest)[0] == 0
    d.client().publish(events(10, 100))
    assert d.stop() == 0
    # the state a restore killed at its second rename leaves
    aside = os.path.join(d.data_dir, "replaced-interrupted")
    os.mkdir(aside, 0o700)
    for n in os.listdir(d.data_dir):
        if n.startswith("emitterd.db"):
            os.rename(os.path.join(d.data_dir, n), os.path.join(aside, n))
    with open(dest, "rb") as src, open(os.path.join(d.data_dir, "emitterd.db.restoring"),
                                        "wb") as tmp:
        tmp.write(src.read())
    r = d.run_refused()
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "cannot start" in out and "a restore was interrupted" in out, out
    assert not os.path.exists(os.path.join(d.data_dir, "emitterd.db"))
    rc, _, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    d.start()
    assert d.client().ping()["head"] == 100
    assert sorted(os.listdir(aside)) == ["emitterd.db"]      # the old log, still kept


@pytest.mark.timeout(60)
def test_a_backup_clears_what_a_killed_backup_to_the_same_file_left(make_daemon: Any,
                                                                   short_tmp: str) -> None:
    d = make_daemon()
    d.client().publish(events(10, 0))
    dest = os.path.join(short_tmp, "b.db")
    dead = 2 ** 22 + 12345                  # above pid_max's default: no such process
    left = [dest + ".partial-%d" % dead, dest + ".partial-%d-journal" % dead]
    mine = dest + ".partial-%d" % os.getpid()     # a backup still running keeps its own
    for p in left + [mine]:
        with open(p, "wb") as f:
            f.write(b"x")
    assert emitterd("backup", "--data-dir", d.data_dir, dest)[0] == 0
    assert sorted(n for n in os.listdir(short_tmp) if n.startswith("b.db")) == \
        ["b.db", os.path.basename(mine)]



@pytest.mark.timeout(60)
def test_a_backup_never_writes_through_a_symlink_planted_beside_dest(make_daemon: Any,
                                                                    short_tmp: str) -> None:
    """In a directory others can write to, a symlink at the backup's working name would
    have had a (root) backup write the copy wherever it points."""
    d = make_daemon()
    d.client().publish(events(10, 0))
    dest = os.path.join(short_tmp, "b.db")
    target = os.path.join(short_tmp, "elsewhere", "planted.db")
    os.mkdir(os.path.dirname(target))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMITTERD_")}
    # $$ is the pid the backup runs as (exec): the working name it would have used
    r = subprocess.run(["sh", "-c", 'ln -s "$1" "$2.partial-$$" && exec "$3" -m emitterd backup '
                        '--data-dir "$4" "$2"', "sh", target, dest, sys.executable, d.data_dir],
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert not os.path.lexists(target), "the backup followed the planted symlink"
    assert os.path.isfile(dest) and not os.path.islink(dest)
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    assert not [n for n in os.listdir(short_tmp) if n.startswith("b.db.partial-") and
                os.path.isdir(os.path.join(short_tmp, n))], "its working directory was left"
    # DEST itself a symlink: refused, nothing written there
    link = os.path.join(short_tmp, "c.db")
    os.symlink(target, link)
    rc, _, err = emitterd("backup", "--data-dir", d.data_dir, link)
    assert rc == 1 and "exists" in err and not os.path.lexists(target), err


@pytest.mark.timeout(60)
def test_a_pre_upgrade_log_can_be_backed_up_and_restored(make_daemon: Any, short_tmp: str) -> None:
    """`emitterd backup` / `restore` call a log of an older schema "not an emitterd event log".
    
    README, "Upgrading": "take a backup first (emitterd backup, below), install the new
    version ..., then systemctl restart emitterd ... the new one migrates an older log on
    open". emitterd 0.1 (schema v1/v2: one row per event) has no `backup` command, so an
    operator upgrading from it installs this version and runs `emitterd backup` before the
    first start, as told: refused with "... is not an emitterd event log (tables missing:
    chunks)", the very log the daemon would open and migrate. The same for `emitterd restore`
    of a copy of such a log (made with cp while the old daemon was stopped)."""
    d = make_daemon(start=False)
    write_v2_log(d.data_dir, 3, ids=True)
    dest = os.path.join(short_tmp, "pre-upgrade.db")
    rc, _, err = emitterd("backup", "--data-dir", d.data_dir, dest)
    assert "not an emitterd event log" not in err, (
        "`emitterd backup` of a log the daemon would migrate (schema v2): %s" % err.strip())
    assert rc == 0 and os.path.exists(dest), err
    # the upgrade: the daemon migrates the log, takes an event
    d.start()
    assert d.client().publish([{"stream": "s", "type": "T"}])["positions"] == [4]
    assert d.stop() == 0
    # going back to the backup taken before the upgrade
    rc, _, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    d.start()
    assert d.client().ping()["head"] == 3


@pytest.mark.timeout(60)
def test_a_backup_of_a_newer_schema_is_refused_before_it_replaces_anything(
        make_daemon: Any, short_tmp: str) -> None:
    """The daemon refuses a log of a newer schema than it knows; a restore of such a backup
    went through, and left a data directory the daemon would not start on."""
    d = make_daemon()
    d.client().publish(events(3, 0))
    dest = os.path.join(short_tmp, "b.db")
    rc, _, err = emitterd("backup", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    assert d.stop() == 0
    with sqlite3.connect(dest, isolation_level=None) as db:
        newer = db.execute("PRAGMA user_version").fetchone()[0] + 1
        db.execute("PRAGMA user_version = %d" % newer)      # as a newer emitterd's backup
    db.close()
    rc, _, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc != 0 and "newer emitterd" in err, (rc, err)
    d.start()
    assert d.client().ping()["head"] == 3        # the data directory is as it was


# `emitterd restore`, SIGKILLed right after its Nth rename into a replaced-* directory
_KILLED_AFTER = (
    "import os, signal, sys\n"
    "real = os.rename\n"
    "n = [0]\n"
    "def rn(a, b, *k, **kw):\n"
    "    real(a, b, *k, **kw)\n"
    "    if 'replaced-' in b:\n"
    "        n[0] += 1\n"
    "        if n[0] == int(sys.argv[3]):\n"
    "            os.kill(os.getpid(), signal.SIGKILL)\n"
    "os.rename = rn\n"
    "from emitterd.cli.daemon_cmd import main\n"
    "main(['restore', '--data-dir', sys.argv[2], sys.argv[1]])\n")


@pytest.mark.timeout(60)
def test_a_rerun_restore_keeps_the_replaced_log_whole(make_daemon: Any, short_tmp: str) -> None:
    """backup.py: "Move the log files in `data_dir` (database, WAL, shared memory: together,
    or SQLite would replay a WAL onto the wrong database) into a new subdirectory"; restore
    --help: "The log already there is moved into a replaced-<time> directory inside it, never
    deleted", and the daemon's refusal after an interrupted restore says: run `emitterd
    restore` again. A restore killed after it moved emitterd.db but before emitterd.db-wal,
    then run again as told, must still leave the replaced log whole (its database beside its
    WAL) in the directory it names."""
    d = make_daemon()
    c = d.client()
    c.publish(events(100, 0))
    dest = os.path.join(short_tmp, "b.db")
    assert emitterd("backup", "--data-dir", d.data_dir, dest)[0] == 0
    c.publish(events(500, 100))            # only in the log the restore replaces
    os.kill(d.proc.pid, signal.SIGKILL)    # a crashed daemon: its newest events are in the WAL
    d.proc.wait()
    assert os.path.exists(os.path.join(d.data_dir, "emitterd.db-wal"))
    # `emitterd restore`, killed right after its first rename in _move_aside (emitterd.db)
    r = subprocess.run([sys.executable, "-c", _KILLED_AFTER, dest, d.data_dir, "1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == -signal.SIGKILL, r.stderr
    refused = d.run_refused()
    assert "a restore was interrupted" in refused.stdout + refused.stderr
    rc, out, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    named = out.split("the log it replaced is in ")[-1].strip()
    kept = sorted(os.listdir(named))
    assert "emitterd.db" in kept and "emitterd.db-wal" in kept, (
        "the replaced log is split: %s holds %s; %s" % (
            named, kept, {n: sorted(os.listdir(os.path.join(d.data_dir, n)))
                          for n in os.listdir(d.data_dir) if n.startswith("replaced-")}))


@pytest.mark.timeout(60)
def test_a_rerun_restore_names_the_directory_the_interrupted_one_made(
        make_daemon: Any, short_tmp: str) -> None:
    """restore --help: "The log already there is moved into a replaced-<time> directory
    inside it, never deleted"; backup.py: the log files go "together, or SQLite would replay
    a WAL onto the wrong database"; _interrupted_aside: "what a restore killed inside
    _move_aside leaves". A restore killed after moving emitterd.db and emitterd.db-wal (the
    -shm left), run again, must put the -shm with them and name that directory, not an older
    replaced-* directory of an earlier, complete restore."""
    d = make_daemon()
    c = d.client()
    c.publish(events(50, 0))
    dest = os.path.join(short_tmp, "b.db")
    assert emitterd("backup", "--data-dir", d.data_dir, dest)[0] == 0
    d.stop()                                # a clean stop: emitterd.db alone
    rc, out, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    older = out.split("the log it replaced is in ")[-1].strip()
    time.sleep(1.1)                         # the next replaced-<time> is another second
    d.start()
    d.client().publish(events(300, 50))
    os.kill(d.proc.pid, signal.SIGKILL)     # a crashed daemon: WAL and shared memory beside
    d.proc.wait()
    assert os.path.exists(os.path.join(d.data_dir, "emitterd.db-shm"))
    r = subprocess.run([sys.executable, "-c", _KILLED_AFTER, dest, d.data_dir, "2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == -signal.SIGKILL, r.stderr
    rc, out, err = emitterd("restore", "--data-dir", d.data_dir, dest)
    assert rc == 0, err
    named = out.split("the log it replaced is in ")[-1].strip()
    listing = {n: sorted(os.listdir(os.path.join(d.data_dir, n)))
               for n in os.listdir(d.data_dir) if n.startswith("replaced-")}
    assert named != older, ("named the earlier restore's directory", named, listing)
    assert sorted(os.listdir(older)) == ["emitterd.db"], listing
