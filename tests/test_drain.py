"""Graceful drain: on SIGTERM (or Frontend.drain) no query in flight is left without a reply."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clipper import errors as E
from clipper.protocol import wire
from conftest import WireConn

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def _slow(secs: float, i: int = 0) -> np.ndarray:
    return np.array([secs, i, 0, 0], np.float32)  # sleep_by_input: sleeps x[0], answers x[0]


def test_drain_answers_what_is_in_flight_and_refuses_what_comes(frontend_factory, wire_conn):
    fe = frontend_factory(admission_control=False)
    fe.deploy("slow", "sleep_by_input", slo_ms=30_000, max_batch=1, batching="fixed", cache=False)
    c = wire_conn(fe.port)
    for i in range(4):
        c.send(wire.predict(i, "slow", _slow(0.2, i)))
    fe.wait_until(lambda s: s["models"]["slow-model:1"]["queries_sent"] >= 1, what="the first batch out")
    drained = asyncio.run_coroutine_threadsafe(fe.fe.drain(30), fe.loop)
    fe.wait_until(lambda s: fe.fe.processor.draining, what="the drain to start")
    c.send(wire.predict(99, "slow", _slow(0.0)))  # a new request on an open connection
    with pytest.raises(OSError):  # no new connection is accepted
        socket.create_connection(("127.0.0.1", fe.port), timeout=5).close()
    out = {m[1]: m for m in c.recv(5, timeout=30)}
    assert out[99][0] == wire.ERROR and out[99][2] == E.ShuttingDownError.code
    assert all(out[i][0] == wire.RESULT and out[i][3] == pytest.approx(0.2) for i in range(4))
    assert drained.result(30) == 0  # nothing was cut short


def test_the_drain_timeout_answers_the_rest_with_shutting_down(frontend_factory, wire_conn):
    fe = frontend_factory(admission_control=False)
    fe.deploy("slow", "sleep_by_input", slo_ms=60_000, max_batch=1, batching="fixed", cache=False)
    c = wire_conn(fe.port)
    c.send(wire.predict(1, "slow", _slow(20.0)))
    c.send(wire.predict(2, "slow", _slow(20.0, 1)))
    fe.wait_until(lambda s: s["models"]["slow-model:1"]["queries_sent"] >= 1, what="the first batch out")
    assert asyncio.run_coroutine_threadsafe(fe.fe.drain(0.3), fe.loop).result(30) == 2
    out = c.recv(2, timeout=10)
    assert [m[2] for m in out] == [E.ShuttingDownError.code] * 2 and "0.3 s drain" in out[0][4]


def test_sigterm_under_load_leaves_no_query_without_a_reply(tmp_path):
    config = tmp_path / "slow.toml"
    config.write_text(f"""
[frontend]
drain_timeout_ms = 20000
[[applications]]
name = "slow"
input_dtype = "float32"
input_shape = [4]
slo_ms = 30000
cache = false
[[models]]
name = "slow"
version = "1"
input_dtype = "float32"
input_shape = [4]
entry = "{TESTS / 'model_zoo.py'}:sleep_by_input"
max_batch = 4
[[links]]
app = "slow"
model = "slow"
""")
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "clipper", "start", "--config", str(config), "--query-port", "0",
                             "--admin-port", "0", "--rpc-port", "0", "--rest-port", "0", "--metrics-port", "0",
                             "--ready-file", str(ready), "--state", ":memory:"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "clipper start did not become ready"
            time.sleep(0.02)
        port = json.loads(ready.read_text())["query_port"]
        c = WireConn(port)
        n = 40
        for i in range(n):
            c.send(wire.predict(i, "slow", _slow(0.05, i)))
        first = c.recv(1, timeout=30)  # serving
        proc.send_signal(signal.SIGTERM)
        out = first + c.recv(n - 1, timeout=60)
        assert sorted(m[1] for m in out) == list(range(n))  # every request answered, once
        assert all(m[0] == wire.RESULT for m in out), [m for m in out if m[0] != wire.RESULT][:3]
        assert proc.wait(60) == 0
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
