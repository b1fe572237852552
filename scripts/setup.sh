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
.venv/bin/python -m pip install --quiet --upgrade pip
extras="${1:-examples}"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
echo "setup: .venv ready ($(.venv/bin/python --version), extras: ${extras})"
