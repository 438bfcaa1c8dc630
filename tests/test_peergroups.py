"""allow_gids by supplementary group (commit 59abef1, emitterd/control/peercred.py): the
peer's groups are to be "as they were when it connected" (SO_PEERGROUPS). For a peer in
more than 64 groups the first getsockopt answers ERANGE and the retry asks for a
256 KiB buffer, which CPython refuses outright (getsockopt buflen > 1024: OSError with
errno None), so peercred falls back to /proc/<pid>/status: the peer's groups *now*, and
nothing at all once the peer has exited (or under the shipped unit's
ProtectProc=invisible, where other users' /proc entries are hidden). A member of an
allowed group by a supplementary group is then refused."""
import array
import os
import signal
import socket
import struct
import time

import msgpack
import pytest

NOBODY = 65534
ALLOWED_GID = 4242


def _enc(obj):
    b = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(b)) + b


def _read_frame(s, timeout):
    s.settimeout(timeout)
    buf = b""
    while True:
        if len(buf) >= 4:
            n = struct.unpack(">I", buf[:4])[0]
            if len(buf) >= 4 + n:
                return msgpack.unpackb(buf[4:4 + n], raw=False)
        d = s.recv(65536)
        if not d:
            return None
        buf += d


def _connect_as(path, uid, gid, groups):
    """A socket connected to `path` by a forked child with these credentials; the child
    has exited (and is reaped) when this returns."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        try:
            a.close()
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            b.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [s.fileno()]))])
        finally:
            os._exit(0)
    b.close()
    msg, anc, _, _ = a.recvmsg(1, socket.CMSG_SPACE(4))
    a.close()
    os.waitpid(pid, 0)
    assert anc, "child could not connect"
    fd = array.array("i", anc[0][2][:4])[0]
    return socket.socket(fileno=fd)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("n_groups", [3, 70])
def test_supplementary_allowed_group_of_a_peer_in_many_groups(make_daemon, n_groups):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch a child's credentials")
    d = make_daemon(start=False)
    os.chmod(d.root, 0o755)
    d.extra_args = ["--socket-mode", "0666", "--allow-gids", str(ALLOWED_GID)]
    d.start()
    groups = [20000 + i for i in range(n_groups - 1)] + [ALLOWED_GID]
    # connect while the daemon cannot accept yet, so that it looks at the peer after the
    # peer process has gone (the kernel keeps the credentials of connect time)
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        s = _connect_as(d.socket, NOBODY, NOBODY, groups)
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    try:
        s.sendall(_enc({"id": 7, "op": "ping"}))
        frame = _read_frame(s, 10)
    finally:
        s.close()
    assert frame is not None and frame.get("ok") is True and frame["id"] == 7, (
        "peer uid %d in %d groups, %d of them allowed (supplementary): answered %r"
        % (NOBODY, n_groups, ALLOWED_GID, frame))
