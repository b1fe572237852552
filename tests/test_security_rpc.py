"""The container RPC's trust boundary, tried as an attacker would: real frontends, real ZeroMQ peers,
real container processes (one of them on another "host", a network namespace of the test's own)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from clipper import errors as E
from clipper.client import Client
from clipper.config import FrontendConfig
from clipper.frontend import Frontend
from clipper.management.admin_client import AdminClient
from clipper.management.registry import Application, ModelVersion
from clipper.rpc import messages as m
from clipper.security.container_keys import ContainerCredentials, save_credentials

TESTS = Path(__file__).resolve().parent
X = np.array([1, 2, 3, 4], np.float32)  # row_sum: 10.0


class Peer:
    """A raw ZeroMQ DEALER speaking the container RPC by hand: what a rogue process can do."""

    def __init__(self, endpoint: str, creds: ContainerCredentials | None = None, curve=None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        if creds is not None:
            creds.apply(self.sock)
        if curve is not None:  # (server public key, client public, client secret): a key nobody issued
            self.sock.curve_serverkey, self.sock.curve_publickey, self.sock.curve_secretkey = curve
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock.connect(endpoint)

    def handshake(self, timeout_ms: int = 10_000) -> int:
        """The first handshake event (succeeded or one of the failures)."""
        assert self.monitor.poll(timeout_ms), "no handshake event"
        return recv_monitor_message(self.monitor)["event"]

    def hello(self, model: str, version: str = "1", **info) -> None:
        self.sock.send(msgpack.packb([m.C_HELLO, m.RPC_VERSION, {"model": model, "version": version, **info}]))

    def send(self, header: list, *frames) -> None:
        self.sock.send_multipart([msgpack.packb(header), *frames])

    def recv(self, timeout_ms: int = 10_000):
        if not self.sock.poll(timeout_ms):
            return None
        frames = self.sock.recv_multipart()
        return [msgpack.unpackb(frames[0]), *frames[1:]]

    def recv_kind(self, kind: int, timeout_ms: int = 10_000):
        """The next message of ``kind``, skipping heartbeats."""
        while True:
            msg = self.recv(timeout_ms)
            assert msg is not None, f"no message of kind {kind}"
            if msg[0][0] == kind:
                return msg
            assert msg[0][0] == m.F_HEARTBEAT, f"expected kind {kind}, got {msg[0]}"

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def peers():
    made: list[Peer] = []

    def make(*a, **kw) -> Peer:
        p = Peer(*a, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def tcp(frontend) -> str:
    return f"tcp://127.0.0.1:{frontend.fe.rpc_port}"


def creds_for(frontend, model: str, version: str | None = None) -> ContainerCredentials:
    doc = frontend.call(lambda: frontend.fe.issue_container_credentials(model, version))
    return ContainerCredentials.from_document(doc)


def n_replicas(frontend, key: str) -> int:
    return frontend.call(lambda: frontend.fe.rpc.count(key))


def wait_for(pred, what: str, timeout: float = 30.0) -> None:
    """Poll a cheap predicate of the system under test until it holds (bounded)."""
    import time

    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def answers_all_right(frontend, app="sum", n=200) -> None:
    with Client("127.0.0.1", frontend.port) as c:
        xs = np.random.default_rng(1).random((n, 4), dtype=np.float32)
        got = [p.output for p in c.predict_many(app, xs)]
    assert got == pytest.approx(xs.astype(np.float64).sum(axis=1).tolist(), rel=1e-6)


# ---------------------------------------------------------------- who gets a handshake
def test_local_containers_authenticate_by_themselves_over_a_private_socket(frontend):
    mv = frontend.deploy("sum", "row_sum", replicas=2)
    stats = frontend.call(frontend.fe.rpc.stats)
    assert len(stats) == 2 and {r["transport"] for r in stats} == {"ipc"}
    grants = frontend.call(lambda: {g.id: g for g in frontend.fe.keyring.grants.values()})
    for r in stats:  # each process its own credential; the pid is the one the manager started, not a claim
        g = grants[r["credential"]]
        assert g.origin == "manager" and g.model == "sum-model" and g.pid == r["pid"]
    sock_dir = Path(frontend.call(lambda: frontend.fe.rpc.ipc.endpoint)[len("ipc://"):]).parent
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700
    answers_all_right(frontend)
    assert frontend.fe.config.rpc_security == "curve" and mv.replicas == 2


def test_a_peer_without_credentials_gets_nothing(frontend, peers):
    frontend.deploy("sum", "row_sum")
    rogue = peers(tcp(frontend))
    rogue.hello("sum-model", "1")
    assert rogue.handshake() in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    answers_all_right(frontend)
    assert n_replicas(frontend, "sum-model:1") == 1
    assert rogue.recv(timeout_ms=0) is None


def test_a_peer_with_a_key_nobody_issued_gets_nothing(frontend, peers):
    frontend.deploy("sum", "row_sum")
    pub, sec = zmq.curve_keypair()
    denied = frontend.call(lambda: frontend.fe.keyring.denied)
    rogue = peers(tcp(frontend), curve=(frontend.fe.keyring.public_key, pub, sec))
    rogue.hello("sum-model", "1")
    assert rogue.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    answers_all_right(frontend)
    assert n_replicas(frontend, "sum-model:1") == 1
    assert frontend.call(lambda: frontend.fe.keyring.denied) == denied + 1
    assert rogue.recv(timeout_ms=0) is None


def test_model_a_key_cannot_register_as_model_b(frontend, peers):
    frontend.deploy("sum", "row_sum")
    frontend.call(frontend.fe.deploy_model(ModelVersion("other", "1", "float32", [4])))  # no containers
    rogue = peers(tcp(frontend), creds_for(frontend, "other"))
    rogue.hello("sum-model", "1")
    assert rogue.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED  # a valid key ...
    reject = rogue.recv_kind(m.F_REJECT)  # ... for another model: a typed refusal, nothing else
    assert "issued for model other" in reject[0][1] and "sum-model:1" in reject[0][1]
    answers_all_right(frontend)
    assert n_replicas(frontend, "sum-model:1") == 1 and n_replicas(frontend, "other:1") == 0
    assert rogue.recv(timeout_ms=0) is None


def test_a_key_for_one_version_cannot_register_another(frontend, peers):
    frontend.deploy("sum", "row_sum")
    frontend.call(frontend.fe.deploy_model(ModelVersion("sum-model", "2", "float32", [4]), make_current=False))
    rogue = peers(tcp(frontend), creds_for(frontend, "sum-model", "2"))
    rogue.hello("sum-model", "1")
    assert "issued for model sum-model:2" in rogue.recv_kind(m.F_REJECT)[0][1]
    assert n_replicas(frontend, "sum-model:1") == 1


def test_an_accepted_peer_gets_batches_and_its_answers_count(frontend, peers):
    # The control for the tests above: the same raw peer, with the right key, is served batches.
    frontend.deploy("sum", "row_sum", replicas=0)
    peer = peers(tcp(frontend), creds_for(frontend, "sum-model", "1"))
    peer.hello("sum-model", "1", pid=1)
    assert peer.recv_kind(m.F_WELCOME)
    import threading

    answers = []
    t = threading.Thread(target=lambda: answers.append(Client("127.0.0.1", frontend.port).predict("sum", X)))
    t.start()
    header, payload = peer.recv_kind(m.F_BATCH)
    _, batch_id, count, enc, meta = header
    assert count == 1 and enc == m.ENC_NDARRAY
    out = np.array([42.0])
    peer.send([m.C_RESULT, batch_id, 1, m.ENC_NDARRAY, ["<f8", [1]]], out.tobytes())
    t.join(30)
    assert answers[0].output == 42.0
    stats = frontend.call(frontend.fe.rpc.stats)
    assert stats[0]["pid"] is None and stats[0]["claimed_pid"] == 1  # shown, not believed


def test_bad_hellos_get_typed_refusals_and_change_nothing(frontend, peers):
    frontend.deploy("sum", "row_sum")
    peer = peers(tcp(frontend), creds_for(frontend, "sum-model"))
    assert peer.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
    bad = [
        ([m.C_HELLO, 99, {"model": "sum-model", "version": "1"}], "RPC version 99"),
        ([m.C_HELLO, m.RPC_VERSION, "not a map"], "info is a map"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "pid": "1; rm -rf"}], "hello pid"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "pid": -4}], "hello pid"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "pid": 2**40}], "hello pid"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": 1}], "hello version"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "../etc", "version": "1"}], "hello model"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model\n", "version": "1"}], "hello model"),  # ($ matched it)
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1\n"}], "hello version"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "input_shape": [1] * 33}], "input_shape"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "input_shape": [4.5]}], "input_shape"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "input_dtype": "object"}], "input_dtype"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "input_shape": [5]}], "input shape [5]"),
        ([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1", "sdk": "x" * 500}], "hello sdk"),
    ]
    before = frontend.call(lambda: frontend.fe.rpc.rejected)
    for header, why in bad:
        peer.send(header)
        reject = peer.recv_kind(m.F_REJECT)
        assert why in reject[0][1], (header, reject)
    # frames that are not even a header: ignored, counted
    peer.sock.send(b"\xc1 not msgpack")
    peer.sock.send_multipart([msgpack.packb([m.C_HELLO, m.RPC_VERSION, {"model": "sum-model", "version": "1"}]),
                              b"x" * 10])  # a valid hello last: the peer is accepted after all that
    assert peer.recv_kind(m.F_WELCOME)
    assert frontend.call(lambda: frontend.fe.rpc.rejected) == before + len(bad)
    assert n_replicas(frontend, "sum-model:1") == 2
    peer.send([m.C_BYE])  # leaves before the traffic: it would hold a batch it never answers
    wait_for(lambda: n_replicas(frontend, "sum-model:1") == 1, "the peer's goodbye")
    answers_all_right(frontend)


def test_the_sdk_refuses_credentials_of_another_model_before_connecting(frontend, tmp_path):
    frontend.deploy("sum", "row_sum")
    creds = tmp_path / "c.json"
    save_credentials(creds, frontend.call(lambda: frontend.fe.issue_container_credentials("sum-model")))
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    proc = subprocess.run([sys.executable, "-m", "clipper.container", "model_zoo.py:row_sum", "--name", "ghost",
                           "--version", "1", "--frontend", tcp(frontend), "--credentials", str(creds)],
                          cwd=TESTS, capture_output=True, text=True, timeout=60)
    assert proc.returncode == m.EXIT_REJECTED and "issued for model sum-model" in proc.stderr


def test_a_container_without_credentials_exits_with_a_clear_message(frontend):
    frontend.deploy("sum", "row_sum")
    proc = subprocess.run([sys.executable, "-m", "clipper.container", "model_zoo.py:row_sum", "--name", "sum-model",
                           "--version", "1", "--frontend", tcp(frontend)],
                          cwd=TESTS, capture_output=True, text=True, timeout=60)
    assert proc.returncode == m.EXIT_REJECTED and "requires credentials" in proc.stderr


# ---------------------------------------------------------------- revocation
def _hand_container(frontend, creds_file, model="sum-model", fn="row_sum", env=None, prefix=()):
    return subprocess.Popen([*prefix, sys.executable, "-m", "clipper.container", f"model_zoo.py:{fn}", "--name", model,
                             "--version", "1", "--credentials", str(creds_file)],
                            cwd=TESTS, env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)


def test_revoked_credentials_disconnect_their_container(frontend, tmp_path):
    frontend.deploy("sum", "row_sum")
    a = AdminClient("127.0.0.1", frontend.fe.admin_port, timeout=60)
    doc = a.issue_container_credentials("sum-model", frontend=tcp(frontend), label="test box")
    assert [c["id"] for c in a.list_container_credentials()] == [doc["id"]]
    assert "secret_key" not in json.dumps(a.list_container_credentials())
    save_credentials(tmp_path / "c", doc)
    proc = _hand_container(frontend, tmp_path / "c")
    try:
        frontend.call(frontend.fe.wait_ready("sum-model", "1", replicas=2, timeout_s=60))
        revoked = a.revoke_container_credentials(doc["id"])
        assert revoked["revoked"]["id"] == doc["id"]
        assert proc.wait(30) == m.EXIT_REJECTED and "credentials were revoked" in proc.stderr.read()
        assert n_replicas(frontend, "sum-model:1") == 1 and a.list_container_credentials() == []
        # started again with the revoked key: no handshake
        again = _hand_container(frontend, tmp_path / "c")
        assert again.wait(30) == m.EXIT_REJECTED and "refused this container's credentials" in again.stderr.read()
        answers_all_right(frontend)
        with pytest.raises(E.InvalidConfigError, match="no container credentials"):
            a.revoke_container_credentials(doc["id"])
    finally:
        for p in (proc, locals().get("again")):
            if p is not None:
                p.kill()
                p.wait()


def test_deleting_a_model_revokes_its_credentials(frontend, tmp_path):
    frontend.deploy("sum", "row_sum")
    frontend.call(frontend.fe.deploy_model(ModelVersion("gone", "1", "float32", [4])))
    a = AdminClient("127.0.0.1", frontend.fe.admin_port, timeout=60)
    doc = a.issue_container_credentials("gone")
    kept = a.issue_container_credentials("sum-model")
    a.delete_model("gone")
    assert [c["id"] for c in a.list_container_credentials()] == [kept["id"]]
    with pytest.raises(E.UnknownModelError):
        a.issue_container_credentials("gone")
    assert doc["id"] != kept["id"]


# ---------------------------------------------------------------- a claimed pid is never signalled
@pytest.mark.parametrize("claim", ["a process of the test's own", "the frontend's own process"])
def test_a_claimed_pid_is_never_signalled_and_the_hung_batch_is_answered_elsewhere(frontend_factory, peers, claim):
    fe = frontend_factory(batch_timeout_ms=400, heartbeat_interval_ms=100)
    fe.deploy("sum", "row_sum", replicas=0)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        rogue = peers(tcp(fe), creds_for(fe, "sum-model", "1"))
        # "kill this one when I hang": a live process of the test's, or the frontend itself (this process)
        rogue.hello("sum-model", "1", pid=victim.pid if claim.startswith("a process") else os.getpid())
        rogue.recv_kind(m.F_WELCOME)
        import threading

        answers = []
        t = threading.Thread(target=lambda: answers.append(Client("127.0.0.1", fe.port, timeout=60).predict("sum", X)))
        t.start()
        rogue.recv_kind(m.F_BATCH)  # it holds the batch and never answers
        fe.call(fe.fe.set_replicas("sum-model", "1", 1))  # a real replica to take the batch over
        reject = rogue.recv_kind(m.F_REJECT, timeout_ms=30_000)
        assert "batch timeout" in reject[0][1]
        t.join(60)
        assert answers and answers[0].output == 10.0  # answered by the real replica
        assert victim.poll() is None  # the claimed process lives on
        stats = fe.call(fe.fe.rpc.stats)
        assert [r["credential"] is not None and r["pid"] is not None for r in stats] == [True]
    finally:
        victim.kill()
        victim.wait()


# ---------------------------------------------------------------- a container on another host
@pytest.fixture
def remote_host():
    """A network namespace with its own address, linked to this one by a veth pair: another host."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")
    # namespaces a killed run left behind (their veth pairs go with them)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith("clip-") and not os.path.exists(f"/proc/{name.rsplit('-', 1)[-1]}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
    tag = uuid.uuid4().hex[:4]
    ns, veth_host, veth_ns = f"clip-{tag}-{os.getpid()}", f"ch{tag}{os.getpid() % 10000}", f"cn{tag}"
    in_use = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    octet = next(o for o in [int(tag[:2], 16), *range(256)] if f"10.231.{o}." not in in_use)
    host_ip, ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def ip(*args, netns=None):
        cmd = ["ip", *(["netns", "exec", netns, "ip"] if netns else []), *args]
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)

    ip("netns", "add", ns)
    try:
        ip("link", "add", veth_host, "type", "veth", "peer", "name", veth_ns)
        ip("link", "set", veth_ns, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", veth_host)
        ip("link", "set", veth_host, "up")
        ip("addr", "add", f"{ns_ip}/30", "dev", veth_ns, netns=ns)
        ip("link", "set", veth_ns, "up", netns=ns)
        ip("link", "set", "lo", "up", netns=ns)
        yield {"netns": ns, "host_ip": host_ip, "ip": ns_ip}
    finally:
        subprocess.run(["ip", "link", "del", veth_host], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_a_hung_remote_replica_is_dropped_told_to_exit_and_its_batch_answered_here(frontend_factory, remote_host,
                                                                                     tmp_path):
    fe = frontend_factory(rpc_host=remote_host["host_ip"], batch_timeout_ms=500, heartbeat_interval_ms=100)
    fe.call(fe.fe.register_application(Application("c", "float32", [4], slo_ms=30_000)))
    fe.call(fe.fe.deploy_model(ModelVersion("const", "1", "float32", [4], entry="model_zoo.py:constant", replicas=0,
                                            env={"CLIPPER_TEST_CONST": "7"})))
    fe.call(fe.fe.link("c", "const"))
    a = AdminClient("127.0.0.1", fe.fe.admin_port, timeout=60)
    save_credentials(tmp_path / "remote", a.issue_container_credentials("const", "1"))
    assert json.loads((tmp_path / "remote").read_text())["frontend"] == f"tcp://{remote_host['host_ip']}:{fe.fe.rpc_port}"
    remote = _hand_container(fe, tmp_path / "remote", model="const", fn="constant",
                             env={"CLIPPER_TEST_CONST": "666", "CLIPPER_TEST_SLEEP_S": "3"},
                             prefix=("ip", "netns", "exec", remote_host["netns"]))
    try:
        fe.call(fe.fe.wait_ready("const", "1", timeout_s=60))
        peer = fe.call(fe.fe.rpc.stats)[0]
        assert peer["peer"] == remote_host["ip"] and peer["transport"] == "tcp" and peer["pid"] is None
        import threading

        answers = []
        t = threading.Thread(target=lambda: answers.append(Client("127.0.0.1", fe.port, timeout=60).predict("c", X)))
        t.start()
        fe.wait_until(lambda st: st["models"]["const:1"]["batches_sent"] >= 1, what="the batch sent to the remote")
        fe.call(fe.fe.set_replicas("const", "1", 1))  # a local replica to answer in its place
        t.join(60)
        assert answers and answers[0].output == 7
        assert remote.wait(30) == m.EXIT_REJECTED and "batch timeout" in remote.stderr.read()
    finally:
        remote.kill()
        remote.wait()


# ---------------------------------------------------------------- settings
def test_rpc_security_none_is_refused_off_loopback():
    import asyncio

    async def start():
        await Frontend(FrontendConfig(query_port=0, rest_port=None, admin_port=None, metrics_port=None, rpc_port=0,
                                      rpc_security="none", rpc_host="0.0.0.0")).start()

    with pytest.raises(E.InvalidConfigError, match="loopback only"):
        asyncio.run(start())


def test_rpc_security_none_serves_on_loopback(frontend_factory):
    fe = frontend_factory(rpc_security="none")
    fe.deploy("sum", "row_sum", replicas=2)
    assert {r["transport"] for r in fe.call(fe.fe.rpc.stats)} == {"tcp"}
    answers_all_right(fe)


def test_local_children_over_tcp_use_curve(frontend_factory):
    fe = frontend_factory(local_rpc_transport="tcp")
    fe.deploy("sum", "row_sum")
    assert {r["transport"] for r in fe.call(fe.fe.rpc.stats)} == {"tcp"}
    answers_all_right(fe)


def test_the_server_key_and_credentials_survive_a_restart_with_private_files(frontend_factory, tmp_path):
    path = tmp_path / "state" / "s.sqlite"
    first = frontend_factory(state_path=str(path))
    first.deploy("sum", "row_sum")
    key = first.fe.keyring.public_key
    doc = first.call(lambda: first.fe.issue_container_credentials("sum-model"))
    first.close()
    secrets_dir = path.parent / "clipper-secrets"
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    for f in ("rpc-server.key_secret", "admin-token"):
        assert stat.S_IMODE((secrets_dir / f).stat().st_mode) == 0o600, f
    second = frontend_factory(state_path=str(path))
    assert second.fe.keyring.public_key == key
    assert [g["id"] for g in second.call(second.fe.keyring.operator_grants)] == [doc["id"]]


def test_valid_credentials_for_a_version_that_is_not_deployed_are_refused_clearly(frontend, tmp_path):
    frontend.deploy("sum", "row_sum")
    save_credentials(tmp_path / "c", frontend.call(lambda: frontend.fe.issue_container_credentials("sum-model")))
    proc = subprocess.run([sys.executable, "-m", "clipper.container", "model_zoo.py:row_sum", "--name", "sum-model",
                           "--version", "9", "--frontend", tcp(frontend), "--credentials", str(tmp_path / "c")],
                          cwd=TESTS, capture_output=True, text=True, timeout=60)
    assert proc.returncode == m.EXIT_REJECTED and "model sum-model:9 is not deployed" in proc.stderr
    assert n_replicas(frontend, "sum-model:1") == 1


# ---------------------------------------------------------------- the local Unix socket (PLAIN)
def ipc(frontend) -> str:
    return frontend.call(lambda: frontend.fe.rpc.ipc.endpoint)


def plain(grant_id: str, password: str, model="sum-model") -> ContainerCredentials:
    return ContainerCredentials(grant_id, model, None, "plain", password=password)


def test_the_local_socket_refuses_wrong_passwords_and_plain_peers_without_credentials(frontend, peers):
    frontend.deploy("sum", "row_sum")
    grant_id = frontend.call(lambda: next(iter(frontend.fe.keyring.grants)))
    denied = frontend.call(lambda: frontend.fe.keyring.denied)
    wrong = peers(ipc(frontend), plain(grant_id, "not-the-password-0123456789"))
    wrong.hello("sum-model", "1")
    assert wrong.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    bare = peers(ipc(frontend))
    bare.hello("sum-model", "1")
    assert bare.handshake() in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    assert frontend.call(lambda: frontend.fe.keyring.denied) == denied + 1
    answers_all_right(frontend)
    assert n_replicas(frontend, "sum-model:1") == 1


def test_a_local_credential_serves_only_its_model_and_dies_with_its_process(frontend, peers):
    frontend.deploy("sum", "row_sum")
    frontend.call(frontend.fe.deploy_model(ModelVersion("other", "1", "float32", [4])))
    grant = frontend.call(lambda: next(iter(frontend.fe.keyring.grants.values())))
    assert grant.origin == "manager" and grant.model == "sum-model"
    stolen = plain(grant.id, grant.password)  # what a peer would hold if it read the child's environment
    as_other = peers(ipc(frontend), stolen)
    as_other.hello("other", "1")
    assert "issued for model sum-model:1" in as_other.recv_kind(m.F_REJECT)[0][1]
    os.kill(grant.pid, 9)  # the child exits: its credential goes with it
    wait_for(lambda: frontend.call(lambda: frontend.fe.keyring.get(grant.id)) is None, "the revocation")
    late = peers(ipc(frontend), stolen)
    late.hello("sum-model", "1")
    assert late.handshake() == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    frontend.call(frontend.fe.wait_ready("sum-model", "1", timeout_s=60))  # its successor has one of its own
    answers_all_right(frontend)


def test_a_failed_start_leaves_no_thread_socket_or_secret_behind(frontend_factory):
    import socket
    import threading

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        before = {t.ident for t in threading.enumerate()}
        tmp_before = set(os.listdir("/tmp"))
        with pytest.raises(OSError):
            frontend_factory(admin_port=taken.getsockname()[1])
    leaked = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
    assert not leaked, leaked
    assert not {n for n in set(os.listdir("/tmp")) - tmp_before if n.startswith("clipper-")}


def _welcomed_peer_and_asker(frontend, peers):
    """``sum`` served by one raw peer only (welcomed), and ``ask()``: a thread sending one query to it, whose
    answer (or typed error) lands in the list returned with them."""
    import threading

    frontend.deploy("sum", "row_sum", replicas=0)
    peer = peers(tcp(frontend), creds_for(frontend, "sum-model", "1"))
    peer.hello("sum-model", "1", pid=1)
    assert peer.recv_kind(m.F_WELCOME)
    answers: list = []

    def one():
        try:
            answers.append(Client("127.0.0.1", frontend.port).predict("sum", X))
        except E.ClipperError as exc:
            answers.append(exc)

    def ask() -> threading.Thread:
        t = threading.Thread(target=one)
        t.start()
        return t

    return peer, ask, answers


@pytest.mark.parametrize("shape", [[1.0], [True], ["1"]])
def test_an_output_shape_that_is_not_integers_is_refused(frontend, peers, shape):
    # [1.0] and [True] equal a count of 1 in Python: the count must be an int, or the answer is not taken.
    peer, ask, answers = _welcomed_peer_and_asker(frontend, peers)
    t = ask()
    for _ in range(5):  # the batch, and any retry of it, gets the same bad answer
        got = peer.recv(timeout_ms=3000)
        if got is None:
            break
        header, *_ = got
        if header[0] == m.F_BATCH:
            peer.send([m.C_RESULT, header[1], 1, m.ENC_NDARRAY, ["<f8", shape]], np.array([42.0]).tobytes())
    t.join(30)
    assert len(answers) == 1
    a = answers[0]
    assert isinstance(a, E.ClipperError) or a.is_default and a.output != 42.0, a


def test_a_message_of_more_parts_than_the_rpc_has_is_refused_uncopied(frontend, peers):
    # ZeroMQ bounds each part of a message (max_rpc_message_bytes), not their number: a container's answer
    # in many parts is refused (its parts past the third dropped without a copy) and fails the batch it held.
    peer, ask, answers = _welcomed_peer_and_asker(frontend, peers)
    ignored = frontend.call(lambda: frontend.fe.rpc.ignored)
    t = ask()
    header, _ = peer.recv_kind(m.F_BATCH)
    chunk = bytes(256 * 1024)
    peer.send([m.C_RESULT, header[1], 1, m.ENC_NDARRAY, ["<f8", [1]]], np.array([42.0]).tobytes(), *[chunk] * 40)
    t.join(30)
    assert len(answers) == 1
    a = answers[0]
    assert isinstance(a, E.ClipperError) or a.is_default and a.output != 42.0, a
    assert frontend.call(lambda: frontend.fe.rpc.ignored) == ignored + 1
    assert n_replicas(frontend, "sum-model:1") == 1  # refused, still connected: its next answer counts
    t = ask()
    header, _ = peer.recv_kind(m.F_BATCH)
    peer.send([m.C_RESULT, header[1], 1, m.ENC_NDARRAY, ["<f8", [1]]], np.array([42.0]).tobytes())
    t.join(30)
    assert answers[1].output == 42.0
