"""The frontend's side of the container RPC: one ZeroMQ ROUTER socket.

Containers connect (DEALER), introduce themselves with C_HELLO and become
:class:`Replica` objects of their model version's queue. Batches go out as a
header frame plus one payload frame sent with ``copy=False``: the payload is a
fresh buffer per batch, never reused, so ZeroMQ may read it for as long as it
needs (it holds a reference until sent). Results come back the same way and
are viewed with ``np.frombuffer`` on the received frame.

Liveness: heartbeats both ways every ``heartbeat_interval_ms``; a container
silent for ``heartbeat_timeout_ms``, holding a batch longer than
``batch_timeout_ms``, or whose process the manager saw exit, is dropped, and
its batch in flight is retried on another replica or failed.

The socket is driven by the event loop: ``add_reader`` on ZeroMQ's
edge-triggered FD, drained until ``EVENTS`` has no POLLIN, and re-checked
after every send (a send can consume the edge).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Callable

import msgpack
import numpy as np
import zmq

from .._native import framing
from ..errors import ClipperError, InternalError, ModelError, WrongOutputCountError, error_for_code
from ..protocol import wire
from . import messages as m

log = logging.getLogger("clipper.rpc")

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NOBLOCK = int(zmq.NOBLOCK)

__all__ = ["Replica", "ContainerServer"]


class Replica:
    """One connected model container."""

    __slots__ = ("ident", "replica_id", "key", "pid", "queue", "batch", "sizer", "dead",
                 "last_seen_ns", "connected_ns", "batches_done")

    def __init__(self, ident: bytes, replica_id: int, key: str, pid: int | None, queue):
        self.ident = ident
        self.replica_id = replica_id
        self.key = key
        self.pid = pid
        self.queue = queue
        self.batch = None  # the batch in flight, if any
        self.sizer = None  # its batch-size controller, set by the queue
        self.dead = False
        self.last_seen_ns = self.connected_ns = time.monotonic_ns()
        self.batches_done = 0

    def __repr__(self) -> str:
        return f"<Replica {self.replica_id} {self.key} pid={self.pid}>"


class ContainerServer:
    """Accepts model containers and carries batches to them."""

    def __init__(self, loop, address: str, resolve: Callable, *, heartbeat_interval_ms: int,
                 heartbeat_timeout_ms: int, batch_timeout_ms: int) -> None:
        self.loop = loop
        self.address = address
        self._resolve = resolve  # (model, version, info) -> ModelQueue; raises ClipperError to reject
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.heartbeat_timeout_ns = heartbeat_timeout_ms * 1_000_000
        self.batch_timeout_ns = batch_timeout_ms * 1_000_000
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.replicas: dict[bytes, Replica] = {}
        self._next_replica_id = 1
        self._check_scheduled = False
        self._hb_timer: asyncio.TimerHandle | None = None
        self._waiters: list[tuple[str, int, asyncio.Future]] = []
        self._unpack = wire.make_unpacker()
        self.on_replica_change: Callable | None = None
        self.endpoint = None
        self.rejected = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> str:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        addr = self.address
        if addr.endswith(":0"):
            addr = addr[:-2] + ":*"
        sock.bind(addr)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.sock = sock
        self.loop.add_reader(sock.getsockopt(zmq.FD), self._on_readable)
        self._schedule_check()
        return self.endpoint

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def close(self) -> None:
        if self._hb_timer is not None:
            self._hb_timer.cancel()
            self._hb_timer = None
        for replica in list(self.replicas.values()):
            self._drop(replica, "was disconnected because the frontend stopped")
        if self.sock is not None:
            try:
                self.loop.remove_reader(self.sock.getsockopt(zmq.FD))
            except Exception:
                pass
            self.sock.close(linger=0)
            self.sock = None
        self.ctx.term()
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.cancel()

    # ------------------------------------------------------------ socket I/O
    def _schedule_check(self) -> None:
        if not self._check_scheduled:
            self._check_scheduled = True
            self.loop.call_soon(self._on_readable)

    def _on_readable(self) -> None:
        self._check_scheduled = False
        sock = self.sock
        if sock is None:
            return
        # Ask EVENTS before each receive instead of catching zmq.Again: an
        # exception per wake-up costs more than the whole message handling.
        for _ in range(10_000):
            try:
                if not sock.getsockopt(_EVENTS) & _POLLIN:
                    return
                frames = sock.recv_multipart(_NOBLOCK, copy=False)
            except zmq.ZMQError:
                return
            try:
                self._handle(frames)
            except Exception:  # one bad message never stops the socket
                log.exception("dropping a malformed container message")
        self._schedule_check()  # more to read: yield to other work, come back soon

    def _send(self, ident: bytes, frames: list) -> None:
        self.sock.send_multipart([ident, *frames], copy=False)
        self._schedule_check()

    def _send_header(self, ident: bytes, header: list) -> None:
        try:
            self._send(ident, [msgpack.packb(header)])
        except zmq.ZMQError:
            pass

    # ------------------------------------------------------------ messages
    def _handle(self, frames) -> None:
        ident = frames[0].bytes
        header = msgpack.unpackb(frames[1].bytes)
        kind = header[0]
        replica = self.replicas.get(ident)
        if replica is not None:
            replica.last_seen_ns = time.monotonic_ns()
        if kind == m.C_RESULT:
            if replica is None:
                return self._send_header(ident, [m.F_REHELLO])
            self._on_result(replica, header, frames[2] if len(frames) > 2 else None)
        elif kind == m.C_ERROR:
            if replica is not None:
                self._on_error(replica, header)
        elif kind == m.C_HEARTBEAT:
            if replica is None:
                self._send_header(ident, [m.F_REHELLO])
        elif kind == m.C_HELLO:
            self._on_hello(ident, header)
        elif kind == m.C_BYE:
            if replica is not None:
                self._drop(replica, "shut down")

    def _on_hello(self, ident: bytes, header: list) -> None:
        old = self.replicas.get(ident)
        if old is not None:
            self._drop(old, "reconnected")
        try:
            version, info = header[1], header[2]
            if version != m.RPC_VERSION:
                raise ClipperError(f"container RPC version {version} is not supported; this frontend speaks {m.RPC_VERSION}")
            queue, mv = self._resolve(str(info.get("model")), str(info.get("version")))
            dtype, shape = info.get("input_dtype"), info.get("input_shape")
            if dtype is not None and dtype != mv.input_dtype:
                raise ClipperError(f"container expects input dtype {dtype!r}; model {mv.key} is deployed with {mv.input_dtype!r}")
            if shape is not None and tuple(shape) != tuple(mv.input_shape):
                raise ClipperError(f"container expects input shape {list(shape)}; model {mv.key} is deployed with {list(mv.input_shape)}")
        except ClipperError as exc:
            self.rejected += 1
            log.warning("rejecting a container: %s", exc.message)
            return self._send_header(ident, [m.F_REJECT, exc.message])
        replica = Replica(ident, self._next_replica_id, mv.key, info.get("pid"), queue)
        self._next_replica_id += 1
        self.replicas[ident] = replica
        self._send_header(ident, [m.F_WELCOME, replica.replica_id, {
            "heartbeat_interval_ms": self.heartbeat_interval_ms,
            "heartbeat_timeout_ms": self.heartbeat_timeout_ns // 1_000_000}])
        queue.add_replica(replica)
        log.info("replica %s connected", replica)
        self._arm_heartbeat()
        self._notify_waiters()
        if self.on_replica_change:
            self.on_replica_change()

    def _on_result(self, replica: Replica, header: list, payload) -> None:
        _, batch_id, count, encoding, meta = header
        batch = replica.batch
        if batch is None or batch.batch_id != batch_id:
            return  # a late answer for a batch already retried elsewhere
        queries = batch.queries
        try:
            if count != len(queries):
                raise WrongOutputCountError(
                    f"model {replica.key} returned {count} outputs for a batch of {len(queries)} inputs")
            if encoding == m.ENC_NDARRAY:
                typestr, shape = meta
                arr = np.frombuffer(payload.buffer if payload is not None else b"", dtype=wire.ALLOWED_DTYPES[typestr])
                arr = arr.reshape(shape)
                outputs = arr.tolist() if arr.ndim == 1 else list(arr)
            else:
                outputs = self._unpack(payload.buffer)
                if not isinstance(outputs, list) or len(outputs) != len(queries):
                    raise WrongOutputCountError(f"model {replica.key} returned a malformed output block")
        except ClipperError as exc:
            return self._fail_batch(replica, batch, exc)
        except Exception as exc:
            return self._fail_batch(replica, batch, InternalError(f"cannot decode the outputs of {replica.key}: {exc}"))
        replica.batches_done += 1
        replica.queue.deliver(replica, batch, outputs)

    def _on_error(self, replica: Replica, header: list) -> None:
        _, batch_id, code, message = header
        batch = replica.batch
        if batch is None or batch.batch_id != batch_id:
            return
        exc = error_for_code(int(code), f"model {replica.key}: {message}")
        if not isinstance(exc, ModelError):
            exc = ModelError(f"model {replica.key}: {message}")
        self._fail_batch(replica, batch, exc)

    def _fail_batch(self, replica: Replica, batch, exc: ClipperError) -> None:
        replica.queue.fail_batch(replica, batch, exc)

    # ------------------------------------------------------------ batches
    def send_batch(self, replica: Replica, batch) -> None:
        """Send ``batch`` to ``replica`` (the ModelQueue's transport)."""
        queries = batch.queries
        first = queries[0].input
        n = len(queries)
        inputs = [q.input for q in queries]
        if isinstance(first, np.ndarray):
            payload = framing.assemble_batch(inputs, first.nbytes)
            meta = [wire._TYPESTR[first.dtype].decode(), [n, *first.shape]]
            header = msgpack.packb([m.F_BATCH, batch.batch_id, n, m.ENC_NDARRAY, meta])
        elif type(first) is bytes or type(first) is str:  # an application's inputs are all one kind
            payload = framing.assemble_varlen(inputs)
            header = msgpack.packb([m.F_BATCH, batch.batch_id, n, m.ENC_VARLEN,
                                    ["bytes" if type(first) is bytes else "str"]])
        else:
            payload = wire.pack(inputs)
            header = msgpack.packb([m.F_BATCH, batch.batch_id, n, m.ENC_MSGPACK, None])
        self._send(replica.ident, [header, payload])

    # ------------------------------------------------------------ liveness
    def _arm_heartbeat(self) -> None:
        if self._hb_timer is None and self.replicas:
            self._hb_timer = self.loop.call_later(self.heartbeat_interval_ms / 1000, self._heartbeat)

    def _heartbeat(self) -> None:
        self._hb_timer = None
        now = time.monotonic_ns()
        beat = msgpack.packb([m.F_HEARTBEAT])
        for replica in list(self.replicas.values()):
            if now - replica.last_seen_ns > self.heartbeat_timeout_ns:
                self._drop(replica, f"went silent for over {self.heartbeat_timeout_ns // 1_000_000} ms")
                continue
            batch = replica.batch
            if batch is not None and now - batch.sent_ns > self.batch_timeout_ns:
                self._send_header(replica.ident, [m.F_REJECT, "batch timeout: the frontend dropped this replica"])
                self._drop(replica, f"held a batch for over {self.batch_timeout_ns // 1_000_000} ms")
                if replica.pid and self.kill_hung:
                    try:
                        os.kill(replica.pid, 9)
                    except OSError:
                        pass
                continue
            try:
                self._send(replica.ident, [beat])
            except zmq.ZMQError:
                self._drop(replica, "became unreachable")
        self._arm_heartbeat()

    kill_hung = True  # a replica dropped for a batch timeout is killed (its manager restarts it)

    def _drop(self, replica: Replica, reason: str) -> None:
        if self.replicas.get(replica.ident) is not replica:
            return
        del self.replicas[replica.ident]
        replica.dead = True
        log.warning("replica %s %s", replica, reason)
        replica.queue.remove_replica(replica, reason)
        if self.on_replica_change:
            self.on_replica_change()

    def process_exited(self, pid: int, returncode) -> None:
        """A manager saw container process ``pid`` exit."""
        for replica in list(self.replicas.values()):
            if replica.pid == pid:
                self._drop(replica, f"exited (return code {returncode})")

    def drop_model(self, key: str, reason: str) -> None:
        for replica in list(self.replicas.values()):
            if replica.key == key:
                self._send_header(replica.ident, [m.F_REJECT, reason])
                self._drop(replica, reason)

    # ------------------------------------------------------------ readiness
    def count(self, key: str) -> int:
        return sum(1 for r in self.replicas.values() if r.key == key)

    def wait_for_replicas(self, key: str, n: int) -> asyncio.Future:
        fut = self.loop.create_future()
        self._waiters.append((key, n, fut))
        self._notify_waiters()
        return fut

    def _notify_waiters(self) -> None:
        keep = []
        for key, n, fut in self._waiters:
            if fut.done():
                continue
            if self.count(key) >= n:
                fut.set_result(None)
            else:
                keep.append((key, n, fut))
        self._waiters = keep

    def stats(self) -> list[dict]:
        now = time.monotonic_ns()
        return [{
            "replica_id": r.replica_id,
            "model": r.key,
            "pid": r.pid,
            "busy": r.batch is not None,
            "max_batch": r.sizer.current if r.sizer is not None else None,
            "batches_done": r.batches_done,
            "connected_s": round((now - r.connected_ns) / 1e9, 3),
        } for r in self.replicas.values()]
