"""One subscription's pool: desired vs actual workers, spawn/retire/reap, restart intensity."""
import signal
import sqlite3
import time
from collections import deque
from typing import Any, Callable, Optional

import psutil

from emitterd import filters, logs, procs, retry
from emitterd.channel import Channel
from emitterd.dispatch import SCAN_LIMIT, Dispatcher
from emitterd.loop import monotonic
from emitterd.worker import main as worker_main

log = logs.get("pool")
PIPE_MAX_FRAME = worker_main.PIPE_MAX_FRAME
# what a worker reports of its deliveries (the rest of its messages are of its own state)
# what Pool._report takes: a worker's delivery reports, and its answer to "forget"
_REPORTS = frozenset(("ack", "nack", "requeue", "waiting", "sent", "forgot"))
EPHEMERAL_IDLE = 60.0       # PROTOCOL §3: an ephemeral subscription nobody attached to


class WorkerHandle:
    """The parent's view of one worker process."""

    _next_wid = 0

    def __init__(self, pool: "Pool", index: int) -> None:
        WorkerHandle._next_wid += 1
        self.wid = WorkerHandle._next_wid
        self.pool = pool
        self.index = index
        self.pid = 0
        self.channel: Optional[Channel] = None
        self.state = "starting"
        self.planned = False          # exit expected: stop, shrink, recycle
        self.consumers = 0
        self.attached = 0             # of them, clients that sent attach (not a unix: sink)
        self.pending_consumers = 0    # handed over, not yet confirmed by the worker
        self.started = monotonic()
        self.last_seen = self.started
        self.spawned_at = time.perf_counter()
        self.proc: Optional[psutil.Process] = None
        self.rss = 0
        self.cpu = 0.0
        self.kill_timer = None
        self.drain_deadline = 0.0
        self.replacement = False      # respawned after an unplanned death
        self.ready_at = 0.0           # CLOCK_MONOTONIC when it said ready (for metrics/bench)
        self.forgetting = 0           # "forget"s sent that the worker has not answered yet

    @property
    def routable_consumers(self) -> int:
        """Consumers events may be routed to: adopted or already handed over (the fd
        travels on the same pipe before any later batch)."""
        return self.consumers + self.pending_consumers

    def send_batch(self, positions: list, frame: bytes, unsent: bool) -> None:
        """unsent: we believe this worker has no consumer, so it must tell us when these go out."""
        msg = {"op": "deliver", "positions": positions, "frame": frame}
        if unsent:
            msg["unsent"] = True
        ctx = self.pool.ctx
        last = max(positions)
        if last > ctx.log.durable:
            # committed, not yet on disk: the worker holds the batch until told "durable"
            msg["held"] = last
            ctx.committer.held.add(self)
        self.channel.send(msg)

    def status(self) -> dict:
        d = self.pool.dispatcher
        return {"index": self.index, "pid": self.pid, "state": self.state, "rss": self.rss,
                "cpu_percent": self.cpu,
                "in_flight": d.worker_in_flight(self.wid) if d else 0,
                "delivered": d.worker_delivered.get(self.index, 0) if d else 0,
                "restarts": self.pool.slot_restarts.get(self.index, 0),
                "consumers": self.consumers + self.pending_consumers}


