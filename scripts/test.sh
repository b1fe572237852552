#!/usr/bin/env bash
# Set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
scripts/lint.sh  # ruff and mypy: an error fails the run before any test
# System tools the tests drive for real: openssl (throwaway CAs and certificates), curl (TLS from
# another client), iproute2 (network namespaces as the other hosts of the container RPC tests),
# redis-server (the shared state store's tests start their own, on a private Unix socket), gcc with
# the headers of libzmq and msgpack-c (tests/test_c_container.py builds a container written in C).
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[ -f /usr/include/zmq.h ] || missing+=(libzmq3-dev)
need_msgpack=0
[ -f /usr/include/msgpack.h ] || [ -f /usr/include/msgpack-c/msgpack.h ] || need_msgpack=1
if [ ${#missing[@]} -gt 0 ] || [ "$need_msgpack" -eq 1 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        if [ "$need_msgpack" -eq 1 ]; then
            # msgpack-c's C library: libmsgpack-c-dev in newer releases, libmsgpack-dev (C and C++) before.
            if apt-cache show libmsgpack-c-dev >/dev/null 2>&1; then missing+=(libmsgpack-c-dev)
            else missing+=(libmsgpack-dev); fi
        fi
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        [ "$need_msgpack" -eq 0 ] || missing+=("msgpack-c (C headers)")
        echo "test: missing ${missing[*]} and this system has no apt-get; install them by hand" >&2
        exit 1
    fi
fi
exec .venv/bin/python -m pytest "$@"
