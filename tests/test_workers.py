"""`clipper start --workers N`: several frontend processes on shared ports and one state store, for real
(a supervisor process, its workers, a private redis-server, model containers per worker)."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from clipper import errors as E
from clipper.client import Client
from clipper.management.admin_client import AdminClient

ROOT = Path(__file__).resolve().parent.parent
ZOO = Path(__file__).resolve().parent / "model_zoo.py"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="redis-server is not installed (scripts/test.sh installs it)")


def start_workers(tmp_path, n=2, *extra, timeout=90.0):
    ready = tmp_path / "ready.json"
    if ready.exists():
        ready.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "clipper", "start", "--workers", str(n), "--query-port", "0",
                             "--rest-port", "0", "--admin-port", "0", "--metrics-port", "0", "--rpc-port", "0",
                             "--ready-file", str(ready), *extra],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + timeout
    while not ready.exists():  # bounded wait on a real process
        if proc.poll() is not None:
            raise AssertionError(f"clipper start --workers exited ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("clipper start --workers was not ready in time")
        time.sleep(0.02)
    return proc, json.loads(ready.read_text())


def stop(proc, timeout=60):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def metric(port: int, name: str, label: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    m = re.search(rf'^{name}(?:_total)?{{[^}}]*{label}[^}}]*}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def containers_of(pid: int) -> list[int]:
    """The model-container processes whose parent is ``pid`` (read from /proc, nothing signalled)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = open(f"/proc/{name}/stat").read()
                cmd = open(f"/proc/{name}/cmdline", "rb").read()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid and b"clipper.container" in cmd:
                out.append(int(name))
    return out


@pytest.mark.parametrize("containers", ["shared", "own"])
def test_two_workers_serve_one_system_on_shared_ports(tmp_path, containers):
    """Both workers take connections on the one msgpack and REST port and serve what was registered through
    the admin port; shared containers: one container process (the first worker's child) serves both
    workers; own: each worker runs one. A SIGTERM stops both workers and the private Redis, and frees the
    ports.

    Catches: workers not listening with SO_REUSEPORT (the second fails to start), a worker that does not
    learn the registry from the store (its connections get UNKNOWN_APPLICATION), shared containers that do
    not reach the second worker (its queries never answered) or that the second worker refuses (credentials
    not shared), a supervisor that leaves workers or its redis-server behind."""
    proc, info = start_workers(tmp_path, 2, "--containers", containers)
    workers = info["workers"]
    try:
        assert len(workers) == 2 and {w["query_port"] for w in workers} == {info["query_port"]}
        assert len({w["pid"] for w in workers}) == 2 and info["state"].startswith("unix://")
        admin = AdminClient("127.0.0.1", info["admin_port"], timeout=120,
                            token_file=str(tmp_path / "clipper-secrets" / "admin-token"))
        admin.register_application("sum", "float32", [4], slo_ms=20_000)
        admin.deploy_model("sum-model", "1", "float32", [4], entry=f"{ZOO}:row_sum", replicas=1)
        admin.link_model_to_app("sum", "sum-model")
        x = np.array([1, 2, 3, 4], np.float32)
        # Connections land on either worker; every one is answered once the worker behind it runs its replica.
        deadline = time.monotonic() + 90
        answered = 0
        while answered < 24:
            assert time.monotonic() < deadline, "not every worker served the application in time"
            try:
                with Client("127.0.0.1", info["query_port"], timeout=30) as c:
                    p = c.predict("sum", x)
                if not p.is_default and p.output == pytest.approx(10.0):
                    answered += 1
                    continue
            except (E.UnknownApplicationError, E.NoModelAvailableError):
                pass
            time.sleep(0.05)
        for i in range(8):  # REST on the shared port too
            req = urllib.request.Request(f"http://127.0.0.1:{info['rest_port']}/sum/predict",
                                         data=json.dumps({"input": [1, 2, 3, 4]}).encode(),
                                         headers={"Content-Type": "application/json", "Connection": "close"})
            assert json.loads(urllib.request.urlopen(req, timeout=30).read())["output"] == pytest.approx(10.0)
        served = [metric(w["metrics_port"], "clipper_app_requests", 'app="sum"') for w in workers]
        assert all(s > 0 for s in served), f"a worker took no query: {served}"
        per_worker = [len(containers_of(w["pid"])) for w in workers]
        assert per_worker == ([1, 0] if containers == "shared" else [1, 1])
    finally:
        rc = stop(proc)
    assert rc == 0
    assert not any(alive(w["pid"]) for w in workers)
    sock_path = info["state"][len("unix://"):]
    assert not os.path.exists(sock_path)
    for port in (info["query_port"], info["rest_port"], info["admin_port"]):
        with socket.socket() as s:  # free again: a plain bind (no SO_REUSEPORT) succeeds
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    # the private Redis kept the registry: a second start serves it without registering anything
    proc, info = start_workers(tmp_path, 2, "--containers", containers)
    try:
        with Client("127.0.0.1", info["query_port"], timeout=30) as c:
            deadline = time.monotonic() + 90
            while True:
                try:
                    if c.predict("sum", x).output == pytest.approx(10.0):
                        break
                except E.NoModelAvailableError:
                    pass
                assert time.monotonic() < deadline, "the registry did not survive the restart"
                time.sleep(0.05)
    finally:
        assert stop(proc) == 0


