"""Fixtures that run the real thing: a frontend on port 0 in its own event-loop
thread, model containers as real child processes, real sockets."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest
import uvloop

from clipper._native import framing
from clipper.config import FrontendConfig
from clipper.frontend import Frontend
from clipper.management.registry import Application, ModelVersion
from clipper.protocol import wire

TESTS = Path(__file__).resolve().parent


@pytest.fixture(autouse=True, scope="session")
def _private_runtime_dir(tmp_path_factory):
    """Frontends started by the tests publish their admin tokens' locations here, not in the user's own
    runtime folder (subprocesses, like the CLI, inherit it)."""
    import os

    os.environ["CLIPPER_RUNTIME_DIR"] = str(tmp_path_factory.mktemp("clipper-run"))
    os.environ.pop("CLIPPER_ADMIN_TOKEN", None)
    os.environ.pop("CLIPPER_ADMIN_TOKEN_FILE", None)
    yield


def make_cert(folder: Path, name: str = "server") -> tuple[str, str]:
    """A self-signed certificate (and its key) for 127.0.0.1 and localhost, made by the openssl CLI."""
    import subprocess

    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


class RunningFrontend:
    """A :class:`Frontend` on a uvloop loop in a background thread.

    Any exception the loop reports fails the test at teardown.
    """

    def __init__(self, config: FrontendConfig) -> None:
        self.loop = uvloop.new_event_loop()
        self.loop_errors: list = []
        self.loop.set_exception_handler(lambda loop, ctx: self.loop_errors.append(ctx))
        self.thread = threading.Thread(target=self.loop.run_forever, name="frontend-loop", daemon=True)
        self.thread.start()
        self.fe = Frontend(config, base_dir=TESTS)
        try:
            self.call(self.fe.start())
        except BaseException:  # a start that fails leaves no loop thread behind
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()
            raise

    def call(self, coro_or_fn, timeout: float = 60.0):
        """Run a coroutine (or a plain function) on the frontend's loop and return its result."""
        if asyncio.iscoroutine(coro_or_fn):
            return asyncio.run_coroutine_threadsafe(coro_or_fn, self.loop).result(timeout)

        async def run():
            return coro_or_fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    @property
    def port(self) -> int:
        return self.fe.query_port

    def deploy(self, app: str, fn: str, *, dtype="float32", shape=(4,), slo_ms=10_000.0, replicas=1, max_batch=8,
               default_output=None, on_deadline="default", env=None, version="1", model=None, cache=True,
               batching="aimd", batch_delay_ms=0.0, latency_budget_ms=None, on_overload=None) -> ModelVersion:
        """Register ``app``, deploy ``tests/model_zoo.py:fn`` as its model, link, wait for the replicas."""
        model = model or f"{app}-model"
        self.call(self.fe.register_application(Application(app, dtype, shape, slo_ms=slo_ms,
                                                           default_output=default_output,
                                                           on_deadline=on_deadline, cache=cache,
                                                           on_overload=on_overload)))
        mv = ModelVersion(model, version, dtype, shape, entry=f"model_zoo.py:{fn}", replicas=replicas,
                          max_batch=max_batch, env=dict(env or {}), batching=batching,
                          batch_delay_ms=batch_delay_ms, latency_budget_ms=latency_budget_ms)
        self.call(self.fe.deploy_model(mv))
        self.call(self.fe.link(app, model))
        if replicas:
            self.call(self.fe.wait_ready(model, version, timeout_s=60))
        return mv

    def deploy_ensemble(self, app: str, models: list[tuple], *, policy: str = "exp4", dtype="float32", shape=(4,),
                        slo_ms=10_000.0, default_output=None, on_deadline="default", cache=True, max_batch=8,
                        **app_kw) -> list[str]:
        """Register ``app`` with ``policy``; deploy and link each ``(model, fn, env)`` (version "1").

        Returns the model keys, in link order, once every replica is connected.
        """
        self.call(self.fe.register_application(Application(
            app, dtype, shape, slo_ms=slo_ms, default_output=default_output, on_deadline=on_deadline,
            cache=cache, policy=policy, **app_kw)))
        keys = []
        for model, fn, env in models:
            mv = ModelVersion(model, "1", dtype, shape, entry=f"model_zoo.py:{fn}", max_batch=max_batch,
                              env=dict(env or {}))
            self.call(self.fe.deploy_model(mv))
            self.call(self.fe.link(app, model))
            keys.append(mv.key)
        for model, _, _ in models:
            self.call(self.fe.wait_ready(model, "1", timeout_s=60))
        return keys

    def state(self, app: str, user: str = "") -> dict:
        """The policy state of ``app`` for ``user``, read on the loop."""
        return self.call(lambda: self.fe.processor.routes[app].states.get(user))

    def stats(self) -> dict:
        """The query path's figures (QueryProcessor.stats), read on the loop."""
        return self.call(self.fe.processor.stats)

    def wait_until(self, predicate, timeout: float = 30.0, what: str = "condition"):
        """Poll the frontend's figures until ``predicate(stats)`` holds (the state lives in another thread)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not hold within {timeout} s; stats: {st}")
            time.sleep(0.01)

    def replica_pids(self, key: str) -> list[int]:
        return self.call(lambda: [r.pid for r in self.fe.rpc.replicas.values() if r.key == key])

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.call(self.fe.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def make_config(**limits) -> FrontendConfig:
    cfg = FrontendConfig(query_port=0, rest_port=0, admin_port=0, metrics_port=0, rpc_port=0, heartbeat_interval_ms=200,
                         heartbeat_timeout_ms=2000, restart_backoff_ms=(50, 500))
    for k, v in limits.items():
        if hasattr(cfg, k):
            setattr(cfg, k, v)
        else:
            setattr(cfg.limits, k, v)
    return cfg


@pytest.fixture
def frontend_factory():
    made: list[RunningFrontend] = []

    def make(**overrides) -> RunningFrontend:
        rf = RunningFrontend(make_config(**overrides))
        made.append(rf)
        return rf

    yield make
    for rf in made:
        rf.close()
        assert not rf.loop_errors, f"the frontend's event loop reported errors: {rf.loop_errors}"


@pytest.fixture
def frontend(frontend_factory) -> RunningFrontend:
    return frontend_factory()


class WireConn:
    """A raw protocol connection for tests that need to send exact bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = framing.FrameReader(1 << 26)
        self.unpack = wire.make_unpacker()
        self.backlog: list = []

    def send(self, msg) -> None:
        self.sock.sendall(framing.pack_frame(wire.pack(msg)))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self, n: int, timeout: float = 30.0) -> list:
        """Receive ``n`` messages, in the order they arrive."""
        deadline = time.monotonic() + timeout
        out = self.backlog
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"got {len(out)} of {n} replies: {out}")
            self.sock.settimeout(left)
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError(f"server closed the connection after {len(out)} of {n} replies")
            out.extend(self.unpack(f) for f in self.reader.feed(data))
        self.backlog = out[n:]
        return out[:n]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire_conn():
    conns = []

    def make(port: int) -> WireConn:
        c = WireConn(port)
        conns.append(c)
        return c

    yield make
    for c in conns:
        c.close()


