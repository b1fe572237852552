"""The model-container runtime: connects a predict function to a frontend.

A model author writes ``predict(batch) -> outputs`` (or a class with
``predict`` and an optional ``load``) and runs::

    python -m clipper.container mymodule:predict --name digits --version 1

The main thread owns the ZeroMQ socket and runs each batch through
``predict`` inline (no thread hand-off on the hot path). A second thread
sends heartbeats while a long ``predict`` runs, so a container that stops
heartbeating is really gone; a ``predict`` that never returns is caught by the
frontend's batch timeout.

Credentials (docs/security.md): a frontend with ``rpc_security = "curve"``
completes a handshake only with a container that holds credentials issued
for its model (``--credentials FILE``; the local manager hands its children
theirs). Until its first handshake succeeds the runtime watches the socket's
handshake events, so a refused credential ends the process with a message
that says why instead of a silent retry loop.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from ..errors import ModelError, WrongOutputCountError
from ..security.container_keys import ContainerCredentials
from ..protocol import wire
from ..rpc import messages as m

log = logging.getLogger("clipper.container")

__all__ = ["load_predictor", "serve", "ContainerRuntime"]


class LoadError(Exception):
    """The model entry point could not be imported or loaded."""


def _import_entry(entry: str):
    module_part, sep, attr = entry.rpartition(":")
    if not sep or not module_part or not attr:
        raise LoadError(f"entry {entry!r} is not of the form module:function or path/file.py:function")
    if module_part.endswith(".py") or os.sep in module_part:
        path = Path(module_part).resolve()
        if not path.is_file():
            raise LoadError(f"entry file {str(path)!r} does not exist")
        name = f"clipper_model_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        sys.path.insert(0, str(path.parent))
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise LoadError(f"importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            raise LoadError(f"importing module {module_part!r} failed: {type(exc).__name__}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise LoadError(f"{module_part!r} has no attribute {attr!r}") from None
    return obj


def load_predictor(entry_or_obj) -> Callable[[Any], Any]:
    """Turn an entry point into a ``predict(batch)`` callable.

    ``entry_or_obj`` is ``"module:attr"``, ``"path/file.py:attr"``,
    ``"closure:path"`` (a cloudpickle closure file), or the object itself. A class is instantiated with no arguments, its ``load()``
    (if any) is called once, and its ``predict`` method is used; a function
    is used as it is.
    """
    if isinstance(entry_or_obj, str) and entry_or_obj.startswith("closure:"):
        from .closure import load_closure

        obj = load_closure(entry_or_obj[len("closure:"):])
    else:
        obj = _import_entry(entry_or_obj) if isinstance(entry_or_obj, str) else entry_or_obj
    if inspect.isclass(obj):
        try:
            inst = obj()
            if callable(getattr(inst, "load", None)):
                inst.load()
        except Exception as exc:
            raise LoadError(f"loading {obj.__name__} failed: {type(exc).__name__}: {exc}") from exc
        fn = getattr(inst, "predict", None)
        if not callable(fn):
            raise LoadError(f"class {obj.__name__} has no predict(batch) method")
        return fn
    if not callable(obj) and callable(getattr(obj, "predict", None)):
        return obj.predict  # an object (say, an unpickled closure's model) with a predict method
    if not callable(obj):
        raise LoadError(f"{entry_or_obj!r} is neither a function nor a class")
    return obj


def encode_outputs(batch_id: int, outputs, count: int) -> list:
    """Build the C_RESULT message for ``outputs``; raise ModelError subclasses."""
    if isinstance(outputs, np.ndarray):
        if outputs.ndim == 0 or len(outputs) != count:
            n = "a 0-d array" if outputs.ndim == 0 else f"{len(outputs)} outputs"
            raise WrongOutputCountError(f"predict returned {n} for a batch of {count} inputs")
        ts = wire._TYPESTR.get(outputs.dtype)
        if ts is not None:
            arr = np.ascontiguousarray(outputs)
            header = msgpack.packb([m.C_RESULT, batch_id, count, m.ENC_NDARRAY, [ts.decode(), list(arr.shape)]])
            return [header, memoryview(arr.reshape(-1).view(np.uint8)) if arr.size else b""]
        outputs = outputs.tolist()
    if isinstance(outputs, (str, bytes)) or not hasattr(outputs, "__len__"):
        raise ModelError(
            f"predict returned {type(outputs).__name__}; expected a list or array of {count} outputs"
        )
    if len(outputs) != count:
        raise WrongOutputCountError(f"predict returned {len(outputs)} outputs for a batch of {count} inputs")
    try:
        payload = wire.pack(list(outputs))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ModelError(f"an output cannot be sent: {exc}; outputs may be numbers, str, bytes, numpy arrays, "
                         "and lists or dicts of those") from None
    return [msgpack.packb([m.C_RESULT, batch_id, count, m.ENC_MSGPACK, None]), payload]


def decode_batch(count: int, encoding: str, meta, payload) -> Any:
    if encoding == m.ENC_NDARRAY:
        typestr, shape = meta
        arr = np.frombuffer(payload, dtype=wire.ALLOWED_DTYPES[typestr])
        return arr.reshape(shape)
    if encoding == m.ENC_VARLEN:
        return split_varlen(payload, count, meta[0] == "str")
    return wire.make_unpacker()(payload)


def split_varlen(payload, count: int, as_str: bool) -> list:
    """The items of a ``"vl"`` batch: ``count + 1`` uint64 offsets, then the data."""
    head = (count + 1) * 8
    offsets = np.frombuffer(payload, dtype="<u8", count=count + 1).tolist()
    data = memoryview(payload)[head:]
    if len(data) != offsets[-1]:
        raise ValueError(f"a variable-size batch of {count} items declares {offsets[-1]} bytes of data "
                         f"and carries {len(data)}")
    if as_str:
        return [str(data[a:b], "utf-8") for a, b in zip(offsets, offsets[1:])]
    return [bytes(data[a:b]) for a, b in zip(offsets, offsets[1:])]


class ContainerRuntime:
    """One model replica connected to one frontend."""

    def __init__(
        self,
        predict: Callable,
        name: str,
        version: str,
        frontend: str = "tcp://127.0.0.1:7000",
        input_dtype: str | None = None,
        input_shape: list[int] | None = None,
        exit_on_frontend_loss: bool = False,
        credentials: ContainerCredentials | None = None,
    ) -> None:
        self.predict = predict
        self.credentials = credentials
        self._monitor = None  # handshake events, until the first handshake succeeds
        self._poller = None
        self._handshake_failures = 0
        self.name = name
        self.version = str(version)
        self.frontend = frontend
        self.input_dtype = input_dtype
        self.input_shape = input_shape
        self.exit_on_frontend_loss = exit_on_frontend_loss
        self.heartbeat_interval = 1.0
        self.heartbeat_timeout = 5.0
        self.ctx = zmq.Context.instance()
        self._sock = None
        self._sock_lock = threading.Lock()
        self._busy = False
        self._holding = False
        self._beater_thread = None
        self._stop = threading.Event()
        self.replica_id = None
        self.batches_done = 0

    # ---------------------------------------------------------------- batches
    def _run_batch(self, header: list, frames) -> list:
        """Run one batch through ``predict``; return the reply frames."""
        _, batch_id, count, encoding, meta = header
        try:
            frame = frames[1]
            batch = decode_batch(count, encoding, meta, frame.buffer if hasattr(frame, "buffer") else frame)
            self._busy = True  # the beater may use the socket until _busy is False again
            try:
                outputs = self.predict(batch)
            finally:
                self._busy = False
            return encode_outputs(batch_id, outputs, count)
        except ModelError as exc:
            return [msgpack.packb([m.C_ERROR, batch_id, exc.code, exc.message])]
        except Exception as exc:
            text = f"{type(exc).__name__}: {exc}"
            log.warning("predict raised on batch %d: %s", batch_id, text)
            return [msgpack.packb([m.C_ERROR, batch_id, ModelError.code, text])]

    def _beater(self) -> None:
        """Heartbeats while ``predict`` runs (the main thread beats when idle).

        The main thread holds ``_sock_lock`` whenever it touches the socket and
        sets ``_busy`` only around ``predict``, when it does not; so this thread
        uses the socket only while the main thread provably does not (the lock
        is the memory barrier ZeroMQ asks for when a socket changes threads).
        """
        beat = msgpack.packb([m.C_HEARTBEAT])
        while not self._stop.wait(self.heartbeat_interval):
            if not self._busy:
                continue
            with self._sock_lock:
                if self._busy and self._sock is not None:
                    try:
                        self._sock.send(beat, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass

    # ----------------------------------------------------------------- main
    MAX_HANDSHAKE_FAILURES = 5  # handshakes failing without detail in a row before the container gives up
    _HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                         | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def _connect(self):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.credentials is not None:
            self.credentials.apply(sock)
        self._monitor = sock.get_monitor_socket(self._HANDSHAKE_EVENTS)
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        sock.connect(self.frontend)
        info = {"model": self.name, "version": self.version, "pid": os.getpid(), "sdk": "clipper-container/0.1"}
        if self.credentials is not None:
            info["credential_id"] = self.credentials.id
        if self.input_dtype is not None:
            info["input_dtype"] = self.input_dtype
        if self.input_shape is not None:
            info["input_shape"] = list(self.input_shape)
        sock.send(msgpack.packb([m.C_HELLO, m.RPC_VERSION, info]))
        return sock

    def _reconnect(self) -> None:
        self._stop_monitor()
        self._sock.close(linger=0)
        self._sock = self._connect()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = self._poller = None

    def _handshake_event(self) -> int | None:
        """Read one handshake event; an exit code if the frontend refused this container."""
        from zmq.utils.monitor import recv_monitor_message

        event = recv_monitor_message(self._monitor)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._stop_monitor()  # from here on, only the frontend's own messages matter
            self._handshake_failures = 0
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = ("refused this container's credentials (revoked, or never issued by it)"
                   if self.credentials is not None else "refused this container")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and self.credentials is None:
            why = ("requires credentials: start the container with --credentials FILE "
                   "(made by `clipper container-credentials MODEL [VERSION]`)")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            why = "does not speak the security mechanism of these credentials (is its rpc_security \"none\"?)"
        else:
            # No detail: the frontend's key is not the one in the credentials (another frontend, or its
            # secrets folder was made anew), or the connection dropped mid-handshake (a restart). ZeroMQ
            # tries again by itself; only a failure that keeps coming ends the container.
            self._handshake_failures += 1
            if self._handshake_failures < self.MAX_HANDSHAKE_FAILURES and not self.exit_on_frontend_loss:
                log.warning("the handshake with %s failed (%d in a row); retrying", self.frontend,
                            self._handshake_failures)
                return None
            why = (f"failed the handshake {self._handshake_failures} times: its key is not the one these credentials "
                   "name (credentials of another frontend, or its secrets folder was made anew)"
                   if self.credentials is not None else
                   f"failed the handshake {self._handshake_failures} times")
        print(f"clipper container {self.name}:{self.version}: the frontend at {self.frontend} {why}",
              file=sys.stderr, flush=True)
        return m.EXIT_REJECTED

    def run(self) -> int:
        """Serve until stopped, rejected, or (optionally) the frontend is lost. Returns an exit code.

        Batches run inline on this thread, between socket operations: no
        hand-off to another thread on the hot path. A daemon thread keeps the
        heartbeat going while a long ``predict`` runs.
        """
        self._sock_lock.acquire()
        self._holding = True
        try:
            self._sock = self._connect()
            return self._serve()
        finally:
            if self._sock is not None:
                self._stop_monitor()
            sock, self._sock = self._sock, None
            if sock is not None:
                try:
                    sock.send(msgpack.packb([m.C_BYE]), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
                sock.close(linger=100)
            self._stop.set()
            if self._holding:
                self._holding = False
                self._sock_lock.release()

    def _serve(self) -> int:
        # Runs with _sock_lock held, letting go of it only around a batch.
        lock = self._sock_lock
        last_heard = time.monotonic()
        next_beat = last_heard + self.heartbeat_interval
        while not self._stop.is_set():
            sock = self._sock
            timeout_ms = max(0, int((next_beat - time.monotonic()) * 1000)) + 1
            if self._poller is not None:  # still waiting for the first handshake
                ready = dict(self._poller.poll(timeout_ms))
                if self._monitor in ready:
                    rc = self._handshake_event()
                    if rc is not None:
                        return rc
                ready = sock in ready
            else:
                ready = sock.poll(timeout_ms, zmq.POLLIN)
            if ready:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                header = msgpack.unpackb(frames[0].bytes)
                kind = header[0]
                if kind == m.F_BATCH:
                    self._holding = False
                    lock.release()
                    try:
                        reply = self._run_batch(header, frames)
                    finally:
                        lock.acquire()
                        self._holding = True
                    sock.send_multipart(reply, copy=False)
                    self.batches_done += 1
                elif kind == m.F_WELCOME:
                    self.replica_id = header[1]
                    opts = header[2]
                    self.heartbeat_interval = opts.get("heartbeat_interval_ms", 1000) / 1000
                    self.heartbeat_timeout = opts.get("heartbeat_timeout_ms", 5000) / 1000
                    log.info("connected to %s as replica %s", self.frontend, self.replica_id)
                    if self._beater_thread is None:  # beats at the interval the frontend asked for
                        self._beater_thread = threading.Thread(
                            target=self._beater, name="clipper-heartbeat", daemon=True)
                        self._beater_thread.start()
                elif kind == m.F_REJECT:
                    print(f"clipper container {self.name}:{self.version}: frontend rejected it: {header[1]}",
                          file=sys.stderr, flush=True)
                    return m.EXIT_REJECTED
                elif kind == m.F_REHELLO:
                    self._reconnect()
                # F_HEARTBEAT: hearing anything is all that counts.
                now = last_heard = time.monotonic()
                if now < next_beat:
                    continue
            else:
                now = time.monotonic()
            if now >= next_beat:
                self._sock.send(msgpack.packb([m.C_HEARTBEAT]))
                next_beat = now + self.heartbeat_interval
            if now - last_heard > self.heartbeat_timeout:
                if self.exit_on_frontend_loss:
                    print(f"clipper container {self.name}:{self.version}: frontend silent; exiting",
                          file=sys.stderr, flush=True)
                    return m.EXIT_FRONTEND_LOST
                log.warning("frontend silent for %.1f s; reconnecting", now - last_heard)
                self._reconnect()
                last_heard = now
        return m.EXIT_OK

    def stop(self) -> None:
        self._stop.set()


def serve(predict, name: str, version: str, frontend: str = "tcp://127.0.0.1:7000", **kw) -> int:
    """Load ``predict`` (see :func:`load_predictor`) and serve it; returns an exit code."""
    fn = load_predictor(predict)
    return ContainerRuntime(fn, name, version, frontend, **kw).run()
