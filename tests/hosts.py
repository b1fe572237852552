"""Hosts for the tests: Linux network namespaces joined by a private switch.

A :class:`Network` makes one "switch" namespace holding a bridge and, per
host, a namespace with its own address joined to the bridge by a veth pair.
Everything lives in namespaces the harness made: the root namespace gets no
device, address or route, so concurrent runs (of this harness or of anything
else) never meet. Names carry the harness prefix and the pid of the run;
the subnet is a random 10.x.y.0/24.

What runs on a host:

* processes (:meth:`Host.popen`: ``ip netns exec NS argv``, which execs in
  place, so the handle's pid is the process itself); the network keeps every
  handle and stops each at teardown, SIGTERM then SIGKILL, through its own
  handle;
* code of the test process itself (:meth:`Host.call`): a thread of the
  test's that entered the host's namespace (``setns``, which changes only
  the calling thread) runs the function, so every socket it makes lives on
  that host. A client made there keeps its socket on that host wherever it is
  used later.

:meth:`Host.cut` and :meth:`Host.restore` pull and plug the host's cable:
the switch's end of its veth pair goes down (the host's end loses its
carrier; nothing it sends arrives, established TCP connections hang, as
across a real partition) and up again.

Namespaces a crashed earlier run left behind (the prefix, a pid no longer
running) are deleted when a network is made; processes still inside them
are listed, never signalled (they are not this run's).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

PREFIX = "clhost"  # every namespace the harness makes: clhost<pid>-<tag>-<host>
CLONE_NEWNET = 0x40000000
TESTS = Path(__file__).resolve().parent
PYTHON = sys.executable


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 30.0, every: float = 0.02,
             detail: Callable[[], str] | None = None):
    """Poll ``predicate`` until it returns something true (returned), at most ``timeout`` seconds; past
    it, fail saying ``what`` (and ``detail()``, e.g. the processes' logs)."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                                 + (f"\n{detail()}" if detail is not None else ""))
        time.sleep(every)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def namespaces_unavailable() -> str | None:
    """Why this machine cannot run the harness, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (the harness runs `ip netns add`)"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed (scripts/test.sh installs it)"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not allowed here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete the harness's namespaces whose run (the pid in the name) is gone; returns their names."""
    listed = _ip("netns", "list", check=False).stdout
    gone = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or os.path.exists(f"/proc/{pid}") or int(pid) == os.getpid():
            continue
        left = _ip("netns", "pids", name, check=False).stdout.split()
        if left:
            print(f"hosts: namespace {name} of a crashed run still holds processes {left}; "
                  "deleting its name, not signalling them", file=sys.stderr)
        _ip("netns", "del", name, check=False)
        gone.append(name)
    return gone


_libc = None


def _enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at ``path``."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Host:
    """One namespace on the switch, with its address (``ip``) and its cable (``cut``/``restore``)."""

    def __init__(self, net: "Network", name: str, ip: str, netns: str, port: str) -> None:
        self.net, self.name, self.ip, self.netns, self._port = net, name, ip, netns, port
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.ip})"

    def popen(self, argv: list[str], *, log: Path, cwd: Path | str = TESTS, env: dict | None = None,
              stdin=subprocess.DEVNULL) -> subprocess.Popen:
        """Start ``argv`` on this host (stdout and stderr into ``log``); the network stops it at teardown."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], cwd=cwd,
                                    env={**os.environ, **(env or {})}, stdin=stdin, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        proc.log = log
        self.net.procs.append(proc)
        return proc

    def call(self, fn: Callable, *args, timeout: float = 60.0, **kw):
        """Run ``fn(*args, **kw)`` on this host: in a thread of the test process inside its namespace."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"host-{self.name}", initializer=_enter_netns,
                initargs=(f"/var/run/netns/{self.netns}",))
        return self._thread.submit(fn, *args, **kw).result(timeout)

    def cut(self) -> None:
        """Pull this host's cable: the switch's end of its link goes down."""
        _ip("-n", self.net.switch, "link", "set", self._port, "down")

    def restore(self) -> None:
        """Plug the cable back in."""
        _ip("-n", self.net.switch, "link", "set", self._port, "up")

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
            self._thread = None


