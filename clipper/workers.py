"""``clipper start --workers N``: several frontend processes serving as one.

One frontend process runs on one event loop, so one core. With ``--workers
N`` the ``clipper start`` process becomes a supervisor of N frontend
processes (the workers) that together are one Clipper:

* **One state store.** Every worker is pointed at the same Redis server:
  the one ``--state redis://...`` names, or, with no ``--state``, a private
  ``redis-server`` the supervisor starts for them (a Unix socket in a
  private folder; its data, append-only, in ``clipper-redis/`` beside where
  the SQLite file would be). A registration, a key or a credential made
  through any worker reaches the others through the store's change feed,
  and per-user policy states are merged there (see
  :mod:`clipper.store.redis`).
* **Shared ports.** The msgpack and REST ports are bound by every worker
  with ``SO_REUSEPORT``: the kernel spreads new connections among the
  workers (a connection stays with the worker that accepted it). The
  supervisor holds each port bound (not listening) for as long as it runs,
  so ``--query-port 0`` picks one free port for all of them and no other
  program takes it while a worker restarts. The admin API is the first
  worker's alone: management calls made one after another see each other's
  effects (on a port shared by all, a link could reach a worker that has
  not yet heard of the application registered the moment before); the
  other workers apply its changes from the store within milliseconds. The
  metrics and container RPC ports are each worker's own: worker ``i`` gets
  the configured port plus ``i`` (or a free port each when configured as 0).
* **Model containers shared by the workers** (``--containers shared``, the
  default): the first worker's local manager runs every model's replicas,
  and each container connects to every worker (one socket each: see
  :class:`clipper.container.runtime.ContainerRuntime`), so ``replicas``
  means the same as with one frontend and a model is loaded once. Its
  children's credentials go to the shared store (a password's SHA-256, or
  a CURVE public key), so every worker accepts them. ``--containers own``:
  every worker runs the replicas for itself (``replicas`` per worker).
  Shared measured faster on this 2-core machine (bench/README.md,
  "workers"). Containers started by hand can serve every worker too
  (``python -m clipper.container ... --frontend ADDR --frontend ADDR``).
* **Supervision.** Workers die with the supervisor (``PR_SET_PDEATHSIG``);
  a worker that exits on its own is started again with backoff; SIGTERM or
  SIGINT to the supervisor drains every worker (each answers what it holds)
  and then stops the private Redis. The supervisor signals only processes
  it started, through their handles.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from .errors import InvalidConfigError

log = logging.getLogger("clipper.workers")

__all__ = ["MAX_WORKERS", "run_workers"]

MAX_WORKERS = 64


def _pdeathsig() -> None:
    """In a child, before exec: the kernel kills it when the supervisor dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def hold_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket on ``host:port`` (0: a free port) and return it.

    Every worker then binds the same port with SO_REUSEPORT; the held socket keeps the port this
    supervisor's while workers restart. A port another program listens on fails here, with the reason.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except OSError as exc:
        s.close()
        raise InvalidConfigError(f"cannot bind {host}:{port} for the workers: {exc.strerror or exc}") from None
    return s


async def _until_ready(proc, ready, timeout_s: float, what: str) -> None:
    """Wait (bounded) until ``await ready()`` is true for a process just started; its exit or the
    deadline is an error that says which."""
    deadline = time.monotonic() + timeout_s
    while not await ready():
        if proc.returncode is not None:
            raise InvalidConfigError(f"{what} exited at its start (return code {proc.returncode}); see its messages "
                                     "above")
        if time.monotonic() > deadline:
            raise InvalidConfigError(f"{what} was not ready within {timeout_s:.0f} s")
        try:
            await asyncio.wait_for(proc.wait(), 0.05)
        except asyncio.TimeoutError:
            pass


