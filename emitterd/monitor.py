"""psutil sampling of workers (RSS, CPU) and recycling of workers that grow too large."""
from typing import Any

import psutil


def sample(ctx: Any) -> None:
    """Refresh rss/cpu of every worker; recycle any whose RSS passes max_worker_rss."""
    limit = ctx.cfg.max_worker_rss
    for pool in list(ctx.registry.pools.values()):
        for h in list(pool.slots.values()) + list(pool.retiring):
            try:
                if h.proc is None:
                    if h.state == "starting":
                        continue
                    # unset when it got ready (out of descriptors then, say): it is our
                    # child until reaped, so its pid is still its own
                    h.proc = psutil.Process(h.pid)
                with h.proc.oneshot():
                    h.rss = h.proc.memory_info().rss
                    h.cpu = h.proc.cpu_percent(None)
            except (psutil.Error, OSError):     # gone, or no fd to read /proc with now
                continue
            if limit and h.rss > limit and h.state == "ready":
                pool.recycle(h, "rss %d > max_worker_rss %d" % (h.rss, limit))
