#!/usr/bin/env bash
# Create .venv and install Clipper into it (compiling the Cython modules).
# Usage: scripts/setup.sh [extra,...]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
"$PY" - <<'PYEOF'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"Clipper needs Python 3.11 or newer; {sys.executable} is {sys.version.split()[0]}")
PYEOF
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
extras="${1:-examples}"
# The install is editable: Python sources are read where they are, so only what pip builds or resolves
# (the build files, the Cython sources, the extras, the interpreter) calls for a new install. Their hash
# is kept in .venv; when it matches and Clipper still imports, pip is not run (a re-run takes seconds,
# not the ~24 s of a reinstall). CLIPPER_SETUP_FORCE=1 reinstalls anyway.
stamp=".venv/.clipper-setup-${extras//[^A-Za-z0-9_-]/_}"
digest="$( { cat pyproject.toml setup.py clipper/_native/*.pyx clipper/_native/*.pxd; echo "extras=${extras}";
             .venv/bin/python --version; } | sha256sum | cut -d' ' -f1)"
if [ "${CLIPPER_SETUP_FORCE:-0}" != "1" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] \
        && .venv/bin/python -c "import clipper._native, clipper_admin" 2>/dev/null; then
    echo "setup: .venv up to date ($(.venv/bin/python --version), extras: ${extras}); nothing to install"
    exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
echo "$digest" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python --version), extras: ${extras})"
