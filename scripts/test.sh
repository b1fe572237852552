#!/usr/bin/env bash
# Set up, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
# System tools the tests drive for real: openssl (throwaway CAs and certificates), curl (TLS from
# another client), iproute2 (network namespaces as the other hosts of the container RPC tests),
# redis-server (the shared state store's tests start their own, on a private Unix socket).
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if [ ${#missing[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        SUDO=""
        [ "$(id -u)" -eq 0 ] || SUDO="sudo"
        $SUDO apt-get update -qq
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    else
        echo "test: missing ${missing[*]} and this system has no apt-get; install them by hand" >&2
        exit 1
    fi
fi
exec .venv/bin/python -m pytest "$@"