class Network:
    """A switch namespace with a bridge, and hosts joined to it; :meth:`close` undoes everything."""

    def __init__(self) -> None:
        remove_stale_namespaces()
        self.run = f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}"
        self.subnet = f"10.{random.randint(16, 254)}.{random.randint(0, 255)}"
        self.switch = f"{self.run}-sw"
        self.hosts: dict[str, Host] = {}
        self.procs: list[subprocess.Popen] = []
        self.namespaces: list[str] = []
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self.namespaces.append(name)

    def add_host(self, name: str) -> Host:
        """A new namespace with address ``10.x.y.N/24`` on the switch, loopback up."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        n = len(self.hosts) + 2  # .1 stays free (no router)
        netns, port = f"{self.run}-{name}", f"p{n}"
        self._add_netns(netns)
        # Both ends are made inside the namespaces: the root namespace never sees them.
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", netns, "addr", "add", f"{self.subnet}.{n}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        host = self.hosts[name] = Host(self, name, f"{self.subnet}.{n}", netns, port)
        return host

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def stop(self, proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``, through the process's own handle; its return code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # (a test may have paused it)
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        return proc.returncode

    def logs(self, tail: int = 1500) -> str:
        """The end of every process's log, for a failure's message."""
        parts = []
        for proc in self.procs:
            text = proc.log.read_text(errors="replace")[-tail:] if proc.log.exists() else ""
            state = "running" if proc.poll() is None else f"exited {proc.returncode}"
            parts.append(f"--- {' '.join(proc.args[4:7])} ({state}), {proc.log}:\n{text}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()

    def close(self) -> None:
        try:
            self.stop_all()
        finally:
            for host in self.hosts.values():
                host.close()
            for ns in reversed(self.namespaces):  # a namespace's veth ends go with it
                _ip("netns", "del", ns, check=False)
            self.namespaces.clear()


@pytest.fixture(scope="module")
def network():
    """One :class:`Network` per test module; skipped, with the reason, where namespaces are forbidden."""
    why = namespaces_unavailable()
    if why:
        pytest.skip(why)
    net = Network()
    try:
        yield net
    finally:
        net.close()


# ---------------------------------------------------------------- what runs on the hosts
class RedisOnHost:
    """redis-server bound to its host's address, with a generated password."""

    def __init__(self, host: Host, folder: Path, port: int = 6379) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (scripts/test.sh installs it)")
        folder.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, port
        self.password = secrets.token_hex(16)
        self.url = f"redis://:{self.password}@{host.ip}:{port}/0"
        conf = folder / "redis.conf"  # the password in a file, not on a command line others can read
        conf.write_text(f"bind {host.ip}\nport {port}\nrequirepass {self.password}\nsave \"\"\n"
                        f"appendonly no\ndir {folder}\n")
        os.chmod(conf, 0o600)
        self.proc = host.popen([exe, str(conf)], log=folder / "redis.log")
        wait_for(self._ping, f"redis-server on {host}", timeout=15)

    def _ping(self) -> bool:
        import redis

        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited ({self.proc.returncode}): {self.proc.log.read_text()[-2000:]}")

        def ping():
            try:
                return redis.Redis(host=self.host.ip, port=self.port, password=self.password,
                                   socket_timeout=2, socket_connect_timeout=2).ping()
            except redis.RedisError:
                return False

        return self.host.call(ping)


PORTS = {"query_port": 1339, "rest_port": 1337, "admin_port": 1338, "metrics_port": 1390, "rpc_port": 7000}


