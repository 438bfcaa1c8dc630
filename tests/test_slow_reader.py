"""A unix: subscriber that reads, only slowly, is never cut off at output_buffer_bytes, and
every ack_timeout redelivery is queued again behind the unread frames: the worker's output
buffer (and RSS) grows without bound, far past output_buffer_bytes."""
import os
import socket
import threading
import time

import psutil
import pytest

from subscriber_helper import sub_spec, wait_workers_ready

CAP = 64 * 1024
MiB = 1 << 20


class SlowReader:
    """Accepts the worker's connection and reads 8 KiB every 20 ms (about 400 KB/s), never
    acking: a consumer that is slow, not stopped."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stop = threading.Event()
        self.conns = []
        self.lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.lsock.bind(path)
        self.lsock.listen(8)
        self.lsock.settimeout(0.05)
        self.read = 0
        self.eofs = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                s, _ = self.lsock.accept()
                s.setblocking(False)
                self.conns.append(s)
            except OSError:
                pass
            for s in list(self.conns):
                try:
                    data = s.recv(8192)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.eofs += 1
                    self.conns.remove(s)
                    s.close()
                else:
                    self.read += len(data)
            time.sleep(0.02)

    def close(self) -> None:
        self.stop.set()
        self.t.join(3)
        for s in self.conns:
            s.close()
        self.lsock.close()


@pytest.mark.timeout(60)
def test_slow_reader_output_buffer_stays_bounded(make_daemon):
    d = make_daemon("--output-buffer-bytes", CAP, "--max-frame-bytes", CAP,
                    "--max-event-bytes", CAP - 4096)
    reader = SlowReader(os.path.join(d.root, "slow.sock"))
    try:
        c = d.client()
        key = c.start(sub_spec("slow", subscriber="unix:" + reader.path, batch_size=1,
                               max_in_flight=60, ack_timeout=0.2, max_retries=100000,
                               retry_backoff=[0.01, 0.01]))["key"]
        st = wait_workers_ready(c, key, 1)
        worker = psutil.Process(st["workers"][0]["pid"])
        base = worker.memory_info().rss
        for i in range(60):
            c.publish([{"stream": "s%d" % i, "type": "t", "data": "x" * 50_000}])
        # 4 s of this load: the worker may hold its window (60 events, 3 MB) and an output
        # buffer of output_buffer_bytes (64 KiB), plus slack (3 MiB more was seen); not 12 MiB
        # more (24 to 79 MiB were seen, growing on)
        deadline = time.monotonic() + 4
        peak = base
        while time.monotonic() < deadline:
            peak = max(peak, worker.memory_info().rss)
            if peak - base > 12 * MiB:
                break
            time.sleep(0.1)
        st = c.status(key)
        assert peak - base <= 12 * MiB, (
            "worker RSS grew by %.0f MiB (output_buffer_bytes %d KiB) while the subscriber "
            "read %.1f MB and stayed connected (closed by the daemon %d times); retried %d"
            % ((peak - base) / MiB, CAP // 1024, reader.read / 1e6, reader.eofs, st["retried"]))
    finally:
        reader.close()
