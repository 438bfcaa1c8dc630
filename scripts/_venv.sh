# Sourced by scripts/demo and scripts/test: make .venv (Python >= 3.11) and install the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
pick_python() {
    for p in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
        [ -n "$p" ] || continue
        command -v "$p" >/dev/null 2>&1 || continue
        if "$p" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
            echo "$p"; return 0
        fi
    done
    echo "emitterd needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
    return 1
}
if [ ! -x .venv/bin/python ]; then
    PY="$(pick_python)"
    echo "creating .venv with $PY" >&2
    "$PY" -m venv .venv
fi
ensure_installed() {   # $1: pip target, e.g. "." or ".[test]"; reinstalls only when setup.cfg changed
    local stamp=".venv/.installed-$(echo "$1" | tr -c 'a-z' '_')"
    if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
        .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >&2
        .venv/bin/python -m pip install -q --disable-pip-version-check -e "$1" >&2
        touch "$stamp"
    fi
}
