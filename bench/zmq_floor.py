"""The container hop's floor: a ZeroMQ round trip between two Python processes, nothing else.

Clipper's frontend sends every batch to a model container over ZeroMQ (a ROUTER
in the frontend, a DEALER in the container, each with its own I/O thread) and
reads the answer back. This measures that hop bare: a DEALER process that
echoes each message it receives, and a ROUTER here that sends one
message of a no-op batch's size (``[routing id, header, 784 float32]``),
waits for the echo with ``zmq.Poller`` (as the container waits) and sends the
next. Both ends use Clipper's own message calls (``clipper.rpc.zio``).

At one query in flight a query's latency is at least the echo floor's round
trip (client to frontend and back) plus this one (frontend to container and
back): ``bench.run`` reports it beside the floor's ``p50@1``.

    python -m bench.zmq_floor --count 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import zmq

from clipper.rpc import zio

PAYLOAD_BYTES = 784 * 4  # one no-op query's input


def serve(endpoint: str) -> int:
    """The echo end: connect a DEALER to ``endpoint``, say hello, echo every message until told to stop."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(b"hello")
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    try:
        while True:
            if not poller.poll(10_000):
                return 1  # the driver went away
            parts = zio.recv_parts(sock, zio.NOBLOCK, 0b10)
            if parts[0] == b"stop":
                return 0
            zio.send_parts(sock, parts, zio.NOBLOCK)
    finally:
        sock.close(0)
        ctx.term()


def measure(count: int = 10_000, warmup: int = 500, timeout_s: float = 60.0) -> dict:
    """Round trips of one batch-sized message through a DEALER echo process: latency quantiles in ms."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    proc = subprocess.Popen([sys.executable, "-m", "bench.zmq_floor", "--serve", f"tcp://127.0.0.1:{port}"])
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout_s
    try:
        if not poller.poll(int(timeout_s * 1000)):
            raise RuntimeError("the echo process did not connect")
        ident, _ = sock.recv_multipart()
        header, payload = bytes(24), bytes(PAYLOAD_BYTES)  # (about a batch header's size)
        lat = []
        for i in range(warmup + count):
            t0 = time.perf_counter_ns()
            zio.send_parts(sock, [ident, header, payload])
            if not poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                raise RuntimeError("the echo process stopped answering")
            zio.recv_parts(sock, zio.NOBLOCK)
            if i >= warmup:
                lat.append(time.perf_counter_ns() - t0)
        zio.send_parts(sock, [ident, b"stop"])
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close(0)
        ctx.term()
    lat.sort()

    def q(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p * len(lat)))] / 1e6, 4)

    return {"count": len(lat), "p50_ms": q(0.5), "p90_ms": q(0.9), "p99_ms": q(0.99),
            "implementation": zio.IMPLEMENTATION}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.zmq_floor", description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000, help="round trips measured")
    ap.add_argument("--serve", metavar="ENDPOINT", help=argparse.SUPPRESS)  # the echo process
    args = ap.parse_args(argv)
    if args.serve:
        return serve(args.serve)
    print(json.dumps(measure(args.count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
