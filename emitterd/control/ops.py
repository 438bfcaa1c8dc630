"""The one table from op name to handler (PROTOCOL §2 operations)."""
from emitterd.control import basic, consumers, events, metrics, parked, pools

OPS = {
    "ping": basic.ping,
    "start": pools.start,
    "stop": pools.stop,
    "update": pools.update,
    "list": pools.list_,
    "status": pools.status,
    "publish": events.publish,
    "attach": consumers.attach,
    "parked": parked.parked,
    "metrics": metrics.metrics,
}