class FrontendOnHost:
    """A real ``python -m clipper start`` on a host: queries, REST and container RPC on the host's address
    (the admin API and metrics on its loopback, reached through :meth:`admin`).

    Each host has a port space of its own, so every frontend takes the default ports. Its files live in
    ``folder`` (config, ``clipper-secrets/``, log, ready file); ``server_key_from`` copies another
    frontend's container RPC key pair in first (frontends of one system share it)."""

    def __init__(self, host: Host, folder: Path, state: str, *, server_key_from: "FrontendOnHost | None" = None,
                 **frontend) -> None:
        self.host, self.folder = host, folder
        folder.mkdir(parents=True, exist_ok=True)
        settings = {"host": host.ip, "rpc_host": host.ip, "state_path": state, **PORTS,
                    "heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 1000, "batch_timeout_ms": 3000,
                    "drain_timeout_ms": 1000, **frontend}
        lines = ["[frontend]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
        self.config = folder / "clipper.toml"
        self.config.write_text("\n".join(lines) + "\n")
        os.chmod(self.config, 0o600)  # it names the Redis password
        self.secrets = folder / "clipper-secrets"  # base_dir (the config's folder) with a Redis store
        if server_key_from is not None:
            self.secrets.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.secrets, 0o700)
            for name in ("rpc-server.key", "rpc-server.key_secret"):
                target = self.secrets / name
                shutil.copyfile(server_key_from.secrets / name, target)
                os.chmod(target, 0o600)
        self.ready_file = folder / "ready.json"
        self.ready_file.unlink(missing_ok=True)
        run_dir = folder / "run"  # its own: every frontend here has admin port 1338
        run_dir.mkdir(mode=0o700, exist_ok=True)
        self.proc = host.popen([PYTHON, "-m", "clipper", "start", "--config", str(self.config), "--ready-file",
                                str(self.ready_file)], cwd=folder, log=folder / "frontend.log",
                               env={"CLIPPER_RUNTIME_DIR": str(run_dir)})
        self.ports = wait_for(self._ready, f"frontend on {host} to be ready", timeout=30, every=0.05,
                              detail=self.log)
        self.query_port, self.rpc_port = self.ports["query_port"], self.ports["rpc_port"]
        self.rpc = f"tcp://{host.ip}:{self.rpc_port}"

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"frontend on {self.host} exited ({self.proc.returncode}): {self.log()}")
        if self.ready_file.exists():
            return json.loads(self.ready_file.read_text())
        return None

    def log(self) -> str:
        return self.proc.log.read_text(errors="replace")[-4000:]

    def admin(self, fn: Callable, timeout: float = 60.0):
        """``fn(AdminClient)`` on the frontend's host, over its loopback, with its token."""
        from clipper.management.admin_client import AdminClient

        token = (self.secrets / "admin-token").read_text().strip()
        return self.host.call(lambda: fn(AdminClient("127.0.0.1", self.ports["admin_port"], timeout=timeout,
                                                     token=token, tls=False)), timeout=timeout + 5)

    def status(self) -> dict:
        return self.admin(lambda a: a.status())

    def replicas(self, model_key: str) -> list[dict]:
        """The connected replicas of ``model_key`` (``name:version``): peer address, batches done, ..."""
        return [r for r in self.status()["replicas"] if r["model"] == model_key]

    def stop(self) -> int | None:
        return self.host.net.stop(self.proc)


class ContainerOnHost:
    """``python -m clipper.container tests/model_zoo.py:FN`` on a host, with operator credentials."""

    def __init__(self, host: Host, folder: Path, fn: str, name: str, version: str, credentials: Path,
                 frontends: list[str] | None = None, env: dict | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        argv = [PYTHON, "-m", "clipper.container", f"model_zoo.py:{fn}", "--name", name, "--version", version,
                "--credentials", str(credentials)]
        for f in frontends or []:
            argv += ["--frontend", f]
        self.host = host
        self.proc = host.popen(argv, cwd=TESTS, env=env, log=folder / f"container-{host.name}-{len(host.net.procs)}.log")

    def log(self) -> str:
        return self.proc.log.read_text(errors="replace")[-4000:]

    def stop(self) -> int | None:
        return self.host.net.stop(self.proc)
