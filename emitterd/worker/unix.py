"""The unix: sink: connect to the subscriber's socket, say hello, reconnect with backoff."""
import errno
import os
import socket
from typing import Any, Optional

from emitterd import logs, socketpath
from emitterd.loop import monotonic
from emitterd.worker.consumer import ConsumerConn, hello

log = logs.get("worker")
BACKOFF_START = 0.1
BACKOFF_MAX = 5.0


class UnixSink:
    """Keeps one connection to `unix:/path` open while the worker lives."""

    def __init__(self, worker: Any, uri: str) -> None:
        self.worker = worker
        self.path = uri[len("unix:"):]
        self.backoff = BACKOFF_START
        self.timer = None
        self.conn: Optional[ConsumerConn] = None
        self.stopped = False
        self.failures = 0
        self.opened_at = 0.0
        self.connect()

    def connect(self) -> None:
        self.timer = None
        if self.stopped:
            return
        s = None
        try:
            # the socket too: out of descriptors (EMFILE, ENFILE) is one more failed try,
            # not an exception that ends the retries for good
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            self._connect(s)
        except (OSError, socketpath.Refused) as e:
            if s is not None:
                s.close()
            if self.failures == 0:
                if isinstance(e, socketpath.Refused):
                    log.warning("subscriber refused, retrying: the client that named it could "
                                "not connect there itself", path=self.path, why=str(e),
                                uid=self.worker.spec["subscriber_rights"][0],
                                worker=self.worker.index)
                else:
                    log.warning("subscriber not reachable, retrying", path=self.path,
                                error=errno.errorcode.get(e.errno, str(e)),
                                worker=self.worker.index)
            self.failures += 1
            self.timer = self.worker.loop.call_later(self.backoff, self.connect)
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
            return
        if self.failures:
            log.info("subscriber connected", path=self.path, worker=self.worker.index,
                     after_failures=self.failures)
        self.failures = 0
        self.opened_at = monotonic()
        spec = self.worker.spec
        self.conn = ConsumerConn(self.worker, s, "unix")
        self.conn.channel.send_raw(hello(spec["key"], spec["name"], spec["index"]))
        self.worker.consumer_opened(self.conn)

    def _connect(self, s: socket.socket) -> None:
        rights = self.worker.spec.get("subscriber_rights")
        if rights is None:
            s.connect(self.path)
            return
        # walked now, as the client that named it would walk it, and connected through the
        # descriptor held: a link swapped in since the check at start/update changes nothing
        fd = socketpath.open_as(self.path, rights)
        try:
            s.connect(socketpath.fd_path(fd))
        finally:
            os.close(fd)

    def lost(self, conn: ConsumerConn) -> None:
        if conn is self.conn:
            self.conn = None
            if monotonic() - self.opened_at >= BACKOFF_MAX:
                # it served a while: back soon. One that closes at once (or is closed for a
                # bad frame) is no better than a refused connect: the backoff goes on growing
                self.backoff = BACKOFF_START
            if not self.stopped and self.timer is None:
                self.timer = self.worker.loop.call_later(self.backoff, self.connect)
                self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def stop(self) -> None:
        self.stopped = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn is not None:
            self.conn.channel.close("subscriber changed")
