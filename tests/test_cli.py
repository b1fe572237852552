"""The `clipper` CLI against a real frontend process, on both implementations."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "clipper", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(params=["cython", "python"])
def impl_env(request):
    env = dict(os.environ)
    env["CLIPPER_NO_EXTENSIONS"] = "1" if request.param == "python" else "0"
    return env


def _start(tmp_path, env, *extra):
    ready = tmp_path / "ready.json"
    proc = subprocess.Popen([sys.executable, "-m", "clipper", "start", "--query-port", "0", "--admin-port", "0",
                             "--rpc-port", "0", "--rest-port", "0", "--metrics-port", "0", "--ready-file", str(ready),
                             "--state", str(tmp_path / "state.sqlite"), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():  # the ready file appears once serving (bounded wait on a real process)
        if proc.poll() is not None:
            raise AssertionError(f"clipper start exited: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("clipper start did not become ready in 60 s")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode


def test_cli_manages_and_queries_a_frontend(tmp_path, impl_env):
    proc, ports = _start(tmp_path, impl_env)
    try:
        admin = ["--admin-port", str(ports["admin_port"])]
        r = _cli("register-app", "sum", "--input-dtype", "float32", "--input-shape", "4", "--slo-ms", "5000", *admin,
                 env=impl_env)
        assert r.returncode == 0, r.stderr
        r = _cli("deploy", "sum-model", "1", "model_zoo.py:row_sum", "--input-dtype", "float32", "--input-shape", "4",
                 "--replicas", "2", "--workdir", "tests", *admin, env=impl_env)
        assert r.returncode == 0, r.stderr
        r = _cli("link", "sum", "sum-model", *admin, env=impl_env)
        assert r.returncode == 0 and json.loads(r.stdout)["linked_models"] == ["sum-model"]
        r = _cli("predict", "sum", "[1, 2, 3, 4.5]", "--port", str(ports["query_port"]), env=impl_env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["output"] == 10.5 and json.loads(r.stdout)["default"] is False
        r = _cli("predict", "nope", "[1]", "--port", str(ports["query_port"]), env=impl_env)
        assert r.returncode == 1 and "UNKNOWN_APPLICATION" in r.stderr
        r = _cli("register-app", "bad name!", "--input-dtype", "float32", *admin, env=impl_env)
        assert r.returncode == 1 and "is not a valid name" in r.stderr
        r = _cli("status", *admin, env=impl_env)
        assert r.returncode == 0 and "sum-model:1" in r.stdout
        st = json.loads(_cli("status", "--json", *admin, env=impl_env).stdout)
        assert len([x for x in st["replicas"] if x["model"] == "sum-model:1"]) == 2
        assert st["traffic"]["applications"]["sum"]["answered"] == 1
    finally:
        assert _stop(proc) == 0


def test_quickstart_config_serves_the_digits_model(tmp_path):
    proc, ports = _start(tmp_path, dict(os.environ), "--config", "containers/digits/clipper.toml")
    try:
        r = _cli("predict", "digits", "@containers/digits/sample.json", "--port", str(ports["query_port"]))
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["output"] == 0 and out["default"] is False  # the sample is a zero
    finally:
        assert _stop(proc) == 0
