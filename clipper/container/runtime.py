"""The model-container runtime: connects a predict function to a frontend.

A model author writes ``predict(batch) -> outputs`` (or a class with
``predict`` and an optional ``load``) and runs::

    python -m clipper.container mymodule:predict --name digits --version 1

The main thread owns the ZeroMQ socket: it answers heartbeats, hands batches
to a worker thread that calls ``predict``, and forwards results. So a long
``predict`` never silences the heartbeat, and a container that stops
heartbeating is really stuck or gone.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import queue
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import msgpack
import numpy as np
import zmq

from ..errors import ModelError, WrongOutputCountError
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

    ``entry_or_obj`` is ``"module:attr"``, ``"path/file.py:attr"``, or the
    object itself. A class is instantiated with no arguments, its ``load()``
    (if any) is called once, and its ``predict`` method is used; a function
    is used as it is.
    """
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
    return wire.make_unpacker()(payload)


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
    ) -> None:
        self.predict = predict
        self.name = name
        self.version = str(version)
        self.frontend = frontend
        self.input_dtype = input_dtype
        self.input_shape = input_shape
        self.exit_on_frontend_loss = exit_on_frontend_loss
        self.heartbeat_interval = 1.0
        self.heartbeat_timeout = 5.0
        self.ctx = zmq.Context.instance()
        self._work: queue.Queue = queue.Queue()
        self._wake_addr = f"inproc://clipper-worker-{uuid.uuid4().hex}"
        self._stop = threading.Event()
        self.replica_id = None
        self.batches_done = 0

    # ---------------------------------------------------------------- worker
    def _worker(self) -> None:
        out = self.ctx.socket(zmq.PAIR)
        out.connect(self._wake_addr)
        try:
            while True:
                item = self._work.get()
                if item is None:
                    return
                batch_id, count, encoding, meta, frame = item
                try:
                    batch = decode_batch(count, encoding, meta, frame.buffer if hasattr(frame, "buffer") else frame)
                    outputs = self.predict(batch)
                    msg = encode_outputs(batch_id, outputs, count)
                except ModelError as exc:
                    msg = [msgpack.packb([m.C_ERROR, batch_id, exc.code, exc.message])]
                except Exception as exc:
                    text = f"{type(exc).__name__}: {exc}"
                    log.warning("predict raised on batch %d: %s", batch_id, text)
                    msg = [msgpack.packb([m.C_ERROR, batch_id, ModelError.code, text])]
                out.send_multipart(msg, copy=False)
        finally:
            out.close(linger=0)

    # ----------------------------------------------------------------- main
    def _connect(self):
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.frontend)
        info = {"model": self.name, "version": self.version, "pid": os.getpid(), "sdk": "clipper-container/0.1"}
        if self.input_dtype is not None:
            info["input_dtype"] = self.input_dtype
        if self.input_shape is not None:
            info["input_shape"] = list(self.input_shape)
        sock.send(msgpack.packb([m.C_HELLO, m.RPC_VERSION, info]))
        return sock

    def run(self) -> int:
        """Serve until stopped, rejected, or (optionally) the frontend is lost. Returns an exit code."""
        wake = self.ctx.socket(zmq.PAIR)
        wake.bind(self._wake_addr)
        worker = threading.Thread(target=self._worker, name="clipper-predict", daemon=True)
        worker.start()
        sock = self._connect()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        last_heard = time.monotonic()
        next_beat = last_heard + self.heartbeat_interval
        code = m.EXIT_OK
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                timeout_ms = max(0, int((next_beat - now) * 1000)) + 1
                events = dict(poller.poll(timeout_ms))
                now = time.monotonic()
                if wake in events:
                    while True:
                        try:
                            frames = wake.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        sock.send_multipart(frames, copy=False)
                        self.batches_done += 1
                if sock in events:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        last_heard = now
                        header = msgpack.unpackb(frames[0].bytes)
                        kind = header[0]
                        if kind == m.F_BATCH:
                            _, batch_id, count, encoding, meta = header
                            self._work.put((batch_id, count, encoding, meta, frames[1]))
                        elif kind == m.F_WELCOME:
                            self.replica_id = header[1]
                            opts = header[2]
                            self.heartbeat_interval = opts.get("heartbeat_interval_ms", 1000) / 1000
                            self.heartbeat_timeout = opts.get("heartbeat_timeout_ms", 5000) / 1000
                            log.info("connected to %s as replica %s", self.frontend, self.replica_id)
                        elif kind == m.F_REJECT:
                            print(f"clipper container {self.name}:{self.version}: frontend rejected it: {header[1]}",
                                  file=sys.stderr, flush=True)
                            return m.EXIT_REJECTED
                        elif kind == m.F_REHELLO:
                            poller.unregister(sock)
                            sock.close(linger=0)
                            sock = self._connect()
                            poller.register(sock, zmq.POLLIN)
                        # F_HEARTBEAT: last_heard is all it updates.
                if now >= next_beat:
                    sock.send(msgpack.packb([m.C_HEARTBEAT]))
                    next_beat = now + self.heartbeat_interval
                if now - last_heard > self.heartbeat_timeout:
                    if self.exit_on_frontend_loss:
                        print(f"clipper container {self.name}:{self.version}: frontend silent; exiting",
                              file=sys.stderr, flush=True)
                        return m.EXIT_FRONTEND_LOST
                    log.warning("frontend silent for %.1f s; reconnecting", now - last_heard)
                    poller.unregister(sock)
                    sock.close(linger=0)
                    sock = self._connect()
                    poller.register(sock, zmq.POLLIN)
                    last_heard = now
        finally:
            try:
                sock.send(msgpack.packb([m.C_BYE]), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self._work.put(None)
            worker.join(timeout=1.0)
            sock.close(linger=100)
            wake.close(linger=0)
        return code

    def stop(self) -> None:
        self._stop.set()


def serve(predict, name: str, version: str, frontend: str = "tcp://127.0.0.1:7000", **kw) -> int:
    """Load ``predict`` (see :func:`load_predictor`) and serve it; returns an exit code."""
    fn = load_predictor(predict)
    return ContainerRuntime(fn, name, version, frontend, **kw).run()
