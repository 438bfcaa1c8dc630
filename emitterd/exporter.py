"""Optional Prometheus exporter on metrics_listen: a tiny HTTP/1.0 responder inside the loop.

prometheus-client's own server runs in a thread, and the parent runs none, so this
answers `GET /metrics` from the selector loop with the same text as the `metrics` op.
"""
import selectors
import socket
from typing import Any, Callable

from emitterd import logs
from emitterd.settings import parse_hostport

log = logs.get("metrics")
MAX_REQUEST = 8192
MAX_SCRAPES = 16         # connections served at once; more are closed at accept
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Exporter:
    def __init__(self, loop: Any, listen: str, render: Callable[[], str]) -> None:
        self.loop = loop
        self.render = render
        self.conns: set = set()        # scrapes being read or answered
        host, port = parse_hostport(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(16)
        except OSError as e:
            self.sock.close()
            raise RuntimeError("cannot listen for metrics on %s: %s"
                               % (listen, e.strerror or e)) from None
        self.sock.setblocking(False)
        self.address = "%s:%d" % (host if family == socket.AF_INET else "[%s]" % host,
                                  self.sock.getsockname()[1])
        loop.add_reader(self.sock, self._accept)
        log.info("metrics exporter listening", address=self.address)

    def _accept(self, mask: int) -> None:
        conn = self.loop.accept(self.sock, "metrics scrapes", log)
        if conn is None:
            return
        if len(self.conns) >= MAX_SCRAPES:
            # anyone on the machine can connect here (no peer check on TCP): a flood of
            # idle connections must not take the file descriptors the daemon lives on
            conn.close()
            return
        self.conns.add(conn)
        conn.setblocking(False)
        buf = bytearray()
        timer = self.loop.call_later(5.0, lambda: self._drop(conn))

        def readable(mask: int) -> None:
            try:
                data = conn.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            buf.extend(data)
            if not data or len(buf) > MAX_REQUEST:
                timer.cancel()
                self._drop(conn)
                return
            if b"\r\n\r\n" in buf or b"\n\n" in buf:
                timer.cancel()
                self.loop.remove(conn)
                self._respond(conn, bytes(buf))
        self.loop.add_reader(conn, readable)

    def _respond(self, conn: socket.socket, request: bytes) -> None:
        line = request.split(b"\n", 1)[0].decode("latin-1").split()
        method = line[0] if line else ""
        if len(line) >= 2 and method in ("GET", "HEAD") and line[1].split("?")[0] in ("/metrics", "/"):
            status, ctype, body = "200 OK", CONTENT_TYPE, self.render().encode("utf-8")
        elif len(line) >= 2 and method not in ("GET", "HEAD"):
            status, ctype, body = "405 Method Not Allowed", "text/plain", b"only GET /metrics\n"
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"not found: try /metrics\n"
        allow = "Allow: GET, HEAD\r\n" if status.startswith("405") else ""
        head = ("HTTP/1.0 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s"
                "Connection: close\r\n\r\n" % (status, ctype, len(body), allow))
        # a HEAD is answered with the headers alone, whatever the status (RFC 9110 9.3.2)
        self._write(conn, head.encode() + (b"" if method == "HEAD" else body))

    def _write(self, conn: socket.socket, payload: bytes) -> None:
        view = memoryview(payload)
        timer = self.loop.call_later(5.0, lambda: self._drop(conn))

        def writable(mask: int) -> None:
            nonlocal view
            try:
                n = conn.send(view)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = len(view)
            view = view[n:]
            if not len(view):
                timer.cancel()
                self._drop(conn)
        self.loop.set_events(conn, selectors.EVENT_WRITE, writable)

    def _drop(self, conn: socket.socket) -> None:
        self.conns.discard(conn)
        self.loop.remove(conn)
        try:
            conn.close()
        except OSError:
            pass

    def close(self) -> None:
        for conn in list(self.conns):
            self._drop(conn)
        self.loop.remove(self.sock)
        self.sock.close()