class RedisServer:
    """A real redis-server on a private Unix socket (TCP off), started by the test that needs it."""

    def __init__(self, folder: Path, durable: bool = False) -> None:
        import shutil

        self.exe = shutil.which("redis-server")
        if self.exe is None:
            pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
        self.folder = folder
        self.durable = durable  # an append-only file, fsynced at every write: a restart keeps everything
        self.socket = folder / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.log = folder / "redis.log"
        self.start()

    def start(self) -> None:
        import subprocess

        aof = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen(
            [self.exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700", "--save", "",
             *aof, "--dir", str(self.folder), "--logfile", str(self.log)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()

    def kill(self) -> None:
        """SIGKILL (through the handle of this fixture, which started it): no goodbye to any client."""
        self.proc.kill()
        self.proc.wait(10)

    def client(self):
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def wait_ready(self, timeout: float = 10.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if self.socket.exists() and self.client().ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer within 10 s")
            time.sleep(0.02)

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # (a test may have paused it)
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except Exception:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One redis-server for the session's tests that only read and write (each uses its own key prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path_factory):
    """Fresh redis-servers for tests that stop, pause or restart them."""
    made = []

    def make(durable: bool = False) -> RedisServer:
        made.append(RedisServer(tmp_path_factory.mktemp("redis"), durable))
        return made[-1]

    yield make
    for s in made:
        s.stop()


def check_store_against_model(store, seq, namespaces, *, reports_deletes: bool) -> None:
    """Run ``seq`` (save / trim / delete / drop operations) on a state store and on a model of what it
    must hold (recency by save order); after each, every read must agree: loads (before the writes are
    applied, for stores that apply them behind the caller's back, and after), counts and keys newest
    first. ``reports_deletes``: ``delete`` and ``delete_namespace`` return what they removed."""
    ref: dict[str, dict[str, tuple[int, bytes]]] = {ns: {} for ns in namespaces}  # ns -> key -> (recency, value)
    clock = 0
    for op in seq:
        if op[0] == "save":
            store.save_many(op[1])
            for ns, key, value in op[1]:
                clock += 1
                ref[ns][key] = (clock, value)
        elif op[0] == "trim":
            _, ns, keep = op
            gone = store.trim(ns, keep)
            newest = sorted(ref[ns].items(), key=lambda kv: -kv[1][0])
            assert gone == max(0, len(newest) - keep)
            ref[ns] = dict(newest[:keep])
        elif op[0] == "delete":
            _, ns, key = op
            existed = store.delete(ns, key)
            if reports_deletes:
                assert existed == (key in ref[ns])
            ref[ns].pop(key, None)
        else:
            n = store.delete_namespace(op[1])
            if reports_deletes:
                assert n == len(ref[op[1]])
            ref[op[1]] = {}
        for ns in namespaces:
            for key in "uvwxyz":
                want = ref[ns].get(key)
                assert store.load(ns, key) == (want[1] if want else None)
        for ns in namespaces:
            assert store.count(ns) == len(ref[ns])
            assert store.keys(ns) == [k for k, _ in sorted(ref[ns].items(), key=lambda kv: -kv[1][0])]
            for key, (_, value) in ref[ns].items():
                assert store.load(ns, key) == value
