"""The attached sink: control-socket clients handed over by the parent with their fd."""
import socket
from typing import Any

from emitterd.worker.consumer import ConsumerConn


def adopt(worker: Any, fd: int, pending: bytes) -> ConsumerConn:
    """Take over a client connection the parent passed with socket.send_fds."""
    sock = socket.socket(fileno=fd)
    conn = ConsumerConn(worker, sock, "attached", pending)
    # the parent counts the handover as pending until told it is done, also when the
    # connection is already gone (its first frame, sent with the attach, was invalid)
    worker.consumer_opened(conn, adopted=True)
    return conn
