"""metrics: Prometheus text exposition of the daemon's state, built with prometheus-client."""
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from emitterd.control.common import only_keys
from emitterd.loop import monotonic


class _Collector:
    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def collect(self) -> Any:
        ctx = self.ctx
        head = ctx.log.head
        g = GaugeMetricFamily("emitterd_log_head", "Last position in the event log")
        g.add_metric([], head)
        yield g
        c = CounterMetricFamily("emitterd_published_events", "Events appended since start")
        c.add_metric([], ctx.committer.published)
        yield c
        g = GaugeMetricFamily("emitterd_uptime_seconds", "Seconds since the daemon started")
        g.add_metric([], monotonic() - ctx.started)
        yield g
        g = GaugeMetricFamily("emitterd_connections", "Open control connections")
        g.add_metric([], len(ctx.server.conns))
        yield g
        g = GaugeMetricFamily("emitterd_attached_consumers",
                              "Attached consumer connections (max_connections counts them "
                              "with emitterd_connections)")
        g.add_metric([], ctx.registry.consumer_count())
        yield g
        labels = ["key", "name"]
        fam = {
            "delivered": CounterMetricFamily("emitterd_pool_delivered", "Events acked", labels=labels),
            "retried": CounterMetricFamily("emitterd_pool_retried", "Deliveries made again after a nack retry or timeout", labels=labels),
            "restarts": CounterMetricFamily("emitterd_pool_restarts", "Unplanned worker restarts", labels=labels),
            "parked": GaugeMetricFamily("emitterd_pool_parked", "Parked events", labels=labels),
            "in_flight": GaugeMetricFamily("emitterd_pool_in_flight", "Unfinished events", labels=labels),
            "lag": GaugeMetricFamily("emitterd_pool_lag", "head - checkpoint", labels=labels),
            "checkpoint": GaugeMetricFamily("emitterd_pool_checkpoint", "Checkpoint position", labels=labels),
            "workers": GaugeMetricFamily("emitterd_pool_workers", "Worker processes", labels=labels),
        }
        state = GaugeMetricFamily("emitterd_pool_state", "1 for the pool's current state",
                                  labels=labels + ["state"])
        wl = ["key", "index"]
        rss = GaugeMetricFamily("emitterd_worker_rss_bytes", "Worker resident memory", labels=wl)
        cpu = GaugeMetricFamily("emitterd_worker_cpu_percent", "Worker CPU use", labels=wl)
        consumers = GaugeMetricFamily("emitterd_worker_consumers",
                                      "Open consumer connections (unix subscriber or attached): "
                                      "0 means the worker has nobody to deliver to",
                                      labels=wl)
        ready = GaugeMetricFamily("emitterd_worker_ready_time_seconds",
                                  "CLOCK_MONOTONIC time at which the worker said ready "
                                  "(system-wide clock: lets a benchmark time a respawn exactly)",
                                  labels=wl)
        for pool in list(ctx.registry.pools.values()):
            st = pool.status()
            lv = [pool.key, pool.spec["name"]]
            for k in ("delivered", "retried", "parked", "in_flight", "checkpoint"):
                fam[k].add_metric(lv, st[k])
            # not status' restarts, which a start sets back to 0: a counter never goes back
            fam["restarts"].add_metric(lv, pool.restarts_total)
            fam["lag"].add_metric(lv, max(0, head - st["checkpoint"]))
            fam["workers"].add_metric(lv, len(st["workers"]))
            state.add_metric(lv + [st["state"]], 1)
            seen = set()
            for w in st["workers"]:
                # a retiring worker (draining) can share its index with its successor after
                # a shrink and a grow: one series per label set, the live worker's (first)
                if w["index"] in seen:
                    continue
                seen.add(w["index"])
                rss.add_metric([pool.key, str(w["index"])], w["rss"])
                cpu.add_metric([pool.key, str(w["index"])], w["cpu_percent"])
                consumers.add_metric([pool.key, str(w["index"])], w["consumers"])
            for h in pool.slots.values():
                if h.ready_at:
                    ready.add_metric([pool.key, str(h.index)], h.ready_at)
        yield from fam.values()
        yield state
        yield rss
        yield cpu
        yield consumers
        yield ready


def render(ctx: Any) -> str:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Collector(ctx))
    return generate_latest(reg).decode("utf-8")


def metrics(ctx: Any, req: Any) -> dict:
    only_keys(req.args, ())
    return {"text": render(ctx)}
