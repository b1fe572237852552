#!/usr/bin/env bash
# Set up what the end-to-end benchmarks need on top of the test setup:
# matplotlib (plots) in .venv, and wrk (the HTTP load generator of bench/rest.py)
# from the system's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench
if ! command -v wrk >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk
    else
        echo "bench-setup: wrk is missing and this system has no apt-get; install wrk by hand" >&2
        exit 1
    fi
fi
echo "bench-setup: $(wrk --version 2>&1 | head -1)"
