"""Test harness shared by scripts/chaos, scripts/fuzz and their short test versions.

* :class:`DaemonProcess` runs one ``emitterd run`` that may be SIGKILLed and
  started again on the same socket and data dir, and remembers (identity
  checked with psutil) every worker it was seen to have, so that cleanup can
  end every process by pid.
* ``python scripts/harness.py subscriber ...`` is a ``unix:`` subscriber
  process that appends one line per received event to its own file (flushed
  before the ack is sent) and acks late / nacks retry some events.
* ``python scripts/harness.py producer ...`` publishes continuously with
  client ids (``<run>-<seq>``), retries every publish that got no answer with
  the same ids (publish is idempotent by id) and appends one line per
  answered event (seq, position, version, stream, type, tags, kind).
* :func:`run_chaos` is the chaos run itself: see scripts/chaos and
  tests/test_chaos_short.py. It returns a report dict; ``report["ok"]``.
* :func:`fuzz_main` is scripts/fuzz: atheris (libFuzzer) over the in-process targets of
  tests/fuzz_targets.py, then the socket fuzzer of that module against a dedicated daemon.

``python scripts/harness.py chaos --help`` / ``fuzz --help`` list the options.

Delivery record lines (one file per subscriber process, append-only)::

    <conn> <worker> <position> <attempt> <stream>

``conn`` is ``<subscriber pid>.<accept counter>`` (``-`` for the subscriber
built on emitterd.client.serve_subscriber, which does not expose connections).

Pinned order rule checked at the end: for a pinned subscription, within one
stream, the first deliveries (attempt 1) received on one connection come in
strictly increasing position order. (A retry, timeout, killed worker or
closed connection makes the events it touches attempt >= 2 or moves them to
a new connection; a daemon restart means new workers, so new connections.)
"""
from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from emitterd.client import (Client, EmitterError, Unreachable,  # noqa: E402
                             serve_subscriber)
from emitterd.framing import Decoder, FrameError, encode  # noqa: E402
from emitterd.procs import SERVICE_TITLES, service_name  # noqa: E402

_ENV_DROP_PREFIXES = ("EMITTERD_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_")


def clean_env(root: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_DROP_PREFIXES)}
    for sub in ("run", "state", "config", "cache"):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    env.update({"XDG_RUNTIME_DIR": os.path.join(root, "run"),
                "XDG_STATE_HOME": os.path.join(root, "state"),
                "XDG_CONFIG_HOME": os.path.join(root, "config"),
                "XDG_CACHE_HOME": os.path.join(root, "cache"),
                "PYTHONUNBUFFERED": "1"})
    return env


def _proc(pid: int) -> Optional[psutil.Process]:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (identity checked: a reused pid is not `p`)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_procs(procs: Sequence[psutil.Process], sig: int = signal.SIGKILL) -> None:
    for p in procs:
        try:
            if p.is_running():
                p.send_signal(sig)      # psutil checks the identity before signalling
        except psutil.Error:
            pass


