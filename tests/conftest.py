"""Shared test setup: makes tests/ importable and registers the daemon fixtures
(tests/daemon_fixture.py: make_daemon, daemon, short_tmp)."""
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

pytest_plugins = ["daemon_fixture"]
