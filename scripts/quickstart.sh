#!/usr/bin/env bash
# Set up, then start Clipper serving the digits classifier (a real scikit-learn
# model in its own container process) on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh examples
exec .venv/bin/clipper start --config containers/digits/clipper.toml "$@"
