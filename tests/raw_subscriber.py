"""A unix: subscriber written from PROTOCOL.md alone: raw socket, length-prefixed msgpack."""
import socket
import struct
from typing import Any, Optional

import msgpack


def encode(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class RawSubscriber:
    """Listens on `path`; accept() takes one worker connection; recv() reads one frame."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.conn: Optional[socket.socket] = None
        self.buf = b""

    def spec(self, name: str, **fields: Any) -> dict:
        """A subscription of every event from the origin, delivered to this socket."""
        return {"name": name, "type": "stream", "selector": "$all",
                "subscriber": "unix:" + self.path, "start_from": "origin", **fields}

    def accept(self, timeout: float = 10.0) -> dict:
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        return self.recv(timeout)           # the hello frame

    def recv(self, timeout: float = 10.0) -> dict:
        assert self.conn is not None
        self.conn.settimeout(timeout)
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    raw, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgpack.unpackb(raw, raw=False)
            data = self.conn.recv(65536)
            if not data:
                raise EOFError("the worker closed the connection")
            self.buf += data

    def send(self, obj: dict) -> None:
        assert self.conn is not None
        self.conn.sendall(encode(obj))

    def close(self) -> None:
        for s in (self.conn, self.listener):
            if s is not None:
                s.close()
