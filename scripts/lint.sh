#!/usr/bin/env bash
# The checks that keep the code clean (issue 12): ruff, then mypy, each with the project's own configuration
# (pyproject.toml). Fails on the first error. scripts/test.sh runs it before the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check clipper clipper_admin bench tests
.venv/bin/mypy  # what and how: [tool.mypy] in pyproject.toml
