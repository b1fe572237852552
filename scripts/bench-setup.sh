#!/usr/bin/env bash
# Set up what the end-to-end benchmarks need on top of the test setup:
# matplotlib (plots) in .venv, and from the system's packages wrk (the HTTP
# load generator of bench/rest.py) and gcc (compiles bench/cload, the C engine
# of bench/loadgen.py, on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench
missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if [ "${#missing[@]}" -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "bench-setup: ${missing[*]} missing and this system has no apt-get; install them by hand" >&2
        exit 1
    fi
fi
echo "bench-setup: $(wrk --version 2>&1 | head -1)"
echo "bench-setup: $(gcc --version | head -1)"
