"""README (Security) refuses "a socket directory owned by another user or
writable by others without the sticky bit ..., and so is any directory above it or symbolic
link on the way there of another user". A directory above the socket directory that is
root's (or ours) and only group-writable with the setgid bit -- Debian's /usr/local and
/var/local are 2775 root:staff -- is not "of another user": such a setup starts (the
first version of the ancestor check refused it)."""
from __future__ import annotations

import os

import pytest

from daemon_fixture import Daemon


@pytest.mark.timeout(60)
def test_a_root_owned_setgid_group_writable_ancestor_is_not_refused(make_daemon) -> None:
    d: Daemon = make_daemon(start=False)
    local = os.path.join(d.root, "local")          # like /var/local: 2775 root:staff
    os.mkdir(local)
    os.chmod(local, 0o2775)
    run = os.path.join(local, "emitterd")          # the socket directory: ours, 0700
    os.mkdir(run, 0o700)
    d.socket = os.path.join(run, "ctl.sock")
    d.start()
    assert d.client().ping()["pid"] > 0
