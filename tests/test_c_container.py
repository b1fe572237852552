"""A model container that does not use the SDK: tests/c_container/container.c, written from
docs/container-protocol.md over libzmq and msgpack-c, built here with gcc, serving a linear model
to a real frontend. The same end-to-end checks as an SDK container: credentials issued through the
admin API and read from the credentials file, the CURVE handshake, hello, answers equal to numpy's,
batches of several queries, refusals that end it with a reason, heartbeats through a quiet spell.

Skipped (with the reason printed) only when gcc, libzmq's or msgpack-c's headers are missing:
scripts/test.sh installs them (libzmq3-dev, libmsgpack-dev or libmsgpack-c-dev).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from clipper.client import Client
from clipper.errors import NoModelAvailableError
from clipper.management.admin_client import AdminClient
from clipper.management.registry import Application, ModelVersion
from clipper.rpc import messages as m
from clipper.security.container_keys import save_credentials

SOURCE = Path(__file__).resolve().parent / "c_container" / "container.c"
D, K = 4, 3  # the linear model: inputs of 4 float32, outputs of 3 float64


def _link_flags() -> list[str] | None:
    """Compiler and linker flags for libzmq and msgpack-c (its library is msgpack-c in newer releases,
    msgpackc before), or None when a header is missing."""
    flags: list[str] = []
    pkg = shutil.which("pkg-config")
    for names, header, fallback in ((("libzmq",), "zmq.h", ["-lzmq"]),
                                    (("msgpack-c", "msgpack"), "msgpack.h", None)):
        found = None
        for name in names if pkg else ():
            got = subprocess.run([pkg, "--cflags", "--libs", name], capture_output=True, text=True, check=False)
            if got.returncode == 0:
                found = got.stdout.split()
                break
        if found is None:
            dirs = [Path("/usr/include"), Path("/usr/include/msgpack-c"), Path("/usr/local/include")]
            where = next((d for d in dirs if (d / header).exists()), None)
            if where is None:
                return None
            if fallback is None:  # msgpack-c without pkg-config: try the library names it has had
                lib = next((f"-l{n}" for n in ("msgpack-c", "msgpackc")
                            if any(Path(p).glob(f"lib{n}.so*") for p in ("/usr/lib", "/usr/lib64", "/usr/local/lib",
                                                                          *map(str, Path("/usr/lib").glob("*-linux-gnu*"))))),
                           "-lmsgpackc")
                fallback = [f"-I{where}", lib]
            found = fallback
        flags += found
    return flags


@pytest.fixture(scope="module")
def c_container(tmp_path_factory) -> Path:
    """The C container, compiled for this test run."""
    gcc = shutil.which("gcc")
    flags = _link_flags() if gcc else None
    if gcc is None or flags is None:
        why = ("gcc is not installed" if gcc is None else
               "the headers of libzmq (libzmq3-dev) or msgpack-c (libmsgpack-dev / libmsgpack-c-dev) are missing")
        print(f"\ntest_c_container: skipped: {why}; scripts/test.sh installs them")
        pytest.skip(why)
    out = tmp_path_factory.mktemp("c-container") / "container"
    build = subprocess.run([gcc, "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(SOURCE), *flags],
                           capture_output=True, text=True, timeout=120, check=False)
    assert build.returncode == 0, f"the C container does not build:\n{build.stderr}"
    return out


class CContainer:
    """The C container as a child process; its stderr lines, as they come, for the test to wait on."""

    def __init__(self, binary: Path, credentials: Path | None, weights: Path, *extra: str, env=None) -> None:
        creds = ["--credentials", str(credentials)] if credentials is not None else []
        self.proc = subprocess.Popen([str(binary), *creds, "--weights", str(weights), *extra], stderr=subprocess.PIPE,
                                     text=True, env=None if env is None else {**os.environ, **env})
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append(None)  # end of output
            self.cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 30.0, count: int = 1) -> list[re.Match]:
        """The first ``count`` lines matching ``pattern``, waiting for them."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [mt for line in self.lines if line is not None and (mt := rx.search(line))]
                if len(found) >= count:
                    return found[:count]
                if None in self.lines:
                    raise AssertionError(f"the C container exited without printing {pattern!r}: {self.text()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the C container did not print {pattern!r} in {timeout} s: {self.text()}")
                self.cond.wait(left)

    def wait_until(self, pred, what: str, timeout: float = 30.0) -> None:
        """Wait until ``pred(all its output so far)`` holds."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not pred(self.text()):
                left = deadline - time.monotonic()
                if left <= 0 or None in self.lines:
                    raise AssertionError(f"the C container's output never showed {what}: {self.text()}")
                self.cond.wait(left)

    def text(self) -> str:
        return "\n".join(line for line in self.lines if line is not None)

    def wait(self, timeout: float = 30.0) -> int:
        rc = self.proc.wait(timeout)
        self.reader.join(10)
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait()


@pytest.fixture
def containers():
    made: list[CContainer] = []

    def start(*args, **kw) -> CContainer:
        c = CContainer(*args, **kw)
        made.append(c)
        return c

    yield start
    for c in made:
        c.stop()


def _model(tmp_path: Path, k: int = K, d: int = D, seed: int = 7):
    """A linear model's weights file, and the model as numpy computes it (float64, from float32 inputs)."""
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(k, d)), rng.normal(size=k)
    path = tmp_path / f"weights-{k}x{d}.txt"
    path.write_text(f"{k} {d}\n" + " ".join(map(repr, w.ravel().tolist())) + "\n"
                    + " ".join(map(repr, b.tolist())) + "\n")
    return path, lambda x: np.asarray(x, np.float32).astype(np.float64) @ w.T + b