def end_popen(proc: Optional[subprocess.Popen], term_timeout: float = 5.0) -> Optional[int]:
    """SIGTERM, wait, SIGKILL, by pid; returns the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(term_timeout)
        except subprocess.TimeoutExpired:
            try:
                proc.kill()
            except ProcessLookupError:
                pass
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
    return proc.returncode


# ---- the daemon ----------------------------------------------------------------

class DaemonProcess:
    """One `emitterd run` in `root` that can be killed and started again."""

    def __init__(self, root: str, extra_args: Sequence[str] = ()) -> None:
        self.root = root
        self.socket = os.path.join(root, "ctl.sock")
        self.data_dir = os.path.join(root, "data")
        self.log_path = os.path.join(root, "daemon.log")
        self.extra_args = [str(a) for a in extra_args]
        self.env = clean_env(root)
        self.proc: Optional[subprocess.Popen] = None
        self.tracked: Dict[int, psutil.Process] = {}
        self.starts = 0

    def argv(self) -> List[str]:
        return [sys.executable, "-m", "emitterd", "run", "--socket", self.socket,
                "--data-dir", self.data_dir] + self.extra_args

    def start(self, timeout: float = 30.0) -> Dict[str, Any]:
        with open(self.log_path, "ab") as log:
            log.write(b"==== harness: daemon start %d ====\n" % (self.starts + 1))
            log.flush()
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, cwd=self.root,
                                         start_new_session=True)
        self.starts += 1
        self.track(self.proc.pid)
        return self.wait_ping(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ping(self, timeout: float = 30.0) -> Dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("emitterd exited with %s before answering ping\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            try:
                with Client(self.socket, timeout=2.0) as c:
                    return c.ping()
            except Exception as e:  # noqa: BLE001 - not up yet
                last = e
            time.sleep(0.05)
        raise RuntimeError("emitterd did not answer ping within %.0fs (last error %r)\n%s"
                           % (timeout, last, self.log_tail()))

    def track(self, pid: int) -> Optional[psutil.Process]:
        p = self.tracked.get(pid)
        if p is not None and alive(p):
            return p
        p = _proc(pid)
        if p is not None:
            self.tracked[pid] = p
        return p

    def children(self) -> List[psutil.Process]:
        """Track every current descendant of the daemon; return them."""
        if not self.running():
            return []
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            return []
        for k in kids:
            self.tracked.setdefault(k.pid, k)
        return kids

    def is_worker(self, pid: int) -> Optional[psutil.Process]:
        """The psutil handle of `pid` when it is a live child of the current daemon."""
        if not self.running():
            return None
        p = self.track(pid)
        if p is None or not alive(p):
            return None
        try:
            return p if p.ppid() == self.pid else None
        except psutil.Error:
            return None

    def kill(self) -> List[psutil.Process]:
        """SIGKILL the daemon; return its children at that moment."""
        kids = self.children()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return kids

    def stop(self, timeout: float = 20.0) -> Optional[int]:
        self.children()
        return end_popen(self.proc, timeout)

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return "(no daemon log)"
        return "\n".join(lines[-n:])

    def cleanup(self) -> None:
        try:
            self.stop(10.0)
        finally:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and any(alive(p) for p in self.tracked.values()):
                time.sleep(0.05)
            left = [p for p in self.tracked.values() if alive(p)]
            kill_procs(left, signal.SIGCONT)
            kill_procs(left, signal.SIGKILL)


# ---- subscriber process ----------------------------------------------------------

class _SubConn:
    __slots__ = ("sock", "dec", "out", "cid", "worker")

    def __init__(self, sock: socket.socket, cid: str) -> None:
        self.sock = sock
        self.dec = Decoder(0xFFFFFFFF)
        self.out = bytearray()
        self.cid = cid
        self.worker = "-"


def _unlink_stale(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def subscriber_main(path: str, out: str, seed: int, late_prob: float, late_min: float,
                    late_max: float, retry_prob: float) -> None:
    """A unix: subscriber: record every event (flushed before acking), ack/late-ack/nack."""
    rnd = random.Random(seed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rec = open(out, "a", buffering=1 << 16)
    _unlink_stale(path)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(64)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    conns: Dict[str, _SubConn] = {}
    late: List[Tuple[float, str, int]] = []
    pid = os.getpid()
    n_acc = 0

    def drop(c: _SubConn) -> None:
        conns.pop(c.cid, None)
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()

    def flush(c: _SubConn) -> None:
        while c.out:
            try:
                n = c.sock.send(c.out)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                drop(c)
                return
            del c.out[:n]
        if c.cid in conns:
            sel.modify(c.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if c.out else 0), c)

    def on_frame(c: _SubConn, frame: dict) -> None:
        op = frame.get("op")
        if op == "hello":
            c.worker = str(frame.get("worker"))
            return
        if op != "events":
            return
        events = frame.get("events") or []
        lines = []
        for ev in events:
            lines.append("%s %s %d %d %s\n" % (c.cid, c.worker, ev["position"], ev["attempt"],
                                               ev["stream"]))
        rec.write("".join(lines))
        rec.flush()                      # recorded before any ack leaves
        acks, retries = [], []
        now = time.monotonic()
        for ev in events:
            p = ev["position"]
            r = rnd.random()
            if r < retry_prob and ev["attempt"] <= 3:
                retries.append(p)
            elif r < retry_prob + late_prob:
                heapq.heappush(late, (now + rnd.uniform(late_min, late_max), c.cid, p))
            else:
                acks.append(p)
        if acks:
            c.out += encode({"op": "ack", "positions": acks})
        if retries:
            c.out += encode({"op": "nack", "positions": retries, "action": "retry",
                             "reason": "chaos"})

    try:
        while not stop.is_set():
            timeout = 0.1
            if late:
                timeout = max(0.0, min(timeout, late[0][0] - time.monotonic()))
            for key, mask in sel.select(timeout):
                if key.data is None:
                    try:
                        s, _ = lsock.accept()
                    except OSError:
                        continue
                    s.setblocking(False)
                    n_acc += 1
                    c = _SubConn(s, "%d.%d" % (pid, n_acc))
                    conns[c.cid] = c
                    sel.register(s, selectors.EVENT_READ, c)
                    continue
                c = key.data
                if c.cid not in conns:
                    continue
                if mask & selectors.EVENT_READ:
                    try:
                        data = c.sock.recv(1 << 18)
                    except (BlockingIOError, InterruptedError):
                        data = None
                    except OSError:
                        drop(c)
                        continue
                    if data == b"":
                        drop(c)
                        continue
                    if data:
                        c.dec.feed(data)
                        try:
                            while True:
                                frame = c.dec.next()
                                if frame is None:
                                    break
                                on_frame(c, frame)
                        except FrameError:
                            drop(c)
                            continue
                if c.cid in conns:
                    flush(c)
            now = time.monotonic()
            touched = {}
            while late and late[0][0] <= now:
                _, cid, p = heapq.heappop(late)
                c = conns.get(cid)
                if c is not None:
                    touched.setdefault(cid, []).append(p)
            for cid, ps in touched.items():
                c = conns[cid]
                c.out += encode({"op": "ack", "positions": ps})
                flush(c)
    finally:
        rec.flush()
        rec.close()
        for c in list(conns.values()):
            c.sock.close()
        sel.close()
        lsock.close()
        _unlink_stale(path)


def lib_subscriber_main(path: str, out: str, seed: int, retry_prob: float) -> None:
    """The same through emitterd.client.serve_subscriber (no connection ids)."""
    rnd = random.Random(seed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rec = open(out, "a", buffering=1 << 16)

    def handler(ev: dict) -> Any:
        rec.write("- - %d %d %s\n" % (ev["position"], ev["attempt"], ev["stream"]))
        rec.flush()
        if ev["attempt"] <= 3 and rnd.random() < retry_prob:
            return ("nack", "retry", "chaos")
        return None

    try:
        serve_subscriber(path, handler, stop=stop)
    finally:
        rec.close()


# ---- producer process ------------------------------------------------------------

STREAMS = ["user-%d" % i for i in range(8)] + ["order-%d" % i for i in range(8)] + \
    ["misc-%d" % i for i in range(4)]
TYPES = ["order.created", "order.paid", "user.created", "misc.ping"]
TAGS = ["vip", "eu", "us", "beta"]
KINDS = ["a", "b", "c"]


def producer_main(sock_path: str, out: str, seed: int, rate: float, run_id: str) -> None:
    rnd = random.Random(seed)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    rec = open(out, "a", buffering=1 << 16)
    client = Client(sock_path, timeout=5.0)
    seq = 0
    retries = 0
    errors = 0
    t_last = time.monotonic()
    while not stop.is_set():
        n = rnd.randint(1, 4)
        batch, meta = [], []
        for _ in range(n):
            seq += 1
            stream = rnd.choice(STREAMS)
            type_ = rnd.choice(TYPES)
            tags = sorted(rnd.sample(TAGS, rnd.randint(0, 2)))
            kind = rnd.choice(KINDS)
            batch.append({"id": "%s-%d" % (run_id, seq), "stream": stream, "type": type_,
                          "tags": tags, "data": {"seq": seq, "kind": kind},
                          "metadata": {"producer": os.getpid()}})
            meta.append((seq, stream, type_, tags, kind))
        while True:       # the same batch (same ids) until it is answered
            try:
                res = client.publish(batch)
                break
            except (Unreachable, TimeoutError, ConnectionError, OSError) as e:
                retries += 1
                client.close()
                time.sleep(0.05)
            except EmitterError as e:
                # unavailable while shutting down, or an unexpected error: retry, but say so
                errors += 1
                sys.stderr.write("producer: publish failed with %s, retrying\n" % e)
                client.close()
                time.sleep(0.1)
        lines = []
        for (s, stream, type_, tags, kind), pos, ver in zip(meta, res["positions"],
                                                            res["versions"]):
            lines.append("%d %d %d %s %s %s %s\n" % (s, pos, ver, stream, type_,
                                                     ",".join(tags) or "-", kind))
        rec.write("".join(lines))
        rec.flush()
        # pace: `rate` events per second on average
        t_last += n / rate
        delay = t_last - time.monotonic()
        if delay > 0:
            stop.wait(delay)
        else:
            t_last = time.monotonic()
    rec.write("# done seq=%d retries=%d errors=%d\n" % (seq, retries, errors))
    rec.close()
    client.close()


# ---- chaos orchestration -----------------------------------------------------------

def _glob_user(ev: dict) -> bool:
    return ev["stream"].startswith("user-")


SUBSCRIPTIONS: List[Dict[str, Any]] = [
    # name, type, selector, strategy, pool, subscriber kind, its knobs, matcher
    {"name": "all-pinned", "type": "stream", "selector": "$all", "strategy": "pinned",
     "pool": 3, "sizes": (2, 3), "mode": "own", "late": (0.05, 0.05, 0.6), "retry": 0.02,
     "options": {"batch_size": 16, "max_in_flight": 64, "ack_timeout": 5.0},
     "match": lambda ev: True},
    {"name": "orders-rr", "type": "event_type", "selector": "order.created",
     "strategy": "round_robin", "pool": 2, "sizes": None, "mode": "lib", "retry": 0.03,
     "options": {"batch_size": 4, "max_in_flight": 32},
     "match": lambda ev: ev["type"] == "order.created"},
    {"name": "users-random", "type": "event_pattern", "selector": {"stream": "user-*"},
     "strategy": "random", "pool": 2, "sizes": (1, 3), "mode": "own", "bounce": True,
     "late": (0.02, 0.05, 0.3), "retry": 0.01,
     "options": {"batch_size": 8, "max_in_flight": 32},
     "match": _glob_user},
    {"name": "vip-pinned", "type": "tags", "selector": ["vip"], "strategy": "pinned",
     "pool": 1, "sizes": (1, 3), "mode": "own", "late": (0.05, 0.6, 1.6), "retry": 0.02,
     "options": {"batch_size": 1, "max_in_flight": 16, "ack_timeout": 1.0},
     "match": lambda ev: "vip" in ev["tags"]},
    {"name": "kind-ab-pinned", "type": "event_payload",
     "selector": {"kind": {"$in": ["a", "b"]}}, "strategy": "pinned", "pool": 2,
     "sizes": None, "mode": "own", "late": (0.0, 0.0, 0.0), "retry": 0.0,
     "options": {"batch_size": 64, "max_in_flight": 256},
     "match": lambda ev: ev["kind"] in ("a", "b")},
]


class ChaosConfig:
    def __init__(self, worker_kills: int = 1000, daemon_kills: int = 10,
                 sigstops: Optional[int] = None, resizes: Optional[int] = None,
                 bounces: Optional[int] = None, helper_kills: Optional[int] = None,
                 rate: float = 150.0,
                 kill_interval: float = 0.12, settle_timeout: float = 180.0,
                 seed: Optional[int] = None, keep: bool = False, verbose: bool = True,
                 log: Callable[[str], None] = print) -> None:
        self.worker_kills = worker_kills
        self.daemon_kills = daemon_kills
        self.sigstops = max(1, worker_kills // 100) if sigstops is None else sigstops
        self.resizes = max(2, worker_kills // 20) if resizes is None else resizes
        self.bounces = max(1, worker_kills // 50) if bounces is None else bounces
        self.helper_kills = max(1, worker_kills // 100) if helper_kills is None else helper_kills
        self.rate = rate
        self.kill_interval = kill_interval
        self.settle_timeout = settle_timeout
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.keep = keep
        self.verbose = verbose
        self.log = log

    # daemon flags of the chaos run
    daemon_args = ["--heartbeat-interval", "0.2", "--worker-timeout", "1.5",
                   "--worker-grace", "0.5", "--drain-timeout", "2",
                   "--checkpoint-interval", "0.2", "--log-level", "info"]


def _spread(n: int, total: int, offset: float) -> List[int]:
    """n thresholds spread over 0..total (worker-kill counts at which to act)."""
    if n <= 0:
        return []
    return sorted(int(total * (i + offset) / (n + 0.5)) for i in range(n))


class Chaos:
    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.rnd = random.Random(cfg.seed)
        self.root = tempfile.mkdtemp(prefix="emchaos-", dir="/tmp")
        self.rec_dir = os.path.join(self.root, "rec")
        os.makedirs(self.rec_dir)
        self.daemon = DaemonProcess(self.root, ChaosConfig.daemon_args)
        self.subs = [dict(s) for s in SUBSCRIPTIONS]
        self.sub_procs: Dict[str, subprocess.Popen] = {}
        self.all_popens: List[subprocess.Popen] = []
        self.producer: Optional[subprocess.Popen] = None
        self.client: Optional[Client] = None
        self.keys: Dict[str, str] = {}
        self.stopped: List[psutil.Process] = []
        self.killed: set = set()          # pids this run SIGKILLed or SIGSTOPped
        self.figures: Dict[str, Any] = defaultdict(int)
        self.figures.update({"worker_kills": 0, "worker_kills_not_ready": 0, "daemon_kills": 0,
                             "daemon_self_exits": 0, "sigstops": 0, "resizes": 0,
                             "helper_kills": 0,
                             "subscriber_restarts": 0})
        self.problems: List[str] = []
        self.sigstop_detect: List[float] = []
        self.t0 = time.monotonic()

    def say(self, msg: str) -> None:
        if self.cfg.verbose:
            self.cfg.log("[chaos %6.1fs] %s" % (time.monotonic() - self.t0, msg))

    def problem(self, msg: str) -> None:
        self.problems.append(msg)
        self.say("PROBLEM: " + msg)

    # -- processes
    def _spawn(self, argv: List[str], log_name: str) -> subprocess.Popen:
        log = open(os.path.join(self.root, log_name), "ab")
        try:
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__)] + argv,
                                 stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 env=self.daemon.env, cwd=self.root, start_new_session=True)
        finally:
            log.close()
        self.all_popens.append(p)
        return p

    def sub_path(self, s: dict) -> str:
        return os.path.join(self.root, "%s.sock" % s["name"])

    def start_subscriber(self, s: dict) -> None:
        n = s.setdefault("generation", 0) + 1
        s["generation"] = n
        out = os.path.join(self.rec_dir, "%s.%d.deliveries" % (s["name"], n))
        seed = self.rnd.randrange(1 << 30)
        if s["mode"] == "lib":
            argv = ["lib-subscriber", "--path", self.sub_path(s), "--out", out,
                    "--seed", str(seed), "--retry", str(s.get("retry", 0.0))]
        else:
            late = s.get("late", (0.0, 0.0, 0.0))
            argv = ["subscriber", "--path", self.sub_path(s), "--out", out, "--seed", str(seed),
                    "--late", str(late[0]), "--late-min", str(late[1]),
                    "--late-max", str(late[2]), "--retry", str(s.get("retry", 0.0))]
        p = self._spawn(argv, "%s.log" % s["name"])
        self.sub_procs[s["name"]] = p
        deadline = time.monotonic() + 15
        while not os.path.exists(self.sub_path(s)):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("subscriber %s did not start" % s["name"])
            time.sleep(0.02)

    def ctl(self) -> Client:
        if self.client is None:
            self.client = Client(self.daemon.socket, timeout=10.0)
        return self.client

    def request(self, fn: Callable[[Client], Any], what: str, tries: int = 50) -> Any:
        last: Any = None
        for _ in range(tries):
            try:
                return fn(self.ctl())
            except (Unreachable, TimeoutError, ConnectionError) as e:
                last = e
                self.ctl().close()
                if not self.daemon.running():
                    self.daemon_exited_by_itself()
                    continue
                time.sleep(0.1)
        raise RuntimeError("%s: no answer from the daemon (%r)" % (what, last))

    def daemon_exited_by_itself(self) -> None:
        """Nobody killed it, yet it is gone: a bug. Say so (with its last words), restart."""
        rc = self.daemon.proc.wait(30) if self.daemon.proc is not None else None
        self.figures["daemon_self_exits"] += 1
        tail = [line for line in self.daemon.log_tail(400).splitlines()
                if "harness" not in line][-12:]
        self.problem("the daemon exited by itself (status %s) while the chaos run did not "
                     "kill it; its last log lines:\n      %s" % (rc, "\n      ".join(tail)))
        kids = [k for k in self.daemon.tracked.values() if alive(k)]
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.05)
        kill_procs([k for k in kids if alive(k)])
        self.daemon.start()
        self.wait_workers_ready(20)

    # -- setup
    def setup(self) -> None:
        self.say("root %s, seed %d" % (self.root, self.cfg.seed))
        for s in self.subs:
            self.start_subscriber(s)
        self.daemon.start()
        for s in self.subs:
            opts = {"strategy": s["strategy"], "max_restarts": 1_000_000, "restart_period": 1.0,
                    "max_retries": 1000, "retry_backoff": [0.05, 0.5]}
            opts.update(s["options"])
            spec = {"name": s["name"], "type": s["type"], "selector": s["selector"],
                    "subscriber": "unix:" + self.sub_path(s), "pool_size": s["pool"],
                    "start_from": "origin", "options": opts}
            st = self.request(lambda c: c.start(spec), "start " + s["name"])
            self.keys[s["name"]] = st["key"]
        self.wait_workers_ready(20)
        self.producer = self._spawn(["producer", "--socket", self.daemon.socket,
                                     "--out", os.path.join(self.rec_dir, "producer.published"),
                                     "--seed", str(self.rnd.randrange(1 << 30)),
                                     "--rate", str(self.cfg.rate),
                                     "--run-id", "chaos%d" % self.cfg.seed], "producer.log")

    def pools(self) -> List[dict]:
        st = self.request(lambda c: c.list(), "list")["subscriptions"]
        for p in st:
            for w in p["workers"]:
                if w["pid"]:
                    self.daemon.track(w["pid"])
        return st

    def wait_workers_ready(self, timeout: float) -> List[dict]:
        deadline = time.monotonic() + timeout
        while True:
            pools = self.pools()
            ok = len(pools) == len(self.subs) and all(
                p["state"] == "running" and sum(1 for w in p["workers"] if w["state"] == "ready")
                == p["subscription"]["pool_size"] for p in pools)
            if ok:
                return pools
            if time.monotonic() > deadline:
                self.problem("pools not all running with ready workers after %.0fs: %s" % (
                    timeout, [(p["subscription"]["name"], p["state"],
                               [(w["index"], w["state"]) for w in p["workers"]])
                              for p in pools]))
                return pools
            time.sleep(0.1)

    def ready_workers(self, states: Tuple[str, ...] = ("ready",)) -> List[Tuple[dict, dict]]:
        out = []
        for p in self.pools():
            if p["state"] != "running":
                continue
            for w in p["workers"]:
                if w["state"] in states and w["pid"]:
                    out.append((p, w))
        return out

    # -- actions
    def kill_worker(self, pool_key: Optional[str] = None) -> bool:
        """SIGKILL one worker: mostly a ready one, sometimes one still starting or draining
        (after a shrink); only in pool `pool_key` when given."""
        cands = [(p, w) for p, w in self.ready_workers(("ready", "starting", "draining"))
                 if w["pid"] not in self.killed and (pool_key is None or p["key"] == pool_key)]
        nonready = [c for c in cands if c[1]["state"] != "ready"]
        if nonready and self.rnd.random() < 0.3:
            cands = nonready
        else:
            cands = [c for c in cands if c[1]["state"] == "ready"]
        self.rnd.shuffle(cands)
        for p, w in cands:
            proc = self.daemon.is_worker(w["pid"])
            if proc is None:
                continue
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
            self.killed.add(w["pid"])
            self.figures["worker_kills"] += 1
            if w["state"] != "ready":
                self.figures["worker_kills_not_ready"] += 1
            return True
        return False

    def kill_daemon(self) -> None:
        kids = self.daemon.kill()
        self.figures["daemon_kills"] += 1
        self.say("daemon SIGKILLed (%d kills so far); %d workers were running"
                 % (self.figures["daemon_kills"], len(kids)))
        # workers never outlive the parent (DESIGN §1): give them a moment, then check
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(alive(k) for k in kids):
            time.sleep(0.05)
        left = [k for k in kids if alive(k) and k not in self.stopped]
        if left:
            self.problem("%d worker(s) still alive 5 s after the daemon was SIGKILLed: %s"
                         % (len(left), [k.pid for k in left]))
            kill_procs(left)
        if self.client is not None:
            self.client.close()
        time.sleep(self.rnd.uniform(0.0, 0.5))    # the producer sees it down for a while
        t = time.monotonic()
        self.daemon.start()
        self.wait_workers_ready(20)
        self.say("daemon back after %.2fs" % (time.monotonic() - t))

    def kill_helper(self) -> None:
        """SIGKILL the daemon's fork server or its checkpointer, in turn: the daemon forks
        workers itself meanwhile (the WAL waits for checkpoints) and starts another after 1 s."""
        want = ("forkserver", "checkpointer")[self.figures["helper_kills"] % 2]
        for k in self.daemon.children():
            try:
                if k.ppid() == self.daemon.pid and service_name(k.cmdline()) == want:
                    k.send_signal(signal.SIGKILL)
                    break
            except psutil.Error:
                continue
        else:
            return
        self.figures["helper_kills"] += 1
        self.say("%s SIGKILLed (%d helper kills so far)" % (SERVICE_TITLES[want][len("emitterd: "):],
                                                           self.figures["helper_kills"]))

    def sigstop_worker(self) -> None:
        cands = self.ready_workers()
        self.rnd.shuffle(cands)
        for p, w in cands:
            if w["pid"] in self.killed:
                continue
            proc = self.daemon.is_worker(w["pid"])
            if proc is None:
                continue
            try:
                proc.send_signal(signal.SIGSTOP)
            except psutil.Error:
                continue
            self.killed.add(w["pid"])
            self.stopped.append(proc)
            try:
                for _ in range(100):
                    if proc.status() == psutil.STATUS_STOPPED:
                        break
                    time.sleep(0.01)
                else:
                    self.say("SIGSTOP of %d did not show as stopped" % w["pid"])
            except psutil.Error:
                pass
            self.figures["sigstops"] += 1
            t = time.monotonic()
            # worker_timeout 1.5 s, checked by the daemon's tick; allow generous slack
            deadline = t + 10.0
            while time.monotonic() < deadline:
                if not alive(proc):
                    break
                time.sleep(0.05)
            took = time.monotonic() - t
            if alive(proc):
                self.problem("SIGSTOPped worker pid %d of %s was not replaced within 10 s"
                             % (w["pid"], p["subscription"]["name"]))
                kill_procs([proc], signal.SIGKILL)
            else:
                self.sigstop_detect.append(took)
            return

    def resize(self) -> None:
        cands = [s for s in self.subs if s.get("sizes")]
        s = self.rnd.choice(cands)
        lo, hi = s["sizes"]
        size = self.rnd.randint(lo, hi)
        if self.rnd.random() < 0.5:
            # a worker dies just before the resize: its replacement may be retired at once
            self.kill_worker(self.keys[s["name"]])
        st = self.request(lambda c: c.update(self.keys[s["name"]], pool_size=size),
                          "update " + s["name"])
        if st["subscription"]["pool_size"] != size:
            self.problem("update pool_size=%d of %s answered pool_size %s"
                         % (size, s["name"], st["subscription"]["pool_size"]))
        self.figures["resizes"] += 1

    def bounce_subscriber(self) -> None:
        s = next(x for x in self.subs if x.get("bounce"))
        p = self.sub_procs[s["name"]]
        if self.rnd.random() < 0.5:
            p.kill()
        else:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        time.sleep(self.rnd.uniform(0.2, 1.5))     # gone for a while: workers retry, events wait
        self.start_subscriber(s)
        self.figures["subscriber_restarts"] += 1

    # -- the run
    def run(self) -> None:
        cfg = self.cfg
        W = cfg.worker_kills
        plan = []
        for t in _spread(cfg.daemon_kills, W, 0.75):
            plan.append((t, 0, "daemon"))
        for t in _spread(cfg.sigstops, W, 0.4):
            plan.append((t, 1, "sigstop"))
        for t in _spread(cfg.resizes, W, 0.2):
            plan.append((t, 2, "resize"))
        for t in _spread(cfg.bounces, W, 0.6):
            plan.append((t, 3, "bounce"))
        for t in _spread(cfg.helper_kills, W, 0.5):
            plan.append((t, 4, "helper"))
        plan.sort()
        last_report = time.monotonic()
        misses = 0
        while self.figures["worker_kills"] < W or plan:
            if self.producer is not None and self.producer.poll() is not None:
                raise RuntimeError("the producer exited early with %s" % self.producer.returncode)
            if plan and plan[0][0] <= self.figures["worker_kills"]:
                _, _, action = plan.pop(0)
                getattr(self, {"daemon": "kill_daemon", "sigstop": "sigstop_worker",
                               "resize": "resize", "bounce": "bounce_subscriber",
                               "helper": "kill_helper"}[action])()
                continue
            time.sleep(self.rnd.uniform(0.5, 1.5) * cfg.kill_interval)
            if not self.kill_worker():
                misses += 1
                if misses > 600:
                    raise RuntimeError("no ready worker to kill for a long time")
            else:
                misses = 0
            if time.monotonic() - last_report > 10:
                last_report = time.monotonic()
                self.say("worker kills %d/%d, daemon kills %d/%d, sigstops %d, resizes %d, "
                         "subscriber restarts %d" % (
                             self.figures["worker_kills"], W, self.figures["daemon_kills"],
                             cfg.daemon_kills, self.figures["sigstops"], self.figures["resizes"],
                             self.figures["subscriber_restarts"]))

    def settle(self) -> Tuple[int, List[dict]]:
        """Stop the producer, then wait until every checkpoint reaches the head."""
        assert self.producer is not None
        self.producer.send_signal(signal.SIGTERM)
        try:
            self.producer.wait(60)
        except subprocess.TimeoutExpired:
            self.problem("the producer did not finish its last publish within 60 s")
            self.producer.kill()
            self.producer.wait(5)
        if self.producer.returncode != 0:
            self.problem("the producer exited with %s" % self.producer.returncode)
        for s in self.subs:
            if self.sub_procs[s["name"]].poll() is not None:
                self.problem("subscriber %s died (exit %s)" % (
                    s["name"], self.sub_procs[s["name"]].returncode))
                self.start_subscriber(s)
        t = time.monotonic()
        deadline = t + self.cfg.settle_timeout
        head = self.request(lambda c: c.ping(), "ping")["head"]
        pools: List[dict] = []
        while time.monotonic() < deadline:
            pools = self.pools()
            if all(p["checkpoint"] == head and p["in_flight"] == 0 and p["state"] == "running"
                   for p in pools) and len(pools) == len(self.subs):
                break
            time.sleep(0.2)
        else:
            self.problem("checkpoints did not reach head %d within %.0fs: %s" % (
                head, self.cfg.settle_timeout,
                [(p["subscription"]["name"], p["state"], p["checkpoint"], p["in_flight"])
                 for p in pools]))
        self.figures["settle_seconds"] = round(time.monotonic() - t, 1)
        return head, pools

    def shutdown(self) -> None:
        time.sleep(0.3)      # last acks leave the subscribers
        rc = self.daemon.stop(30.0)
        if rc != 0:
            self.problem("the daemon exited with %s on SIGTERM" % rc)
        for name, p in self.sub_procs.items():
            end_popen(p, 10.0)

    # -- verification
    def verify(self, head: int, pools: List[dict]) -> Dict[str, Any]:
        published: Dict[int, dict] = {}
        by_seq: Dict[int, int] = {}
        path = os.path.join(self.rec_dir, "producer.published")
        done_line = None
        with open(path) as f:
            for line in f:
                if line.startswith("#"):
                    done_line = line.strip()
                    continue
                seq, pos, ver, stream, type_, tags, kind = line.split()
                seq_i, pos_i = int(seq), int(pos)
                ev = {"seq": seq_i, "position": pos_i, "version": int(ver), "stream": stream,
                      "type": type_, "tags": [] if tags == "-" else tags.split(","),
                      "kind": kind}
                if seq_i in by_seq and by_seq[seq_i] != pos_i:
                    self.problem("seq %d published twice at positions %d and %d"
                                 % (seq_i, by_seq[seq_i], pos_i))
                by_seq[seq_i] = pos_i
                old = published.get(pos_i)
                if old is not None and old["seq"] != seq_i:
                    self.problem("position %d answered for seq %d and seq %d"
                                 % (pos_i, old["seq"], seq_i))
                published[pos_i] = ev
        if done_line:
            for part in done_line.split()[2:]:
                k, v = part.split("=")
                self.figures["publish_" + k] = int(v)
        missing_log = sorted(set(range(1, head + 1)) - set(published))
        beyond = sorted(p for p in published if p > head)
        if missing_log:
            self.problem("%d positions in 1..head=%d were never answered to the producer "
                         "(duplicate append or gap): first %s" % (len(missing_log), head,
                                                                 missing_log[:10]))
        if beyond:
            self.problem("positions answered beyond head %d: %s" % (head, beyond[:10]))
        # stream versions are 0, 1, 2, ... in position order
        streams: Dict[str, List[Tuple[int, int]]] = defaultdict(list)
        for pos, ev in published.items():
            streams[ev["stream"]].append((pos, ev["version"]))
        for stream, items in streams.items():
            items.sort()
            if [v for _, v in items] != list(range(len(items))):
                self.problem("stream %s versions are not 0..n-1 in position order" % stream)
        self.figures["events"] = len(published)
        self.figures["head"] = head

        per_sub = {}
        total_lost = total_dup = total_redel = total_deliv = total_order = 0
        for s in self.subs:
            name = s["name"]
            expected = {p for p, ev in published.items() if s["match"](ev)}
            seen: Dict[int, int] = defaultdict(int)
            redel = 0
            n = 0
            unexpected = set()
            order_viol = []
            last: Dict[Tuple[str, str], int] = {}
            files = sorted(f for f in os.listdir(self.rec_dir)
                           if f.startswith(name + ".") and f.endswith(".deliveries"))
            for fn in files:
                with open(os.path.join(self.rec_dir, fn)) as f:
                    for line in f:
                        parts = line.split()
                        if len(parts) != 5:
                            continue        # a line cut by SIGKILL of the subscriber
                        cid, _w, pos_s, att_s, stream = parts
                        pos, att = int(pos_s), int(att_s)
                        n += 1
                        seen[pos] += 1
                        if att > 1:
                            redel += 1
                        if pos not in expected:
                            unexpected.add(pos)
                        if (s["strategy"] == "pinned" and att == 1 and cid != "-"):
                            k = (cid, stream)
                            prev = last.get(k)
                            if prev is not None and pos <= prev:
                                order_viol.append((cid, stream, prev, pos))
                            last[k] = pos
            lost = sorted(expected - set(seen))
            dup = n - len(seen)
            st = next((p for p in pools if p["key"] == self.keys[name]), None)
            per_sub[name] = {"strategy": s["strategy"], "expected": len(expected),
                             "deliveries": n, "redeliveries": redel, "duplicates": dup,
                             "lost": len(lost), "unexpected": len(unexpected),
                             "order_violations": len(order_viol),
                             "checkpoint": st["checkpoint"] if st else None,
                             "pool_state": st["state"] if st else None,
                             "daemon_delivered": st["delivered"] if st else None,
                             "daemon_retried": st["retried"] if st else None,
                             "daemon_restarts": st["restarts"] if st else None,
                             "parked": st["parked"] if st else None}
            if lost:
                self.problem("%s: %d matching events never delivered, first %s"
                             % (name, len(lost), lost[:10]))
            if unexpected:
                self.problem("%s: %d delivered positions do not match / were not published: %s"
                             % (name, len(unexpected), sorted(unexpected)[:10]))
            if order_viol:
                self.problem("%s: %d pinned order violations (conn, stream, prev, pos), "
                             "first %s" % (name, len(order_viol), order_viol[:5]))
            if st is None or st["checkpoint"] != head:
                self.problem("%s: checkpoint %s != head %d"
                             % (name, st and st["checkpoint"], head))
            if st is not None and st["parked"]:
                self.problem("%s: %d events parked (max_retries 1000 should never park)"
                             % (name, st["parked"]))
            total_lost += len(lost)
            total_dup += dup
            total_redel += redel
            total_deliv += n
            total_order += len(order_viol)
        self.figures.update({"deliveries": total_deliv, "redeliveries": total_redel,
                             "duplicates": total_dup, "lost": total_lost,
                             "order_violations": total_order})
        return per_sub

    def cleanup(self) -> None:
        if self.client is not None:
            self.client.close()
        for p in self.all_popens:
            end_popen(p, 5.0)
        kill_procs([p for p in self.stopped if alive(p)], signal.SIGKILL)
        self.daemon.cleanup()
        if not self.cfg.keep:
            shutil.rmtree(self.root, ignore_errors=True)


def run_chaos(cfg: ChaosConfig) -> Dict[str, Any]:
    """The whole chaos run; always ends every process it started and removes its directory
    (unless cfg.keep). Returns {"ok", "figures", "per_subscription", "problems", ...}."""
    ch = Chaos(cfg)
    report: Dict[str, Any] = {"seed": cfg.seed, "root": ch.root}
    try:
        ch.setup()
        ch.run()
        head, pools = ch.settle()
        ch.shutdown()
        per_sub = ch.verify(head, pools)
        report["per_subscription"] = per_sub
    except Exception as e:  # noqa: BLE001 - reported, then cleaned up
        import traceback
        ch.problem("harness error: %s\n%s" % (e, traceback.format_exc()))
    finally:
        report["daemon_log_tail"] = ch.daemon.log_tail(40)
        try:
            report["daemon_log_errors"] = _log_summary(ch.daemon.log_path)
            tracebacks = report["daemon_log_errors"].get("Traceback", 0)
            if tracebacks:
                ch.problem("the daemon log holds %d traceback(s): %s" % (
                    tracebacks, ", ".join(k for k in report["daemon_log_errors"]
                                          if k != "Traceback")[:1500]))
        except Exception:  # noqa: BLE001
            pass
        ch.cleanup()
    figs = dict(ch.figures)
    figs["duration_seconds"] = round(time.monotonic() - ch.t0, 1)
    if ch.sigstop_detect:
        figs["sigstop_replaced_after_s"] = "%.2f..%.2f" % (min(ch.sigstop_detect),
                                                           max(ch.sigstop_detect))
    report["figures"] = figs
    report["problems"] = ch.problems
    report["ok"] = not ch.problems and figs.get("lost", 1) == 0
    return report


def _log_summary(path: str) -> Dict[str, int]:
    """Counts of ERROR/CRITICAL lines (by message, timestamp and fields dropped) and of
    tracebacks in a daemon log."""
    counts: Dict[str, int] = defaultdict(int)
    with open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("Traceback"):
                counts["Traceback"] += 1
                continue
            parts = line.split(" ", 2)
            if len(parts) == 3 and parts[1] in ("ERROR", "CRITICAL"):
                msg = parts[2]
                # drop key=value fields: keep "logger: message"
                words = [w for w in msg.split(" ") if "=" not in w]
                counts[" ".join(words)[:100]] += 1
    return dict(counts)


def format_report(report: Dict[str, Any]) -> str:
    f = report.get("figures", {})
    lines = ["chaos run (seed %s)" % report.get("seed")]
    order = ["events", "head", "worker_kills", "worker_kills_not_ready", "daemon_kills",
             "daemon_self_exits", "helper_kills", "sigstops",
             "sigstop_replaced_after_s", "resizes", "subscriber_restarts", "publish_retries",
             "publish_errors", "deliveries", "redeliveries", "duplicates", "order_violations",
             "lost", "settle_seconds", "duration_seconds"]
    for k in order:
        if k in f:
            lines.append("  %-26s %s" % (k, f[k]))
    errs = report.get("daemon_log_errors") or {}
    if errs:
        lines.append("  daemon log errors: %s" % "; ".join("%s x%d" % (k, v)
                                                          for k, v in sorted(errs.items())))
    per = report.get("per_subscription") or {}
    if per:
        lines.append("  per subscription:")
        lines.append("    %-16s %-11s %8s %9s %8s %6s %5s %6s %10s %9s" % (
            "name", "strategy", "expected", "delivered", "redeliv", "dups", "lost", "order",
            "checkpoint", "restarts"))
        for name, s in per.items():
            lines.append("    %-16s %-11s %8d %9d %8d %6d %5d %6d %10s %9s" % (
                name, s["strategy"], s["expected"], s["deliveries"], s["redeliveries"],
                s["duplicates"], s["lost"], s["order_violations"], s["checkpoint"],
                s["daemon_restarts"]))
    if report.get("problems"):
        lines.append("  PROBLEMS:")
        for p in report["problems"]:
            lines.append("    - " + p)
    lines.append("  result: %s" % ("OK (lost = 0)" if report.get("ok") else "FAILED"))
    return "\n".join(lines)


# ---- fuzzing (scripts/fuzz) ---------------------------------------------------------------

TESTS_DIR = os.path.join(ROOT, "tests")
FUZZ_TARGETS = os.path.join(TESTS_DIR, "fuzz_targets.py")


def _atheris_available() -> Optional[str]:
    """None when atheris imports, else why not."""
    try:
        r = subprocess.run([sys.executable, "-c", "import atheris"], capture_output=True,
                           text=True, timeout=60)
    except Exception as e:  # noqa: BLE001
        return str(e)
    return None if r.returncode == 0 else (r.stderr.strip().splitlines() or ["?"])[-1]


def fuzz_inprocess_atheris(target: str, runs: int, work: str, seed: int, max_len: int,
                           log: Callable[[str], None]) -> Dict[str, Any]:
    """One target under atheris/libFuzzer in a subprocess; findings from its JSONL file."""
    tdir = os.path.join(work, target)
    corpus = os.path.join(tdir, "corpus")
    os.makedirs(corpus, exist_ok=True)
    findings_path = os.path.join(tdir, "findings.jsonl")
    env = dict(os.environ, FUZZ_FINDINGS=findings_path)
    argv = [sys.executable, FUZZ_TARGETS, "atheris", target, "-runs=%d" % runs,
            "-seed=%d" % seed, "-max_len=%d" % max_len, "-timeout=20", "-rss_limit_mb=2048",
            "-artifact_prefix=%s/" % tdir, "-print_final_stats=1", corpus]
    t = time.monotonic()
    out_path = os.path.join(tdir, "libfuzzer.log")
    with open(out_path, "wb") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tdir, env=env,
                             start_new_session=True)
        try:
            rc = p.wait()
        finally:
            end_popen(p, 5.0)
    secs = time.monotonic() - t
    text = open(out_path, "rb").read().decode("utf-8", "replace")
    import re
    done = re.findall(r"Done (\d+) runs in (\d+) second", text)
    executed = int(done[-1][0]) if done else 0
    if not executed:
        m = re.findall(r"stat::number_of_executed_units: (\d+)", text)
        executed = int(m[-1]) if m else 0
    cov = re.findall(r"cov: (\d+) ft: (\d+)", text)
    findings = []
    if os.path.exists(findings_path):
        with open(findings_path) as f:
            findings = [json.loads(line) for line in f if line.strip()]
    if rc != 0:
        # a libFuzzer-level crash: deadly signal, timeout, out of memory
        tail = "\n".join(text.splitlines()[-25:])
        findings.append({"target": target, "kind": "crash", "signature":
                         "libFuzzer exit %d" % rc, "error": tail, "input_b64": "",
                         "traceback": ""})
    return {"target": target, "engine": "atheris (libFuzzer, coverage-guided)",
            "cases": executed, "findings": findings, "seconds": secs,
            "coverage": ("cov %s, features %s" % cov[-1]) if cov else "?",
            "log": out_path}


def fuzz_inprocess_hypothesis(target: str, runs: int, seed: int) -> Dict[str, Any]:
    """Fallback without atheris: hypothesis-generated byte strings, no coverage feedback."""
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import fuzz_targets as ft
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings
    from hypothesis import strategies as st
    fn = ft.BYTE_TARGETS[target]
    findings: Dict[str, dict] = {}
    count = [0]

    @hseed(seed)
    @settings(max_examples=runs, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.binary(max_size=1024))
    def run(data: bytes) -> None:
        count[0] += 1
        try:
            fn(data)
        except Exception as e:  # noqa: BLE001
            rec = ft._finding_record(target, data, e)
            findings.setdefault(rec["signature"], rec)

    t = time.monotonic()
    run()
    return {"target": target, "engine": "hypothesis bytes (no coverage)", "cases": count[0],
            "findings": list(findings.values()), "seconds": time.monotonic() - t,
            "coverage": "-"}


def fuzz_socket(cases: int, work: str, seed: int, log: Callable[[str], None]) -> Dict[str, Any]:
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    import fuzz_targets as ft
    from hypothesis import HealthCheck, Phase, given, seed as hseed, settings
    root = tempfile.mkdtemp(prefix="emfz-", dir="/tmp")
    d = DaemonProcess(root, ["--log-level", "info"])
    fz = None
    t = time.monotonic()
    snapshots_equal = True
    checks = 0
    try:
        d.start()
        with Client(d.socket, timeout=30) as c:
            ctx = ft.setup_ctx(c, root)
        fz = ft.SocketFuzzer(d.socket, ctx, d.running)
        fz.open_idle(8)                  # slow clients hold partial frames throughout
        before = fz.snapshot()
        sweep = ft.sweep_cases(ctx)
        for case in sweep:
            fz.run_case(case)
        log("socket: sweep of every field of every op done (%d cases, %d findings)"
            % (len(sweep), len(fz.findings)))
        rest = max(0, cases - len(sweep))
        strategy = ft.hypothesis_strategies(ctx)

        def compare() -> None:
            nonlocal snapshots_equal, checks
            checks += 1
            now = fz.snapshot()
            if now != before:
                snapshots_equal = False
                fz.finding("the daemon changed (pools/workers/head)", "after %d cases"
                           % fz.cases, "%r -> %r" % (before, now))

        @hseed(seed)
        @settings(max_examples=rest, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(case: dict) -> None:
            fz.run_case(case)
            if fz.cases % 2000 == 0:
                compare()
                log("socket: %d cases, %d findings" % (fz.cases, len(fz.findings)))

        if rest:
            run()
        compare()
        fz.check_idle()
        summary = fz.summary()
    finally:
        if fz is not None:
            fz.close()
        d.cleanup()
        try:
            warnings = _log_summary(d.log_path)
        except Exception:  # noqa: BLE001
            warnings = {}
        shutil.rmtree(root, ignore_errors=True)
    findings = [{"target": "socket", "kind": "socket", "signature": f["what"][:120],
                 "error": f["what"], "case": f["case"], "extra": f.get("extra", "")}
                for f in fz.findings]
    return {"target": "socket", "engine": "hypothesis black box over the control socket",
            "cases": summary["cases"], "findings": findings, "seconds": time.monotonic() - t,
            "coverage": "kinds %s; responses %d; codes %s; snapshot unchanged: %s (%d checks)"
            % (summary["by_kind"], summary["responses"], summary["codes"], snapshots_equal,
               checks),
            "daemon_log": warnings}


def fuzz_main(a: Any) -> int:
    log = (lambda m: None) if a.quiet else (lambda m: print("[fuzz] " + m, flush=True))
    t0 = time.monotonic()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    targets = ["decoder", "subscription", "publish", "selector"]
    socket_cases = 0 if a.no_socket else max(2000, int(a.cases * a.socket_share))
    inproc = 0 if a.no_inprocess else max(0, a.cases - socket_cases)
    per_target = inproc // len(targets) if inproc else 0
    why_not = None if a.no_atheris else _atheris_available()
    if a.no_atheris:
        why_not = "disabled with --no-atheris"
    work = tempfile.mkdtemp(prefix="emfuzz-", dir="/tmp")
    results = []
    try:
        log("seed %d; %d in-process cases per target (%s), %d socket cases; work dir %s"
            % (seed, per_target, "atheris" if why_not is None else
               "hypothesis fallback: atheris unavailable: %s" % why_not, socket_cases, work))
        for i, target in enumerate(targets if per_target else []):
            if why_not is None:
                r = fuzz_inprocess_atheris(target, per_target, work, seed + i, a.max_len, log)
            else:
                r = fuzz_inprocess_hypothesis(target, per_target, seed + i)
            log("%s: %d cases, %d findings, %.1fs, %s" % (target, r["cases"], len(r["findings"]),
                                                          r["seconds"], r["coverage"]))
            results.append(r)
        if socket_cases:
            results.append(fuzz_socket(socket_cases, work, seed, log))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    total = sum(r["cases"] for r in results)
    crashes = sum(1 for r in results for f in r["findings"] if f["kind"] == "crash")
    other = sum(1 for r in results for f in r["findings"] if f["kind"] != "crash")
    print("fuzz run (seed %d)" % seed)
    print("  %-13s %-46s %9s %9s %8s  %s" % ("target", "engine", "cases", "findings", "seconds",
                                             "coverage / notes"))
    for r in results:
        print("  %-13s %-46s %9d %9d %8.1f  %s" % (r["target"], r["engine"], r["cases"],
                                                   len(r["findings"]), r["seconds"],
                                                   r["coverage"]))
    print("  total cases %d in %.1fs; crashes found = %d; other findings = %d"
          % (total, time.monotonic() - t0, crashes, other))
    for r in results:
        if r.get("daemon_log"):
            print("  daemon log (socket fuzzing): %s" % "; ".join(
                "%s x%d" % (k[:90], v) for k, v in sorted(r["daemon_log"].items())[:8]))
    if crashes or other:
        print("  FINDINGS:")
        for r in results:
            for f in r["findings"]:
                print("  - [%s/%s] %s" % (r["target"], f["kind"], f["error"][:500]))
                if f.get("case"):
                    print("      case: %s" % f["case"][:600])
                if f.get("input_b64"):
                    print("      replay: .venv/bin/python tests/fuzz_targets.py replay %s %s"
                          % (r["target"], f["input_b64"][:400]))
                if f.get("traceback"):
                    print("      " + f["traceback"].strip().replace("\n", "\n      ")[-1500:])
    if a.json:
        print(json.dumps({"seed": seed, "total": total, "crashes": crashes, "other": other,
                          "results": [{k: v for k, v in r.items() if k != "findings"}
                                      | {"findings": len(r["findings"])} for r in results]},
                         default=str))
    return 0 if not crashes and not other else 1


# ---- command line ------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="harness.py")
    sp = ap.add_subparsers(dest="role", required=True)
    s = sp.add_parser("subscriber")
    s.add_argument("--path", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--late", type=float, default=0.0)
    s.add_argument("--late-min", type=float, default=0.0)
    s.add_argument("--late-max", type=float, default=0.0)
    s.add_argument("--retry", type=float, default=0.0)
    s = sp.add_parser("lib-subscriber")
    s.add_argument("--path", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--retry", type=float, default=0.0)
    s = sp.add_parser("producer")
    s.add_argument("--socket", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--rate", type=float, default=100.0)
    s.add_argument("--run-id", default="chaos")
    s = sp.add_parser("chaos", help="the chaos run (scripts/chaos)")
    s.add_argument("--worker-kills", type=int, default=1000,
                   help="SIGKILLs of random workers (default 1000)")
    s.add_argument("--daemon-kills", type=int, default=10,
                   help="SIGKILL + restart of the daemon (default 10)")
    s.add_argument("--sigstops", type=int, default=None,
                   help="workers SIGSTOPped past worker_timeout (default worker-kills/100, >= 1)")
    s.add_argument("--resizes", type=int, default=None,
                   help="pool resizes (default worker-kills/20, >= 2)")
    s.add_argument("--subscriber-restarts", type=int, default=None,
                   help="kills/restarts of the disconnecting subscriber (default "
                        "worker-kills/50, >= 1)")
    s.add_argument("--helper-kills", type=int, default=None,
                   help="SIGKILLs of the fork server and the checkpointer, in turn (default "
                        "worker-kills/100, >= 1)")
    s.add_argument("--rate", type=float, default=150.0, help="events published per second")
    s.add_argument("--kill-interval", type=float, default=0.12,
                   help="mean seconds between worker kills")
    s.add_argument("--settle-timeout", type=float, default=180.0,
                   help="seconds to wait for every checkpoint to reach the head at the end")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--keep", action="store_true", help="keep the run directory")
    s.add_argument("--json", action="store_true", help="print the report as JSON too")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    s = sp.add_parser("fuzz", help="the fuzz run (scripts/fuzz)")
    s.add_argument("--cases", type=int, default=100_000,
                   help="total cases, in-process and socket (default 100000)")
    s.add_argument("--socket-share", type=float, default=0.2,
                   help="share of the cases sent over the socket (default 0.2, at least 2000)")
    s.add_argument("--max-len", type=int, default=1024, help="libFuzzer -max_len")
    s.add_argument("--no-atheris", action="store_true",
                   help="in-process fuzzing with hypothesis only (no coverage guidance)")
    s.add_argument("--no-socket", action="store_true")
    s.add_argument("--no-inprocess", action="store_true")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--keep", action="store_true", help="keep the work dir (corpora, logs)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.role == "fuzz":
        return fuzz_main(a)
    if a.role == "chaos":
        cfg = ChaosConfig(worker_kills=a.worker_kills, daemon_kills=a.daemon_kills,
                          sigstops=a.sigstops, resizes=a.resizes, bounces=a.subscriber_restarts,
                          helper_kills=a.helper_kills,
                          rate=a.rate, kill_interval=a.kill_interval,
                          settle_timeout=a.settle_timeout, seed=a.seed, keep=a.keep,
                          verbose=not a.quiet, log=lambda m: print(m, flush=True))
        report = run_chaos(cfg)
        print(format_report(report), flush=True)
        if not report["ok"]:
            print("daemon log tail:\n" + report.get("daemon_log_tail", ""), flush=True)
        if a.json:
            print(json.dumps({k: v for k, v in report.items() if k != "daemon_log_tail"},
                             default=str))
        return 0 if report["ok"] else 1
    if a.role == "subscriber":
        subscriber_main(a.path, a.out, a.seed, a.late, a.late_min, a.late_max, a.retry)
    elif a.role == "lib-subscriber":
        lib_subscriber_main(a.path, a.out, a.seed, a.retry)
    elif a.role == "producer":
        producer_main(a.socket, a.out, a.seed, a.rate, a.run_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