class Pool:
    """Runs pool_size workers for one subscription and feeds them from its dispatcher."""

    def __init__(self, ctx: Any, key: str, spec: dict, checkpoint: int, created_at: int,
                 subscriber_rights: Optional[list] = None) -> None:
        self.ctx = ctx
        self.key = key
        self.name = ctx.pool_name(key)
        self.spec = spec
        # [uid, groups] of the client that named the subscriber: the workers reach it as
        # that user would (socketpath); None when root or the daemon's own user named it
        self.subscriber_rights = subscriber_rights
        self.created_at = created_at
        self.state = "stopped"
        self.dispatcher: Optional[Dispatcher] = None
        self.slots: dict = {}          # index -> WorkerHandle (starting or ready)
        self.retiring: list = []       # draining WorkerHandles
        self.restarts = 0              # since the pool (last) started: status (PROTOCOL §2)
        self.restarts_total = 0        # since the daemon started: the metric, a counter
        self.slot_restarts: dict = {}
        self._restart_times: deque = deque()
        self._backoffs = 0
        self._backoff_timer = None
        self._last_backoff_end = 0.0
        self._spawn_failures = 0       # in a row; backs the next try off
        self.stopping: Optional[dict] = None
        self._parked_rows = ctx.log.parked_count(key)
        self._ephemeral_timer = None   # deletes an ephemeral subscription nobody attached to
        self._make_dispatcher(checkpoint)

    # ---- setup ---------------------------------------------------------------
    def _make_dispatcher(self, checkpoint: int) -> None:
        spec = self.spec
        matcher = filters.compile_selector(spec["type"], filters.normalize(spec["type"],
                                                                           spec["selector"]))
        self.dispatcher = Dispatcher(self.key, matcher, self.ctx.log, spec["options"], checkpoint,
                                     self.ctx.cfg.max_frame_bytes, self._schedule, self._park,
                                     self._unpark)
        self.dispatcher.name = self.name

    def _schedule(self, when: float) -> None:
        self.ctx.loop.call_at(when, _noop)   # wakes the loop; the end-of-turn pump does the work

    def _park(self, rows: list) -> None:
        # counted here, not recounted: COUNT(*) took 25 ms a park at a million parked rows
        self._parked_rows += self.ctx.log.park(self.key, rows)
        log.info("events parked", pool=self.name, count=len(rows), reason=rows[0][1])

    def replay(self, records: list) -> int:
        """Send parked events again (`parked replay`); how many."""
        n, ahead = self.dispatcher.replay(records)
        if ahead:
            # the cursor is before them (update checkpoint moved back): the log read sends
            # them, and a crash before that reads them again from the checkpoint
            self._unpark(ahead)
        return n + len(ahead)

    def _unpark(self, positions: list) -> None:
        """Replayed parked events handled at last (or ahead of the cursor): their rows go."""
        try:
            self._parked_rows -= self.ctx.log.unpark(self.key, positions)
        except sqlite3.Error as e:
            # handled all the same; the rows stay, so they are listed (and replayable) again
            log.warning("could not remove handled events from the parked list", pool=self.name,
                        count=len(positions), error=str(e))

    def recount_parked(self) -> None:
        self._parked_rows = self.ctx.log.parked_count(self.key)

    @property
    def parked_count(self) -> int:
        """Parked events as listed: those being replayed are not (PROTOCOL §3)."""
        return self._parked_rows - len(self.dispatcher.replaying)

    def parked_rows(self, limit: int) -> list:
        """(position, reason) of the first `limit` parked events as listed."""
        replaying = self.dispatcher.replaying
        rows = self.ctx.log.parked(self.key, limit + len(replaying))
        return [r for r in rows if r[0] not in replaying][:limit]

    @property
    def attach_mode(self) -> bool:
        return self.spec["subscriber"] is None

    @property
    def checkpoint(self) -> int:
        return self.dispatcher.checkpoint

    @property
    def stored_checkpoint(self) -> int:
        """What is persisted: may lie beyond the head for a start_from in the future."""
        return self.dispatcher.cursor_checkpoint

    # ---- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        """Run (again) from the checkpoint with the current spec; resets the restart count."""
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
        self.state = "running"
        self.restarts = 0
        self.slot_restarts = {}
        self._restart_times.clear()
        self._backoffs = 0
        self.dispatcher.options = self.spec["options"]
        self.dispatcher.draining = False
        self.dispatcher.scan_failed = False
        for index in sorted(self.slots):
            if index >= self.spec["pool_size"]:
                self._retire(self.slots.pop(index))
        self._fill()
        self._cancel_ephemeral_timer()          # 60 s from this start, not an earlier one
        self.arm_ephemeral_timer()
        log.info("pool started", pool=self.name, subscription=self.spec["name"],
                 workers=self.spec["pool_size"], checkpoint=self.checkpoint)

    def _fill(self) -> None:
        for index in range(self.spec["pool_size"]):
            if index not in self.slots:
                self._spawn(index)

    def _spawn(self, index: int, replacement: bool = False) -> None:
        t0 = time.perf_counter()
        h = WorkerHandle(self, index)
        cfg = self.ctx.cfg
        spec = {"key": self.key, "name": self.name, "index": index,
                "subscriber": self.spec["subscriber"],
                "subscriber_rights": self.subscriber_rights,
                "ack_timeout": self.spec["options"]["ack_timeout"],
                "heartbeat_interval": cfg.heartbeat_interval,
                "max_frame": cfg.max_frame_bytes, "out_cap": cfg.output_buffer_bytes,
                "nice": cfg.worker_nice, "log": [cfg.log_level, cfg.log_format]}
        spare = self.ctx.spare.take() if replacement else None
        if spare is not None:
            pid, sock = spare
        else:
            title = "emitterd: %s #%d" % (self.name, index)
            try:
                pid, sock = self.ctx.forkserver.spawn(title, "worker", spec)
            except OSError as e:
                self._spawn_failed(index, replacement, e)
                return
        self._spawn_failures = 0
        h.pid = pid
        h.channel = Channel(self.ctx.loop, sock, PIPE_MAX_FRAME,
                            lambda msg: self._on_worker_msg(h, msg), lambda reason: None)
        if spare is not None:
            h.channel.send({"op": "activate", "spec": spec})
        h.replacement = replacement
        self.slots[index] = h
        self.ctx.children[pid] = lambda status: self.on_exit(h, status)
        log.debug("worker spawned", pool=self.name, index=index, pid=pid,
                  fork_ms=round((time.perf_counter() - t0) * 1000, 2))

    def _spawn_failed(self, index: int, replacement: bool, e: OSError) -> None:
        """No worker for the slot (out of file descriptors or processes, say): try again
        later, backing off, so a passing shortage does not leave the slot empty for good
        (its events wait, as while a worker restarts)."""
        self._spawn_failures += 1
        delay = retry.delay(self._spawn_failures)
        log.error("could not start a worker, trying again", pool=self.name, index=index,
                  error=e.strerror or str(e), retry_in=delay)

        def try_again() -> None:
            if (self.state == "running" and self.stopping is None
                    and index < self.spec["pool_size"] and index not in self.slots):
                self._spawn(index, replacement)
        self.ctx.loop.call_later(delay, try_again)

    def _on_worker_msg(self, h: WorkerHandle, msg: dict) -> None:
        h.last_seen = monotonic()
        op = msg.get("op")
        if op in _REPORTS:
            self._report(h, op, msg)
        elif op == "hb":
            pass
        elif op == "consumers":
            self._consumers_changed(h, msg["n"], msg.get("adopted", 0),
                                    msg.get("attached", msg["n"]), msg.get("left", True))
        elif op == "ready":
            if h.state == "starting":
                h.state = "ready"
                h.ready_at = monotonic()
                took = time.perf_counter() - h.spawned_at
                self.ctx.metrics_respawn(took)
                log.debug("worker ready", pool=self.name, index=h.index, pid=h.pid,
                          ms=round(took * 1000, 2), replacement=h.replacement)
                if h.replacement:
                    # workers die here: keep a spare so the next replacement is one message
                    # away (made now, after this one serves, never between a death and its fix)
                    self.ctx.spare.ensure()
                try:
                    h.proc = psutil.Process(h.pid)
                    h.proc.cpu_percent(None)
                    h.rss = h.proc.memory_info().rss
                except (psutil.Error, OSError):     # no fd to read /proc with: the monitor
                    h.proc = None                   # tries again
        if h.state == "draining":
            self._maybe_finish_drain(h)
        if self.stopping is not None:
            self.poll_stop()

    def _report(self, h: WorkerHandle, op: str, msg: dict) -> None:
        """A delivery report or "forgot": reports a worker sent before it forgot (update
        checkpoint) are of the old deliveries, and dropped."""
        if op == "forgot":
            h.forgetting = max(0, h.forgetting - 1)
        elif not h.forgetting:
            self._delivery_report(h, op, msg)

    def _delivery_report(self, h: WorkerHandle, op: str, msg: dict) -> None:
        d = self.dispatcher
        if op == "ack":
            d.on_ack(h.wid, h.index, msg["positions"])
        elif op == "nack":
            d.on_nack(h.wid, msg["positions"], msg.get("action", "retry"), msg.get("reason"))
        elif op == "requeue":
            d.requeue(h.wid, msg["positions"], sent=msg.get("reason") != "no consumer")
        elif op == "waiting":
            d.mark_sent(h.wid, msg["positions"], False)
        elif op == "sent":
            d.mark_sent(h.wid, msg["positions"], True)

    def _consumers_changed(self, h: WorkerHandle, n: int, adopted: int, attached: int,
                           left: bool) -> None:
        """`left`: the connection that closed was an attached consumer its client closed
        (not one the daemon cut off: a retire, a recycle, a subscriber set)."""
        before = self.attached_count()
        # handed-over connections the worker has taken (open or, if their first frame was
        # invalid, closed already): no longer pending
        h.pending_consumers = max(0, h.pending_consumers - adopted)
        h.consumers = n
        h.attached = attached
        if self.attached_count() > 0:
            self._cancel_ephemeral_timer()
        elif before > 0:
            self._last_consumer_gone(left)

    def pending_consumer_gone(self, left: bool) -> None:
        """An attach whose handover did not happen (its client left first, or its worker
        went): if it was the last consumer, the ephemeral rule applies as for any other."""
        if self.attached_count() == 0 and self.ctx.registry.pools.get(self.key) is self:
            self._last_consumer_gone(left)

    def _last_consumer_gone(self, left: bool, **why: Any) -> None:
        """No attached consumer is left. An ephemeral subscription goes if its client closed
        the last one (§3); one the daemon cut off (`left` False) may attach again within
        EPHEMERAL_IDLE, as after a start. A stop is no leaving."""
        if not self.spec["options"]["ephemeral"] or self.stopping is not None:
            return
        if left:
            log.info("ephemeral subscription lost its last consumer", pool=self.name)
            self.ctx.registry.delete(self.key)
            return
        log.info("ephemeral subscription's last consumer was cut off by the daemon; deleted "
                 "in %.0f s unless a consumer attaches" % EPHEMERAL_IDLE, pool=self.name, **why)
        self.arm_ephemeral_timer()

    def arm_ephemeral_timer(self) -> None:
        """An ephemeral subscription with no attached consumer is deleted EPHEMERAL_IDLE
        seconds from now unless one attaches (a no-op if the timer runs already)."""
        if (self.spec["options"]["ephemeral"] and self._ephemeral_timer is None
                and self.stopping is None and self.attached_count() == 0):
            self._ephemeral_timer = self.ctx.loop.call_later(EPHEMERAL_IDLE, self._ephemeral_expired)

    def _cancel_ephemeral_timer(self) -> None:
        if self._ephemeral_timer is not None:
            self._ephemeral_timer.cancel()
            self._ephemeral_timer = None

    def ephemeral_changed(self) -> None:
        """After an update that turned options.ephemeral on or off."""
        if self.spec["options"]["ephemeral"]:
            self.arm_ephemeral_timer()
        else:
            self._cancel_ephemeral_timer()

    def _ephemeral_expired(self) -> None:
        self._ephemeral_timer = None
        # this pool, still ephemeral: not a subscription started under the same key after
        # this one was deleted, nor this one started again as a durable one
        if (not self.spec["options"]["ephemeral"] or self.stopping is not None
                or self.ctx.registry.pools.get(self.key) is not self):
            return
        if self.attached_count() > 0:
            # only a consumer being handed over: look again once it is (or is not) taken
            self._ephemeral_timer = self.ctx.loop.call_later(1.0, self._ephemeral_expired)
            return
        log.info("ephemeral subscription had no consumer for %.0f s, deleting" % EPHEMERAL_IDLE,
                 pool=self.name)
        self.ctx.registry.delete(self.key)

    def attached_count(self) -> int:
        """Attached consumers (§3's, for the ephemeral rule), with those being handed over."""
        return sum(h.attached + h.pending_consumers
                   for h in list(self.slots.values()) + self.retiring)

    def consumer_count(self) -> int:
        return sum(h.consumers + h.pending_consumers
                   for h in list(self.slots.values()) + self.retiring)

    def routing_slots(self) -> list:
        slots = self.slots
        out = []
        for i in range(self.spec["pool_size"]):
            h = slots.get(i)
            out.append(h if h is not None and h.state == "ready" else None)
        return out

    def pump(self, scan_budget: int = SCAN_LIMIT) -> bool:
        """Deliver what there is room for; True when work was left. `scan_budget` bounds
        the records read only to move the checkpoint of a pool that has nobody to deliver
        to (stopped, failed, no consumer): the registry shares one budget among them."""
        if self.dispatcher is not None:
            self.dispatcher.scanned = 0
        if self.state in ("stopped", "failed") and self.stopping is None:
            try:
                return self.dispatcher.pass_unmatched(scan_budget)
            except sqlite3.DatabaseError as e:
                # it delivers nothing; its checkpoint stays, and the error shows at its start
                self.dispatcher.scan_failed = True
                log.error("the event log cannot be read for a pool that is %s; its checkpoint "
                          "stays where it is" % self.state, pool=self.name, error=str(e))
                return False
        if (self.state not in ("running", "backoff") or self.dispatcher is None
                or (self.stopping is not None and self.stopping["terminated"])):
            return False
        return self.dispatcher.pump(self.routing_slots(), self.attach_mode, scan_budget)

    # ---- worker exits ----------------------------------------------------------
    def on_exit(self, h: WorkerHandle, status: int) -> None:
        """Called by the reaper when this worker's process has exited."""
        if h.kill_timer is not None:
            h.kill_timer.cancel()
        if h.channel is not None:
            # what it said before it died may still be unread (the exit can be reaped first):
            # its acks (else those events go out again) and its "sent" (else an event that
            # reached a consumer comes again with the same attempt)
            if self.dispatcher is not None:
                for msg in h.channel.read_rest():
                    op = msg.get("op")
                    if op in _REPORTS:
                        self._report(h, op, msg)
            h.channel.close("worker exited")
        in_slot = self.slots.get(h.index) is h
        if in_slot:
            del self.slots[h.index]
        if h in self.retiring:
            self.retiring.remove(h)
        lost = self.dispatcher.worker_lost(h.wid) if self.dispatcher else 0
        if h.attached + h.pending_consumers and self.attached_count() == 0:
            # its consumers went with it (the worker reports no close when it dies): cut
            # off by the daemon, not gone by their own will
            self._last_consumer_gone(False, worker_exited=h.index)
        if h.planned:
            log.debug("worker stopped", pool=self.name, index=h.index, pid=h.pid)
            self._check_stopped()
            return
        if not in_slot:
            # a retired (draining) worker: nothing to restart, and its index may be
            # another worker's by now (a shrink then a grow); a respawn would orphan that one
            log.warning("draining worker died", pool=self.name, index=h.index, pid=h.pid,
                        how=procs.describe_status(status), redeliver=lost)
            self._check_stopped()
            return
        # stopping (or stopped, in backoff), or shrunk past it: nothing is restarted, so
        # no restart counts
        restart = (self.state == "running" and self.stopping is None
                   and h.index < self.spec["pool_size"])
        # in backoff the slot is filled again when the backoff ends: an unplanned restart
        # too (counted, though not against the restart intensity the backoff answers)
        refilled = (self.state == "backoff" and self.stopping is None
                    and h.index < self.spec["pool_size"])
        if restart or refilled:
            self.restarts += 1
            self.restarts_total += 1
            self.slot_restarts[h.index] = self.slot_restarts.get(h.index, 0) + 1
        log.warning("worker died", pool=self.name, index=h.index, pid=h.pid,
                    how=procs.describe_status(status), redeliver=lost,
                    **({"restarts": self.restarts} if restart else {"state": self.state}))
        if not restart:
            self._check_stopped()
            return
        now = monotonic()
        period = self.spec["options"]["restart_period"]
        times = self._restart_times
        while times and times[0] < now - period:
            times.popleft()
        if len(times) >= self.spec["options"]["max_restarts"]:
            self._enter_backoff()
            return
        times.append(now)
        self._spawn(h.index, replacement=True)

    def fail(self, why: str) -> None:
        """State failed: its workers stop, nothing is delivered until start or update."""
        if self.stopping is not None:
            self.stopping["terminated"] = True     # the stop asked for finishes as stopped
        else:
            if self._backoff_timer is not None:
                self._backoff_timer.cancel()
                self._backoff_timer = None
            self.state = "failed"
        log.error("pool failed: %s; `emitterctl start` or `update` runs it again" % why,
                  pool=self.name, key=self.key, restarts=self.restarts)
        for h in list(self.slots.values()) + list(self.retiring):
            self._terminate(h)
        self.ctx.spare.release_if_idle()
        self._check_stopped()

    def _enter_backoff(self) -> None:
        cfg = self.ctx.cfg
        now = monotonic()
        if self._last_backoff_end and now - self._last_backoff_end > 2 * self.spec["options"]["restart_period"]:
            self._backoffs = 0
        self._backoffs += 1
        if self._backoffs > cfg.max_backoffs:
            self.fail("restart intensity exceeded repeatedly; its workers keep dying (see the "
                      "lines above)")
            return
        initial, maximum = cfg.restart_backoff
        delay = min(initial * 2 ** (self._backoffs - 1), maximum)
        self.state = "backoff"
        log.warning("pool in backoff: too many restarts", pool=self.name, delay=delay,
                    restarts=self.restarts, backoffs=self._backoffs)
        self._backoff_timer = self.ctx.loop.call_later(delay, self._end_backoff)

    def _end_backoff(self) -> None:
        self._backoff_timer = None
        if self.state != "backoff":
            return
        self.state = "running"
        self._last_backoff_end = monotonic()
        self._restart_times.clear()
        self._fill()

    def _terminate(self, h: WorkerHandle) -> None:
        """Planned end of a worker: close its pipe (it exits on EOF), SIGTERM, SIGKILL after grace."""
        h.planned = True
        h.state = "draining"
        if self.slots.get(h.index) is h:
            del self.slots[h.index]
        if h not in self.retiring:
            self.retiring.append(h)
        if h.channel is not None:
            h.channel.close("retired")
        procs.kill(h.pid, signal.SIGTERM)
        if h.kill_timer is None:
            h.kill_timer = self.ctx.loop.call_later(self.ctx.cfg.worker_grace,
                                                    lambda: procs.kill(h.pid, signal.SIGKILL))

    def kill_unresponsive(self, h: WorkerHandle, why: str) -> None:
        log.warning("worker unresponsive, killing", pool=self.name, index=h.index, pid=h.pid, why=why)
        procs.kill(h.pid, signal.SIGKILL)

    # ---- resize, retire, recycle -------------------------------------------------
    def resize(self, n: int) -> None:
        self.spec["pool_size"] = n
        if self.state not in ("running", "backoff") or self.stopping is not None:
            return           # the next start runs n; a stop ends every worker it has
        # in backoff too: a shrink retires now (the end of the backoff only fills slots)
        for index in sorted(self.slots):
            if index >= n:
                self._retire(self.slots.pop(index))
        if self.state == "running":
            self._fill()

    def _retire(self, h: WorkerHandle) -> None:
        h.state = "draining"
        h.drain_deadline = monotonic() + self.ctx.cfg.drain_timeout
        self.retiring.append(h)
        self._maybe_finish_drain(h)

    def _ackable(self, h: WorkerHandle) -> int:
        """What a drain waits for on worker h: its events in flight, if it has a consumer to
        ack them; none if it has not (its subscriber unreachable): those are delivered again
        after it stops, and waiting drain_timeout for them gains nothing."""
        return self.dispatcher.worker_in_flight(h.wid) if h.routable_consumers > 0 else 0

    def _maybe_finish_drain(self, h: WorkerHandle) -> None:
        if h.planned:
            return
        if self._ackable(h) == 0 or monotonic() >= h.drain_deadline:
            self._terminate(h)

    def recycle(self, h: WorkerHandle, why: str) -> None:
        """Replace a worker gracefully: the replacement first, then the old one drains."""
        if self.slots.get(h.index) is not h or self.state != "running" or self.stopping:
            return
        log.info("recycling worker", pool=self.name, index=h.index, pid=h.pid, why=why)
        del self.slots[h.index]
        self._retire(h)
        self._spawn(h.index)

    def forgive_silence(self, now: float) -> None:
        """The parent did not run until `now`: worker silence is timed from here."""
        for h in list(self.slots.values()):
            h.last_seen = max(h.last_seen, now)

    def tick(self, now: float) -> None:
        """Periodic: liveness of workers, drains that timed out, a stop in progress."""
        timeout = self.ctx.cfg.worker_timeout
        for h in list(self.slots.values()):
            if now - h.last_seen > timeout and not h.planned:
                self.kill_unresponsive(h, "no heartbeat for %.1fs" % (now - h.last_seen))
                h.last_seen = now   # one kill per timeout; the reaper does the rest
        for h in list(self.retiring):
            self._maybe_finish_drain(h)
        if self.stopping is not None:
            self.poll_stop()

    # ---- stop ------------------------------------------------------------------
    def stop(self, drain_timeout: float, done: Callable[[], Any], persist_state: bool = True) -> None:
        """Drain in-flight events up to drain_timeout, then stop every worker; done() after."""
        if self.state in ("stopped",) and not self.slots and not self.retiring:
            done()
            return
        if self.stopping is not None:
            # a stop already drains: this one (a SIGTERM's, say) may not wait longer than
            # it asked for, or the daemon would outlive the service manager's stop timeout
            st = self.stopping
            st["deadline"] = min(st["deadline"], monotonic() + drain_timeout)
            st["persist"] = st["persist"] or persist_state   # a client's stop joining a shutdown's
            st["waiters"].append(done)
            self.poll_stop()
            return
        if self._backoff_timer is not None:
            self._backoff_timer.cancel()
            self._backoff_timer = None
            self.state = "running"     # no backoff to wait out: it drains, and reads running
        self.dispatcher.draining = True
        self.stopping = {"deadline": monotonic() + drain_timeout, "waiters": [done],
                         "terminated": False, "persist": persist_state}
        self.poll_stop()

    def poll_stop(self) -> None:
        st = self.stopping
        if st is None:
            return
        if not st["terminated"]:
            held = self.dispatcher.held_by_workers()
            ackable = sum(map(self._ackable, list(self.slots.values()) + self.retiring))
            if ackable and monotonic() < st["deadline"]:
                return
            st["terminated"] = True
            if ackable:
                log.warning("drain timed out, unacked events will be redelivered", pool=self.name,
                            unacked=held)
            elif held:
                log.info("drain over: the workers holding the rest have no consumer connected; "
                         "those events will be delivered again", pool=self.name, unacked=held)
            for h in list(self.slots.values()) + list(self.retiring):
                self._terminate(h)
        self._check_stopped()

    def _check_stopped(self) -> None:
        st = self.stopping
        if st is None or not st["terminated"] or self.slots or self.retiring:
            return
        self.stopping = None
        self.state = "stopped"
        cp = self.checkpoint
        # unfinished events stay queued (attempts kept) and after the checkpoint on disk.
        # A shutdown's stop (persist False) saves nothing here: the daemon's last
        # flush_checkpoints saves every pool's checkpoint in one commit, not one per pool
        if st["persist"]:
            self.ctx.registry.persist(self, desired="stopped")
        log.info("pool stopped", pool=self.name, checkpoint=cp)
        self.ctx.spare.release_if_idle()
        for cb in st["waiters"]:
            cb()

    # ---- status ------------------------------------------------------------------
    def status(self) -> dict:
        d = self.dispatcher
        workers = [h.status() for h in sorted(self.slots.values(), key=lambda h: h.index)]
        workers += [h.status() for h in sorted(self.retiring, key=lambda h: h.index)]
        return {"key": self.key, "name": self.name, "subscription": self.spec,
                "state": self.state, "checkpoint": d.checkpoint, "head": self.ctx.log.head,
                "in_flight": d.in_flight, "delivered": d.delivered, "retried": d.retried,
                "parked": self.parked_count, "restarts": self.restarts, "workers": workers}

    def forget_in_flight(self) -> None:
        """After the dispatcher's checkpoint moved: the workers drop the old deliveries'
        bookkeeping too (their consumers' late acks are then ignored)."""
        for h in self._tell_workers({"op": "forget"}):
            h.forgetting += 1     # until its "forgot": what it reports is of the old deliveries

    def configure_workers(self) -> None:
        """Tell the workers (and the dispatcher) the subscription's and the daemon's
        settings that apply live."""
        cfg = self.ctx.cfg
        self.dispatcher.max_frame = cfg.max_frame_bytes
        self._tell_workers({"op": "configure", "subscriber": self.spec["subscriber"],
                            "subscriber_rights": self.subscriber_rights,
                            "ack_timeout": self.spec["options"]["ack_timeout"],
                            "max_frame": cfg.max_frame_bytes, "out_cap": cfg.output_buffer_bytes,
                            "log": [cfg.log_level, cfg.log_format]})

    def _tell_workers(self, msg: dict) -> list:
        """Send `msg` to every worker alive, draining ones included; the handles told."""
        told = [h for h in list(self.slots.values()) + self.retiring if h.channel is not None]
        for h in told:
            h.channel.send(msg)
        return told


def _noop() -> None:
    pass