def test_workers_refuse_a_store_they_cannot_share_and_a_port_in_use(tmp_path):
    """A SQLite state file cannot be shared by workers: a one-line error, nothing started; a port another
    program listens on fails the start with the reason, before any worker runs.

    Catches: workers silently each opening the SQLite file (split state), a supervisor that starts workers
    on a port it could not hold."""
    r = subprocess.run([sys.executable, "-m", "clipper", "start", "--workers", "2", "--state",
                        str(tmp_path / "s.sqlite")], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "needs a state store every worker shares" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "s.sqlite").exists()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "clipper", "start", "--workers", "2", "--query-port", str(port),
                            "--rest-port", "0", "--admin-port", "0", "--metrics-port", "0", "--rpc-port", "0"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and f"cannot bind 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "clipper", "start", "--workers", "0"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--workers 0" in r.stderr


WORKER = r"""
import json, os, signal, sys, time
ready, crash = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
with open(ready + ".tmp", "w") as f:
    json.dump({"pid": os.getpid(), "argv": sys.argv[3:]}, f)
os.replace(ready + ".tmp", ready)
while True:  # a stand-in worker: exits with 3 when the test asks it to
    if os.path.exists(crash):
        os.unlink(crash)
        sys.exit(3)
    time.sleep(0.01)
"""


def test_the_supervisor_starts_a_worker_again_when_it_exits_and_stops_all(tmp_path):
    """A worker that exits on its own is started again (a new process, the same index and ports); stop()
    ends every worker through its handle and releases the held ports.

    Catches: a supervisor that lets a dead worker stay dead (its share of connections refused), one that
    restarts it with other ports, one that leaves workers running after stop."""
    import asyncio

    from clipper.config import FrontendConfig
    from clipper.workers import Supervisor

    cfg = FrontendConfig(query_port=0, rest_port=0, admin_port=0, metrics_port=0, rpc_port=0)

    def argv(index, ports, state_url, ready_file, extra):
        return [sys.executable, "-c", WORKER, ready_file, str(tmp_path / f"crash-{index}"),
                json.dumps(ports, sort_keys=True)]

    async def scenario():
        sup = Supervisor(2, cfg, argv, "redis://127.0.0.1:1/0", tmp_path / "unused", backoff_s=(0.05, 0.1),
                         containers="own")
        info = await sup.start()
        try:
            first = [w["pid"] for w in info["workers"]]
            ports_before = [w["argv"] for w in info["workers"]]
            (tmp_path / "crash-1").touch()
            deadline = time.monotonic() + 30
            while sup.describe()["workers"][1]["pid"] in (first[1], None) or sup.workers[1].ready is None:
                assert time.monotonic() < deadline, "the worker was not started again"
                await asyncio.sleep(0.02)
            after = sup.describe()["workers"]
            assert after[0]["pid"] == first[0] and sup.restarts == 1
            assert [w["argv"] for w in after] == ports_before  # same index, same ports
            procs = [w.proc for w in sup.workers]
        finally:
            await sup.stop(10)
        assert all(p.returncode is not None for p in procs)
        assert not sup.held

    asyncio.run(scenario())
