"""The local-process container manager: model containers as child processes.

It starts each replica with ``python -m clipper.container``, watches it, and
restarts it with exponential backoff when it exits. Stopping the manager
stops every child (SIGTERM, then SIGKILL after a grace period); children also
ask the kernel to kill them if the frontend dies (``--die-with-parent``).

Each process it starts gets credentials of its own, issued for its model
version just before the start and revoked when the process exits (in the
environment variable ``CLIPPER_CREDENTIALS``, which the container SDK reads
and removes). The frontend thus knows which process a replica is without
believing any pid a container claims, and the manager signals only processes
it started, through the handles it holds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..security.container_keys import ContainerCredentials
from .registry import ModelVersion

log = logging.getLogger("clipper.manager")

__all__ = ["LocalProcessManager"]


@dataclass
class _Slot:
    """One replica position of a model: the process filling it now, and its history."""

    mv: ModelVersion
    index: int
    proc: asyncio.subprocess.Process | None = None
    task: asyncio.Task | None = None
    restarts: int = 0
    last_exit: int | None = None
    last_start: float = 0.0
    stopping: bool = False
    grant: object = None  # the credentials of the process running now
    history: list = field(default_factory=list)
    stderr_tail: list = field(default_factory=list)  # the last lines the container wrote to stderr


class LocalProcessManager:
    def __init__(self, loop, rpc_address: str, on_exit, *, keyring, mechanism: str = "curve",
                 base_dir: Path | None = None, backoff_ms: tuple[int, int] = (100, 5000), peers=(),
                 runs: bool = True) -> None:
        self.loop = loop
        self.rpc_address = rpc_address  # where children connect (a Unix socket or TCP)
        # A --workers group: the leader's children serve the other workers too (their RPC addresses), and
        # a member's manager runs no container (the leader's serve it).
        self.peers = list(peers)
        self.runs = runs
        self.keyring = keyring
        self.mechanism = mechanism  # how children prove their credentials: "plain", "curve" or "none"
        self._on_exit = on_exit  # (grant, returncode) -> None
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.backoff_ms = backoff_ms
        self.slots: dict[str, list[_Slot]] = {}
        self.on_failure: Callable[[str, int, str], None] | None = None  # (model key, return code, stderr tail)

    def argv(self, mv: ModelVersion) -> list[str]:
        if mv.command:
            return list(mv.command)
        assert mv.entry is not None  # (manages(): an entry or a command)
        return [sys.executable, "-m", "clipper.container", mv.entry, "--name", mv.name, "--version", mv.version,
                "--frontend", ",".join([self.rpc_address, *self.peers]), "--die-with-parent",
                "--input-dtype", mv.input_dtype,
                *([f"--input-shape={','.join(str(d) for d in mv.input_shape)}"] if mv.input_shape else [])]

    def manages(self, mv: ModelVersion) -> bool:
        return self.runs and bool(mv.entry or mv.command)

    async def ensure(self, mv: ModelVersion) -> None:
        """Run exactly ``mv.replicas`` containers for ``mv``."""
        if not self.manages(mv):
            return
        slots = self.slots.setdefault(mv.key, [])
        while len(slots) < mv.replicas:
            slot = _Slot(mv, len(slots))
            slots.append(slot)
            slot.task = self.loop.create_task(self._run(slot))
        while len(slots) > mv.replicas:
            await self._stop_slot(slots.pop())

    async def remove(self, key: str) -> None:
        for slot in self.slots.pop(key, []):
            await self._stop_slot(slot)

    async def close(self) -> None:
        await asyncio.gather(*(self.remove(key) for key in list(self.slots)))

    async def _run(self, slot: _Slot) -> None:
        mv = slot.mv
        delay_ms = self.backoff_ms[0]
        # Credentials of the frontend's own (its admin token, credentials it was itself given) stay with it.
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLIPPER_CREDENTIALS", "CLIPPER_ADMIN_TOKEN"))}
        env.update({k: v for k, v in mv.env.items() if not k.startswith("CLIPPER_CREDENTIALS")})
        env["CLIPPER_FRONTEND"] = ",".join([self.rpc_address, *self.peers])
        cwd = Path(mv.workdir) if mv.workdir else self.base_dir
        while not slot.stopping:
            slot.last_start = time.monotonic()
            grant, secret = self.keyring.issue(mv.name, mv.version, origin="manager", mechanism=self.mechanism,
                                               label=f"local replica {slot.index} of {mv.key}")
            slot.grant = grant
            env["CLIPPER_CREDENTIALS"] = json.dumps(ContainerCredentials.document(
                grant, secret, self.keyring.public_key, self.rpc_address))
            try:
                slot.proc = await asyncio.create_subprocess_exec(*self.argv(mv), cwd=str(cwd), env=env,
                                                                 stderr=asyncio.subprocess.PIPE,
                                                                 start_new_session=True)
            except OSError as exc:
                log.error("cannot start a container for %s: %s", mv.key, exc)
                slot.proc = None
                slot.stderr_tail = [f"cannot start: {exc}"]
                rc = None
                self._on_exit(grant, rc)
            except BaseException:  # cancelled while starting: the credentials go with the attempt
                self._on_exit(grant, None)
                raise
            else:
                grant.pid = slot.proc.pid
                log.info("started container for %s (pid %d)", mv.key, slot.proc.pid)
                slot.stderr_tail = []
                try:
                    await self._pump_stderr(slot, slot.proc)
                    rc = await slot.proc.wait()
                finally:
                    self._on_exit(grant, slot.proc.returncode)
            slot.last_exit = rc
            if self.on_failure is not None and rc not in (0, None) and not slot.stopping:
                self.on_failure(mv.key, rc, "\n".join(slot.stderr_tail[-5:]))
            slot.history = (slot.history + [rc])[-10:]
            if slot.stopping:
                break
            slot.restarts += 1
            if time.monotonic() - slot.last_start > 30:
                delay_ms = self.backoff_ms[0]  # it ran a good while: not a crash loop
            log.warning("container for %s exited with %s; restarting in %d ms", mv.key, rc, delay_ms)
            await asyncio.sleep(delay_ms / 1000)
            delay_ms = min(delay_ms * 2, self.backoff_ms[1])

    async def _pump_stderr(self, slot: _Slot, proc) -> None:
        """Pass the container's stderr through, prefixed, and keep its tail."""
        prefix = f"[{slot.mv.key} pid {proc.pid}] ".encode()
        out = sys.stderr.buffer
        while True:
            line = await proc.stderr.readline()
            if not line:
                return
            slot.stderr_tail = (slot.stderr_tail + [line.decode("utf-8", "replace").rstrip()])[-20:]
            try:
                out.write(prefix + line)
                out.flush()
            except (OSError, ValueError):
                pass

    async def _stop_slot(self, slot: _Slot, grace_s: float = 5.0) -> None:
        slot.stopping = True
        proc = slot.proc
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except asyncio.TimeoutError:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
        if slot.task is not None:
            slot.task.cancel()
            try:
                await slot.task
            except (asyncio.CancelledError, Exception):
                pass

    def kill(self, grant) -> bool:
        """SIGKILL the process started with ``grant`` (and its process group), if it still runs.

        Only through this manager's own handle: a process it did not start, or
        one that has exited (its pid may belong to someone else by now), is
        never signalled. The restart loop then starts a fresh one.
        """
        for slots in self.slots.values():
            for slot in slots:
                proc = slot.proc
                if slot.grant is grant and proc is not None and proc.returncode is None:
                    log.warning("killing the hung container of %s (pid %d)", slot.mv.key, proc.pid)
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)  # its group: it leads a session of its own
                    except ProcessLookupError:
                        pass
                    return True
        return False

    def pids(self, key: str) -> list[int]:
        return [s.proc.pid for s in self.slots.get(key, []) if s.proc is not None and s.proc.returncode is None]

    def stats(self) -> dict:
        return {key: [{"pid": s.proc.pid if s.proc else None, "restarts": s.restarts, "last_exit": s.last_exit,
                       "stderr_tail": s.stderr_tail[-3:]}
                      for s in slots] for key, slots in self.slots.items()}
