"""All pools of the daemon: create, look up, persist, delete; checkpoint flushing."""
import time
from typing import Any, Callable, Optional

from emitterd import logs
from emitterd.pool import Pool

log = logs.get("registry")


class Registry:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.pools: dict = {}
        self.desired: dict = {}      # key -> "running" | "stopped" (what a restart brings back)
        self._saved: dict = {}       # key -> checkpoint last written

    def load(self) -> None:
        """Bring back every stored subscription; those that were running run again."""
        for row in self.ctx.log.load_subscriptions():
            key, spec = row["key"], row["spec"]
            if spec["options"].get("ephemeral"):
                self.ctx.log.delete_subscription(key)
                continue
            pool = Pool(self.ctx, key, spec, row["checkpoint"], row["created_at"])
            self.pools[key] = pool
            self.desired[key] = row["desired"]
            self._saved[key] = row["checkpoint"]
            if row["desired"] == "running":
                pool.start()
        log.info("subscriptions loaded", total=len(self.pools),
                 running=sum(1 for p in self.pools.values() if p.state == "running"))

    def create(self, key: str, spec: dict) -> Pool:
        head = self.ctx.log.head
        sf = spec["start_from"]
        # a start_from beyond the head is kept: the cursor waits there (reported checkpoint <= head)
        checkpoint = 0 if sf == "origin" else head if sf == "now" else sf - 1
        pool = Pool(self.ctx, key, spec, checkpoint, int(time.time() * 1_000_000))
        self.pools[key] = pool
        self.desired[key] = "running"
        self.persist(pool, "running")
        return pool

    def persist(self, pool: Pool, desired: Optional[str] = None) -> None:
        if pool.key not in self.pools:
            return
        if desired is not None:
            self.desired[pool.key] = desired
        cp = pool.stored_checkpoint
        self.ctx.log.save_subscription(pool.key, pool.spec, self.desired[pool.key], cp,
                                       pool.created_at)
        self._saved[pool.key] = cp

    def flush_checkpoints(self) -> None:
        """Persist every checkpoint that moved since the last flush, and the stream heads
        that moved (one transaction)."""
        changed = {}
        for key, pool in self.pools.items():
            cp = pool.stored_checkpoint
            if self._saved.get(key) != cp:
                changed[key] = cp
        if changed or self.ctx.log.unsaved_heads:
            try:
                self.ctx.log.save_checkpoints(changed)
            except Exception as e:  # a full disk must not stop delivery; we retry next tick
                log.error("could not persist checkpoints", error=str(e))
                return
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
                self.ctx.log.delete_subscription(key)
                log.info("subscription deleted", pool=pool.name)
            if done:
                done()
        pool.stop(0.0, forget)

    def consumer_count(self) -> int:
        """Attached consumer connections across all pools (handed to workers)."""
        return sum(p.consumer_count() for p in self.pools.values() if p.attach_mode)

    def pump_all(self) -> bool:
        more = False
        for pool in list(self.pools.values()):
            if pool.pump():
                more = True
        return more

    def tick(self, now: float) -> None:
        for pool in list(self.pools.values()):
            pool.tick(now)