def _setup(frontend, tmp_path: Path, *, shape=(D,), app="lin", name="credentials.json"):
    """Deploy ``app`` with no replica of its own; credentials for its model through the admin API."""
    frontend.deploy(app, "row_sum", shape=shape, replicas=0, max_batch=16)
    admin = AdminClient("127.0.0.1", frontend.fe.admin_port, timeout=60)
    doc = admin.issue_container_credentials(f"{app}-model", "1", frontend=f"tcp://127.0.0.1:{frontend.fe.rpc_port}",
                                            label="the C container")
    save_credentials(tmp_path / name, doc)
    return admin, doc, tmp_path / name


def _replicas(frontend) -> list[dict]:
    return frontend.call(frontend.fe.rpc.stats)


def _wait(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_the_c_container_serves_a_linear_model_end_to_end(frontend, tmp_path, c_container, containers, caplog):
    _, doc, creds = _setup(frontend, tmp_path)
    weights, model = _model(tmp_path)
    c = containers(c_container, creds, weights, "--verbose")
    (welcome,) = c.wait_for(r"welcomed by \S+ as replica (\d+)")
    frontend.call(frontend.fe.wait_ready("lin-model", "1", replicas=1, timeout_s=30))
    (stats,) = _replicas(frontend)
    # what it said in its hello, as the frontend shows it; its credential is the one the admin API issued
    assert stats["replica_id"] == int(welcome.group(1)) and stats["credential"] == doc["id"]
    assert stats["claimed_pid"] == c.proc.pid and stats["transport"] == "tcp"
    assert frontend.call(lambda: frontend.fe.rpc.all_replicas()[0].sdk) == "clipper-c-container/0.1"
    rng = np.random.default_rng(3)
    with Client("127.0.0.1", frontend.port) as client:
        x = rng.normal(size=D).astype(np.float32)
        got = client.predict("lin", x)
        assert not got.is_default and got.output.dtype == np.float64
        np.testing.assert_allclose(got.output, model(x), rtol=1e-12)
        # pipelined: the frontend batches them, the container answers each batch in one message
        xs = rng.normal(size=(200, D)).astype(np.float32)
        outs = np.stack([p.output for p in client.predict_many("lin", xs)])
    np.testing.assert_allclose(outs, model(xs), rtol=1e-12)
    # each batch's size, as the container logged it before answering (201 queries in all)
    c.wait_until(lambda text: sum(map(int, re.findall(r"batch \d+: (\d+) inputs", text))) == 201, "201 inputs")
    sizes = [int(x) for x in re.findall(r"batch \d+: (\d+) inputs", c.text())]
    assert max(sizes) > 1 and len(sizes) < 201, sizes
    # SIGTERM: it says C_BYE, and the frontend lets it go for that reason (not because its connection closed)
    replica_id = stats["replica_id"]
    caplog.set_level(logging.INFO, logger="clipper.rpc")  # a goodbye is logged at INFO: a stop on purpose
    c.proc.send_signal(signal.SIGTERM)
    assert c.wait() == m.EXIT_OK
    _wait(lambda: not _replicas(frontend), "the frontend to drop the container that said goodbye")
    reasons = [r.getMessage() for r in caplog.records if r.name == "clipper.rpc" and f"<Replica {replica_id} " in
               r.getMessage()]
    assert any(msg.endswith(" shut down") for msg in reasons), reasons


def test_a_one_output_model_answers_numbers(frontend, tmp_path, c_container, containers):
    _, _, creds = _setup(frontend, tmp_path)
    weights, model = _model(tmp_path, k=1, seed=11)
    # its credentials named by $CLIPPER_CREDENTIALS_FILE this time (as the Kubernetes manager names its Secret)
    c = containers(c_container, None, weights, env={"CLIPPER_CREDENTIALS_FILE": str(creds)})
    c.wait_for("welcomed by")
    frontend.call(frontend.fe.wait_ready("lin-model", "1", replicas=1, timeout_s=30))
    xs = np.random.default_rng(5).normal(size=(20, D)).astype(np.float32)
    with Client("127.0.0.1", frontend.port) as client:
        outs = [p.output for p in client.predict_many("lin", xs)]
    assert all(type(o) is float for o in outs)  # "<f8" of shape [count]: one number per input
    np.testing.assert_allclose(outs, model(xs)[:, 0], rtol=1e-12)


def test_the_local_manager_runs_the_c_container_as_a_deployment_command(frontend, tmp_path, c_container):
    """A deployment whose ``command`` is the C container: the frontend's local manager starts it with its
    credentials in $CLIPPER_CREDENTIALS (PLAIN, on the frontend's Unix socket); a refused one (exit 2) fails
    the deploy at once with its reason."""
    weights, model = _model(tmp_path)

    def deploy(app: str, shape: tuple) -> None:
        frontend.call(frontend.fe.register_application(Application(app, "float32", shape, slo_ms=10_000.0)))
        frontend.call(frontend.fe.deploy_model(ModelVersion(
            f"{app}-model", "1", "float32", list(shape), command=[str(c_container), "--weights", str(weights)],
            replicas=1, max_batch=16)))
        frontend.call(frontend.fe.link(app, f"{app}-model"))
        frontend.call(frontend.fe.wait_ready(f"{app}-model", "1", timeout_s=30))

    deploy("lin", (D,))
    (stats,) = _replicas(frontend)
    assert stats["transport"] == "ipc" and stats["pid"] == stats["claimed_pid"]  # the manager knows its pid
    xs = np.random.default_rng(9).normal(size=(50, D)).astype(np.float32)
    with Client("127.0.0.1", frontend.port) as client:
        outs = np.stack([p.output for p in client.predict_many("lin", xs)])
    np.testing.assert_allclose(outs, model(xs), rtol=1e-12)
    with pytest.raises(NoModelAvailableError, match=r"exited with code 2 .*rejected it: container expects input "
                                                    r"shape \[4\]; model five-model:1 is deployed with \[5\]"):
        deploy("five", (5,))


def test_heartbeats_keep_the_c_container_alive_through_a_quiet_spell(frontend, tmp_path, c_container, containers):
    """No query for longer than heartbeat_timeout_ms (2 s in the tests' frontends): the container that beats
    stays the same replica; the control that does not beat (--no-heartbeat) is dropped by the frontend,
    notices the frontend's silence in turn, and says hello again."""
    _, _, creds = _setup(frontend, tmp_path)
    weights, model = _model(tmp_path)
    timeout_ms = frontend.fe.config.heartbeat_timeout_ms
    interval_ms = frontend.fe.config.heartbeat_interval_ms
    beating = containers(c_container, creds, weights, "--verbose")
    silent = containers(c_container, creds, weights, "--no-heartbeat")
    (b_id,) = [int(mt.group(1)) for mt in beating.wait_for(r"as replica (\d+) \(heartbeats every (\d+) ms")]
    (s_id,) = [int(mt.group(1)) for mt in silent.wait_for(r"as replica (\d+)")]
    assert f"heartbeats every {interval_ms} ms, timeout {timeout_ms} ms" in beating.text()
    # the frontend drops the silent one past the timeout; it then hears nothing, and comes back as a new replica
    silent.wait_for(r"silent for \d+ ms: reconnecting", timeout=3 * timeout_ms / 1000)
    (again,) = [int(mt.group(1)) for mt in silent.wait_for(r"as replica (\d+)", count=2)[1:]]
    assert again not in (b_id, s_id)
    ids = {r["replica_id"]: r for r in _replicas(frontend)}
    assert s_id not in ids, "the frontend kept a container that never beat"
    assert b_id in ids, f"the frontend dropped the container that beats: {beating.text()}"
    # the one that beats is still the replica it was, heard lately, and heard the frontend's beats
    quiet = ids[b_id]["connected_s"]
    assert quiet * 1000 > timeout_ms * 1.5
    ages = frontend.call(lambda: {r.replica_id: time.monotonic_ns() - r.last_seen_ns
                                  for r in frontend.fe.rpc.all_replicas()})
    assert ages[b_id] < timeout_ms * 1_000_000 / 2
    assert beating.text().count("heartbeat from the frontend") >= timeout_ms // interval_ms
    silent.stop()
    _wait(lambda: [r["replica_id"] for r in _replicas(frontend)] == [b_id], "the silent container to be dropped",
          timeout=2 * timeout_ms / 1000 + 5)
    x = np.ones(D, np.float32)
    with Client("127.0.0.1", frontend.port) as client:
        np.testing.assert_allclose(client.predict("lin", x).output, model(x), rtol=1e-12)
    assert "reconnecting" not in beating.text()


def test_refusals_end_the_c_container_with_a_reason(frontend, tmp_path, c_container, containers):
    admin, doc, creds = _setup(frontend, tmp_path)
    weights, _ = _model(tmp_path)
    # revoked credentials: the CURVE handshake is refused (ZAP), the container exits 2 and says why
    admin.revoke_container_credentials(doc["id"])
    c = containers(c_container, creds, weights)
    assert c.wait() == m.EXIT_REJECTED
    assert "refused this container's credentials" in c.text()
    # valid credentials, a hello the frontend refuses (F_REJECT): the model is deployed with another shape
    _, _, creds5 = _setup(frontend, tmp_path, shape=(5,), app="five", name="five.json")
    c = containers(c_container, creds5, weights)
    assert c.wait() == m.EXIT_REJECTED
    assert "rejected it: container expects input shape [4]; model five-model:1 is deployed with [5]" in c.text()
    # a file that is not container credentials, and credentials of another model: refused before connecting
    (tmp_path / "not.json").write_text('{"kind": "something else", "format": 1}')
    c = containers(c_container, tmp_path / "not.json", weights)
    assert c.wait() == m.EXIT_REJECTED and "are not Clipper container credentials" in c.text()
    c = containers(c_container, creds5, weights, "--name", "lin-model")
    assert c.wait() == m.EXIT_REJECTED and "issued for model five-model:1" in c.text()
    # a weights file it cannot load: the SDK's "load failed" code
    (tmp_path / "bad.txt").write_text("3 4\n1 2 3\n")
    c = containers(c_container, creds5, tmp_path / "bad.txt")
    assert c.wait() == m.EXIT_LOAD_FAILED and "too few weights" in c.text()