class PrivateRedis:
    """A redis-server for this supervisor's workers only: a Unix socket in a 0700 folder, data in ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.proc: asyncio.subprocess.Process | None = None
        self._sock_dir: str | None = None
        self.url: str | None = None

    async def start(self, timeout_s: float = 30.0) -> str:
        exe = shutil.which("redis-server")
        if exe is None:
            raise InvalidConfigError(
                "--workers needs a state store every worker shares: install redis-server (Debian: apt-get install "
                "redis-server), or pass --state redis://HOST:PORT/DB")
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        # A Unix socket path has a 107-byte limit: a short private folder (mkdtemp makes it 0700).
        self._sock_dir = tempfile.mkdtemp(prefix="clipper-redis-", dir="/tmp")
        path = os.path.join(self._sock_dir, "redis.sock")
        self.proc = await asyncio.create_subprocess_exec(
            exe, "--port", "0", "--unixsocket", path, "--unixsocketperm", "700", "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
            "--loglevel", "warning", "--logfile", "", "--bind", "127.0.0.1",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, preexec_fn=_pdeathsig,
            start_new_session=True)
        self.url = f"unix://{path}"

        async def answers() -> bool:
            return os.path.exists(path) and await asyncio.to_thread(self._ping, path)

        await _until_ready(self.proc, answers, timeout_s, "the private redis-server")
        return self.url

    @staticmethod
    def _ping(path: str) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                s.connect(path)
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    async def stop(self, grace_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()  # redis-server saves and exits on SIGTERM
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self._sock_dir is not None:
            shutil.rmtree(self._sock_dir, ignore_errors=True)
            self._sock_dir = None


class _Worker:
    def __init__(self, index: int, metrics_port, rpc_port) -> None:
        self.index = index
        self.metrics_port = metrics_port
        self.rpc_port = rpc_port
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict | None = None
        self.starts = 0
        self.task: asyncio.Task | None = None
        self.extra: list[str] = []  # more arguments for its `clipper start` (its part in shared containers)


class Supervisor:
    """Runs and watches the workers of one ``clipper start --workers N``."""

    def __init__(self, n: int, cfg, worker_argv, state_url: str | None, data_dir: Path,
                 backoff_s: tuple[float, float] = (0.5, 10.0), containers: str = "shared") -> None:
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_WORKERS:
            raise InvalidConfigError(f"--workers {n!r} is not a whole number from 1 to {MAX_WORKERS}")
        if containers not in ("shared", "own"):
            raise InvalidConfigError(f"--containers {containers!r} is not 'shared' or 'own'")
        self.containers = containers
        self.n = n
        self.cfg = cfg
        self.worker_argv = worker_argv  # (index, ports dict, state url, ready file, extra arguments) -> argv
        self.state_url = state_url
        self.redis = None if state_url else PrivateRedis(data_dir)
        self.backoff_s = backoff_s
        self.held: dict[str, socket.socket] = {}
        self.ports: dict[str, int | None] = {}
        self.workers: list[_Worker] = []
        self._dir: str | None = None
        self._rpc_dir: str | None = None
        self._stopping = False
        self.restarts = 0

    def _reserve_ports(self) -> None:
        cfg = self.cfg
        for name, host, port in (("query_port", cfg.host, cfg.query_port), ("rest_port", cfg.host, cfg.rest_port),
                                 ("admin_port", cfg.admin_host, cfg.admin_port)):
            if port is None:
                self.ports[name] = None
                continue
            s = hold_port(host, port)
            self.held[name] = s
            self.ports[name] = s.getsockname()[1]

    async def start(self) -> dict:
        self._dir = tempfile.mkdtemp(prefix="clipper-workers-")
        self._reserve_ports()
        if self.redis is not None:
            self.state_url = await self.redis.start()
        for i in range(self.n):
            mp = None if self.cfg.metrics_port is None else (self.cfg.metrics_port + i if self.cfg.metrics_port else 0)
            rp = self.cfg.rpc_port + i if self.cfg.rpc_port else 0
            self.workers.append(_Worker(i, mp, rp))
        if self.containers == "shared" and self.n > 1:
            self._plan_shared()
        # The first worker alone first: it applies the deployment file and fills an empty store; the others
        # then start from what it wrote.
        await self._start_worker(self.workers[0])
        await asyncio.gather(*(self._start_worker(w) for w in self.workers[1:]))
        for w in self.workers:
            w.task = asyncio.get_running_loop().create_task(self._watch(w))
        return self.describe()

    def _plan_shared(self) -> None:
        """Containers shared by the workers: the first worker's local manager runs them, and each connects to
        every worker: over Unix sockets in folders this supervisor makes (private), or over TCP to ports
        fixed now (each worker's RPC port must be known before the first one starts its containers)."""
        cfg = self.cfg
        ipc = cfg.local_rpc_transport == "ipc" and cfg.rpc_security == "curve"
        addrs = []
        if ipc:
            base = tempfile.mkdtemp(prefix="clipper-w-", dir="/tmp")  # short: a socket path has 107 bytes
            self._rpc_dir = base
            for w in self.workers:
                d = os.path.join(base, f"w{w.index}")
                os.mkdir(d, 0o700)
                w.extra += ["--rpc-ipc-dir", d]
                addrs.append(f"ipc://{d}/rpc.sock")
        else:
            host = cfg.rpc_host if cfg.rpc_host not in ("", "0.0.0.0", "::", "*") else "127.0.0.1"
            for w in self.workers:
                if not w.rpc_port:  # a free port now, for this worker's RPC (bound by ZeroMQ at its start)
                    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
                        s.bind((host, 0))
                        w.rpc_port = s.getsockname()[1]
                addrs.append(f"tcp://{'[' + host + ']' if ':' in host else host}:{w.rpc_port}")
        for w in self.workers:
            if w.index == 0:
                w.extra += ["--local-containers", "leader"]
                for a in addrs[1:]:
                    w.extra += ["--peer-rpc", a]
            else:
                w.extra += ["--local-containers", "member"]

    def describe(self) -> dict:
        return {**self.ports, "pid": os.getpid(), "state": self.state_url, "containers": self.containers, "workers": [
            {"index": w.index, "pid": w.proc.pid if w.proc else None, **(w.ready or {})} for w in self.workers]}

    async def _start_worker(self, w: _Worker, timeout_s: float = 120.0) -> None:
        assert self._dir is not None  # (made by start)
        ready_file = os.path.join(self._dir, f"worker-{w.index}.json")
        try:
            os.unlink(ready_file)
        except FileNotFoundError:
            pass
        ports = {**self.ports, "metrics_port": w.metrics_port, "rpc_port": w.rpc_port}
        if w.index:  # the admin API is the first worker's alone (see the module's docstring)
            ports["admin_port"] = None
            extra = [*w.extra, "--no-admin"]
        else:
            extra = w.extra
        argv = self.worker_argv(w.index, ports, self.state_url, ready_file, extra)
        w.starts += 1
        w.ready = None
        w.proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                      stdout=sys.stderr.fileno(), preexec_fn=_pdeathsig)

        async def wrote_ready() -> bool:
            return os.path.exists(ready_file)

        await _until_ready(w.proc, wrote_ready, timeout_s, f"worker {w.index}")
        with open(ready_file) as f:
            w.ready = json.load(f)

    async def _watch(self, w: _Worker) -> None:
        delay = self.backoff_s[0]
        while True:
            assert w.proc is not None  # (started before it is watched)
            rc = await w.proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            log.warning("worker %d (pid %d) exited with %s; starting it again in %.1f s", w.index, w.proc.pid, rc,
                        delay)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            started = time.monotonic()
            try:
                await self._start_worker(w)
            except InvalidConfigError as exc:
                log.error("%s", exc)
                if w.proc.returncode is None:
                    continue
            delay = self.backoff_s[0] if time.monotonic() - started > 60 else min(delay * 2, self.backoff_s[1])

    async def stop(self, grace_s: float) -> None:
        """SIGTERM every worker (each drains), wait ``grace_s`` for them, SIGKILL the rest; then the Redis."""
        self._stopping = True
        live = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        for proc in live:
            proc.terminate()
        if live:
            done, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in live], timeout=grace_s)
            for proc in live:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        for w in self.workers:
            if w.task is not None:
                w.task.cancel()
        if self.redis is not None:
            await self.redis.stop()
        for s in self.held.values():
            s.close()
        self.held.clear()
        for d in (self._dir, self._rpc_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
        self._dir = self._rpc_dir = None


async def run_workers(n: int, cfg, worker_argv, *, state_url: str | None, data_dir: Path,
                      ready_file: str | None = None, containers: str = "shared") -> int:
    """Run ``n`` workers until SIGTERM/SIGINT; returns the exit code of ``clipper start``."""
    sup = Supervisor(n, cfg, worker_argv, state_url, data_dir, containers=containers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        info = await sup.start()
        w = info["workers"]
        print(f"clipper ready: {n} workers (pids {', '.join(str(x['pid']) for x in w)}): msgpack queries on "
              f"{cfg.host}:{info['query_port']}, REST on {cfg.host}:{info['rest_port']}, admin API on "
              f"{cfg.admin_host}:{info['admin_port']}, metrics on ports "
              f"{', '.join(str(x.get('metrics_port')) for x in w)}, containers on ports "
              f"{', '.join(str(x.get('rpc_port')) for x in w)}; state {info['state']}", flush=True)
        if ready_file:
            tmp = Path(ready_file + ".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(ready_file)
        await stop.wait()
    finally:
        await sup.stop(cfg.drain_timeout_ms / 1000 + 10)
    return 0
