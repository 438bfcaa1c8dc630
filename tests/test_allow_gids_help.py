"""`emitterd config` (and systemd/emitterd.toml generated from it) still documents
allow_gids as "a peer whose gid (as SO_PEERCRED reports it) is listed may connect", while
commit 59abef1 admits supplementary groups too (README: "a member of a group in allow_gids
is admitted whether the group is its primary or a supplementary one")."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(60)
def test_allow_gids_help_mentions_supplementary_groups():
    out = subprocess.run([sys.executable, "-m", "emitterd", "config"], capture_output=True,
                         text=True, timeout=30).stdout
    block = out[out.index("allow_gids"):]
    block = block[:block.index("drain_timeout")]
    assert "supplementary" in block, "emitterd config documents allow_gids as: %r" % block
    with open(os.path.join(ROOT, "systemd", "emitterd.toml")) as f:
        toml = f.read()
    tblock = toml[toml.index("# Group ids allowed"):toml.index("allow_gids = []")]
    assert "supplementary" in tblock, "systemd/emitterd.toml documents allow_gids as: %r" % tblock
