"""All pools of the daemon: create, look up, persist, delete; checkpoint flushing.

A subscription whose change cannot be written (a full disk) keeps the change in memory: the
daemon goes on with it and writes it at the next checkpoint flush that can, and the
operation that made it answers `unavailable` saying so (unsaved_error)."""
import sqlite3
import time
from typing import Any, Callable, Optional

from emitterd import logs
from emitterd.dispatch import SCAN_LIMIT
from emitterd.errors import UNAVAILABLE, ProtocolError
from emitterd.loop import monotonic
from emitterd.pool import EPHEMERAL_IDLE, Pool

log = logs.get("registry")
STALL_SECONDS = 2.0     # between ticks (every 0.5 s at most), longer means we did not run


class Registry:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.pools: dict = {}
        self.desired: dict = {}      # key -> "running" | "stopped" (what a restart brings back)
        self._saved: dict = {}       # key -> checkpoint last written
        self._flush_failures = 0     # flush_checkpoints failed in a row
        self._flush_said = logs.Throttle(burst=1, period=60.0)
        self._unsaved: dict = {}     # key -> why the subscription's last change is not on disk
        self._undeleted: dict = {}   # key -> why a deleted subscription is still on disk
        self._last_tick = monotonic()
        self._pump_from = 0          # pump_all starts here: see its docstring

    def load(self) -> None:
        """Bring back every stored subscription; those that were running run again."""
        for row in self.ctx.log.load_subscriptions():
            key, spec = row["key"], row["spec"]
            pool = Pool(self.ctx, key, spec, row["checkpoint"], row["created_at"],
                        row["subscriber_rights"])
            self.pools[key] = pool
            self.desired[key] = row["desired"]
            self._saved[key] = row["checkpoint"]
            if row["desired"] == "running":
                pool.start()
            if spec["options"].get("ephemeral") and row["desired"] == "running":
                # its consumers went with the daemon that stopped: they have as long to
                # attach again as after a start (§3; start() armed the timer), then it goes.
                # A stopped one stays stopped, as it would have in the run before.
                log.info("ephemeral subscription restored; deleted in %.0f s unless a "
                         "consumer attaches" % EPHEMERAL_IDLE, pool=pool.name)
        if len(self.pools) > self.ctx.cfg.max_subscriptions:
            log.warning("more subscriptions are stored than max_subscriptions allows: all are "
                        "kept, and start of a new one is refused until some are deleted",
                        total=len(self.pools), max_subscriptions=self.ctx.cfg.max_subscriptions)
        log.info("subscriptions loaded", total=len(self.pools),
                 running=sum(1 for p in self.pools.values() if p.state == "running"))

    def create(self, key: str, spec: dict, subscriber_rights: Optional[list] = None) -> Pool:
        head = self.ctx.log.head
        sf = spec["start_from"]
        # a start_from beyond the head is kept: the cursor waits there (reported checkpoint <= head)
        checkpoint = 0 if sf == "origin" else head if sf == "now" else sf - 1
        pool = Pool(self.ctx, key, spec, checkpoint, int(time.time() * 1_000_000),
                    subscriber_rights)
        # stored first: a subscription that cannot be stored is refused, not half made
        try:
            self._save(pool, "running")
        except sqlite3.Error as e:
            log.error("could not store a new subscription", key=key, error=str(e))
            raise ProtocolError(UNAVAILABLE, "the subscription could not be stored: %s" % e) \
                from None
        self._undeleted.pop(key, None)
        self.pools[key] = pool
        self.desired[key] = "running"
        return pool

    def _save(self, pool: Pool, desired: str) -> None:
        """Write the pool's subscription (spec, desired state, checkpoint); sqlite3.Error."""
        cp = pool.stored_checkpoint
        self.ctx.log.save_subscription(pool.key, pool.spec, desired, cp, pool.created_at,
                                       pool.subscriber_rights)
        self._saved[pool.key] = cp

    def persist(self, pool: Pool, desired: Optional[str] = None) -> None:
        """Write the pool's subscription; if that fails it is written at a later flush
        (see the module's docstring)."""
        if pool.key not in self.pools:
            return
        if desired is not None:
            self.desired[pool.key] = desired
        try:
            self._save(pool, self.desired[pool.key])
        except sqlite3.Error as e:
            if pool.key not in self._unsaved:
                log.error("could not save a subscription; retrying every checkpoint flush",
                          pool=pool.name, error=str(e))
            self._unsaved[pool.key] = str(e)
            return
        if self._unsaved.pop(pool.key, None) is not None:
            log.info("subscription saved at last", pool=pool.name)

    def unsaved_error(self, key: str, what: str) -> Optional[ProtocolError]:
        """`unavailable` for an operation whose change (`what`) is not on disk yet."""
        why = self._unsaved.get(key) or self._undeleted.get(key)
        if why is None:
            return None
        return ProtocolError(UNAVAILABLE, "%s, but that could not be saved (%s); the daemon "
                             "saves it once it can, and a restart before then undoes it"
                             % (what, why))

    def _retry_unsaved(self) -> None:
        for key in list(self._unsaved):
            pool = self.pools.get(key)
            if pool is None:
                del self._unsaved[key]
            else:
                self.persist(pool)
        for key in list(self._undeleted):
            self._delete_stored(key)

    def _delete_stored(self, key: str) -> None:
        try:
            self.ctx.log.delete_subscription(key)
        except sqlite3.Error as e:
            if key not in self._undeleted:
                log.error("could not delete a subscription from disk; retrying every "
                          "checkpoint flush", key=key, error=str(e))
            self._undeleted[key] = str(e)
            return
        if self._undeleted.pop(key, None) is not None:
            log.info("subscription deleted from disk at last", key=key)

    def flush_checkpoints(self) -> None:
        """Persist every checkpoint that moved since the last flush, and the stream heads
        that moved (one transaction)."""
        if self._unsaved or self._undeleted:
            self._retry_unsaved()
        changed = {}
        for key, pool in self.pools.items():
            cp = pool.stored_checkpoint
            if self._saved.get(key) != cp:
                changed[key] = cp
        if changed or self.ctx.log.unsaved_heads:
            try:
                self.ctx.log.save_checkpoints(changed)
            except Exception as e:  # a full disk must not stop delivery; we retry next tick
                # tried once a second while it lasts: said once a minute
                self._flush_failures += 1
                extra = self._flush_said.allow()
                if extra is not None:
                    log.error("could not persist checkpoints; trying again every checkpoint "
                              "interval", error=str(e), failures=self._flush_failures, **extra,
                              pools=",".join(self.pools[k].name for k in sorted(changed)[:5])
                              + (" and %d more" % (len(changed) - 5) if len(changed) > 5 else ""))
                return
            if self._flush_failures:
                log.info("checkpoints persisted again", after_failures=self._flush_failures)
                self._flush_failures = 0
                self._flush_said.reset()
            self._saved.update(changed)

    def delete(self, key: str, done: Optional[Callable[[], Any]] = None) -> None:
        """Stop a pool without draining and forget it (and its parked events)."""
        pool = self.pools.get(key)
        if pool is None:
            if done:
                done()
            return

        def forget() -> None:
            if self.pools.get(key) is pool:
                del self.pools[key]
                self.desired.pop(key, None)
                self._saved.pop(key, None)
                self._unsaved.pop(key, None)
                self._delete_stored(key)
                log.info("subscription deleted", pool=pool.name)
            if done:
                done()
        pool.stop(0.0, forget)

    def consumer_count(self) -> int:
        """Attached consumer connections across all pools (handed to workers)."""
        return sum(p.consumer_count() for p in self.pools.values() if p.attach_mode)

    def pump_all(self) -> bool:
        """Pump every pool once; True when work was left. The scans that only move the
        checkpoints of pools nobody is delivered to share one budget a turn, taken in turn
        from where the last turn's ran out: a thousand stopped pools behind the log once
        read 20,000 records each per turn, and the loop stalled for seconds."""
        more = False
        pools = list(self.pools.values())
        start = self._pump_from % len(pools) if pools else 0
        budget = SCAN_LIMIT
        spent_at = None
        for i in range(len(pools)):
            pool = pools[(start + i) % len(pools)]
            try:
                if pool.pump(budget):
                    more = True
                if pool.dispatcher is not None and pool.dispatcher.scanned:
                    budget = max(0, budget - pool.dispatcher.scanned)
                    if budget == 0 and spent_at is None:
                        spent_at = (start + i + 1) % len(pools)
            except Exception as e:
                # one pool's failure (a log page it cannot read, a bug) must not stop the
                # pools after it in this loop, on every turn from now on
                log.exception("delivery failed for a pool", pool=pool.name)
                if isinstance(e, sqlite3.DatabaseError):
                    why = ("the event log cannot be read for it (%s); restore it from a "
                           "backup (README: Backup and restore)" % e)
                else:
                    why = "delivery raised %s (a bug: the traceback is above)" % type(e).__name__
                pool.fail(why)
        if spent_at is not None:
            self._pump_from = spent_at
        return more

    def tick(self, now: float) -> None:
        gap = now - self._last_tick
        self._last_tick = now
        if gap > STALL_SECONDS:
            # We did not run (SIGSTOP, a frozen cgroup, a debugger, starvation): the
            # workers' heartbeats of that time still wait unread in their pipes, so their
            # silence is ours; judged from now on, not killed for it.
            log.warning("the daemon did not run for %.1f s (stopped, frozen or starved); "
                        "worker heartbeats are timed from now" % gap)
            for pool in self.pools.values():
                pool.forgive_silence(now)
        for pool in list(self.pools.values()):
            pool.tick(now)
