"""ping."""
import os
from typing import Any

from emitterd import __version__
from emitterd.control.common import only_keys
from emitterd.loop import monotonic


def ping(ctx: Any, req: Any) -> dict:
    only_keys(req.args, ())
    return {"version": __version__, "pid": os.getpid(), "store_id": ctx.cfg.store_id,
            "uptime": monotonic() - ctx.started, "head": ctx.log.head,
            # beyond §2's fields: a client whose pool stopped can tell a shutdown from a stop
            "shutting_down": ctx.shutting_down}
