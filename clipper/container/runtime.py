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
from ..rpc import zio

log = logging.getLogger("clipper.container")

__all__ = ["load_predictor", "serve", "ContainerRuntime", "split_frontends", "rss_bytes"]


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc/self/statm``), else its peak; None if unknown."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError, ValueError):
        return None


MAX_HEADER_BYTES = 64 * 1024  # a frontend's message header (the payload travels in its own frame)
MAX_BATCH_ID = 2**63 - 1
MAX_BATCH_COUNT = 2**31 - 1
_HEADER_LIMITS = dict(max_str_len=MAX_HEADER_BYTES, max_bin_len=MAX_HEADER_BYTES, max_array_len=4096,
                      max_map_len=256, max_ext_len=0)


class FrontendMessageError(ValueError):
    """A message from a frontend that is not one this SDK speaks: ignored (a batch with a usable id,
    ``batch_id``, is answered with C_ERROR), never fatal to the container."""

    def __init__(self, message: str, batch_id: int | None = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id


def parse_frontend_header(raw, frames: int) -> list:
    """A frontend message's header, decoded with bounds and its fields typed for its kind (section 5 of
    docs/container-protocol.md); ``frames`` is how many frames the message had. FrontendMessageError
    otherwise. Kinds this SDK does not know pass with their kind checked only (a newer frontend)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise FrontendMessageError(f"a header of {len(raw)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        header = msgpack.unpackb(raw, strict_map_key=True, **_HEADER_LIMITS)
    except Exception as exc:  # (msgpack raises several kinds, ValueError among them)
        raise FrontendMessageError(f"a header that is not msgpack: {type(exc).__name__}: {exc}") from None
    if type(header) is not list or not header or type(header[0]) is not int:
        raise FrontendMessageError(f"a header that is not [kind, ...]: {header!r:.200}")
    kind = header[0]
    if kind == m.F_BATCH:
        batch_id = header[1] if len(header) > 1 else None
        if type(batch_id) is not int or not 0 <= batch_id <= MAX_BATCH_ID:
            raise FrontendMessageError(f"a batch id {batch_id!r:.100} that is not an integer in 0..2**63-1")
        if len(header) != 5 or frames != 2:
            raise FrontendMessageError(f"a batch of {len(header)} header fields and {frames} frames (5 and 2)",
                                       batch_id)
        _, _, count, encoding, _ = header
        if type(count) is not int or not 0 <= count <= MAX_BATCH_COUNT or type(encoding) is not str:
            raise FrontendMessageError(f"batch {batch_id}: count {count!r:.100} and encoding {encoding!r:.100}",
                                       batch_id)
    elif kind == m.F_WELCOME:
        if len(header) < 2 or type(header[1]) is not int or not 0 <= header[1] <= MAX_BATCH_ID:
            raise FrontendMessageError(f"a welcome without a replica id: {header!r:.200}")
    elif kind == m.F_REJECT:
        if len(header) < 2 or type(header[1]) is not str:
            raise FrontendMessageError(f"a rejection without its reason: {header!r:.200}")
    return header


def _welcome_ms(opts: dict, key: str, default: int) -> int:
    """A time in ms from a frontend's welcome: an integer in 1..3,600,000 (the frontend's own bounds), else
    ``default``. A frontend that sends 0 must not make the container beat in a busy loop."""
    value = opts.get(key, default)
    if type(value) is not int or not 1 <= value <= 3_600_000:
        log.warning("the frontend's welcome gives %s = %r, not an integer in 1..3600000; using %d", key, value,
                    default)
        return default
    return value


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
        if spec is None or spec.loader is None:  # not a name Python imports (no .py suffix)
            raise LoadError(f"entry file {str(path)!r} is not a Python source file (.py)")
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
                inst.load()  # type: ignore[attr-defined]  # (just checked)
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


_TYPESTR = {dt: ts for ts, dt in wire.ALLOWED_DTYPES.items()}  # dtype -> its typestr, as str


def encode_outputs(batch_id: int, outputs, count: int) -> list:
    """Build the C_RESULT message for ``outputs``; raise ModelError subclasses."""
    if isinstance(outputs, np.ndarray):
        if outputs.ndim == 0 or len(outputs) != count:
            n = "a 0-d array" if outputs.ndim == 0 else f"{len(outputs)} outputs"
            raise WrongOutputCountError(f"predict returned {n} for a batch of {count} inputs")
        ts = _TYPESTR.get(outputs.dtype)
        if ts is not None:
            arr = outputs if outputs.flags.c_contiguous else np.ascontiguousarray(outputs)
            header = msgpack.packb([m.C_RESULT, batch_id, count, m.ENC_NDARRAY, [ts, list(arr.shape)]])
            # The block as raw bytes without a copy (every allowed dtype has a buffer format to cast from).
            # (numpy's stubs do not say an ndarray is a buffer)
            return [header, memoryview(arr).cast("B") if arr.size else b""]  # type: ignore[arg-type]
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
    """A batch's inputs from its payload, as ``predict`` gets them; ValueError when the header's count,
    encoding and meta do not describe the payload (``count`` is an int, checked by the caller)."""
    if encoding == m.ENC_NDARRAY:
        if type(meta) is not list or len(meta) != 2:
            raise ValueError(f"an \"nd\" batch's meta {meta!r} is not [typestr, shape]")
        typestr, shape = meta
        dtype = wire.ALLOWED_DTYPES.get(typestr) if type(typestr) is str else None
        if (dtype is None or type(shape) is not list or not 1 <= len(shape) <= wire.MAX_NDIM + 1
                or not all(type(d) is int and d >= 0 for d in shape) or shape[0] != count):
            raise ValueError(f"an \"nd\" batch of {count} items names dtype {typestr!r} and shape {shape!r}")
        return np.frombuffer(payload, dtype=dtype).reshape(shape)  # (a size that does not match raises)
    if encoding == m.ENC_VARLEN:
        if type(meta) is not list or not meta:
            raise ValueError(f"a \"vl\" batch's meta {meta!r} is not a list")
        if meta[0] == "array" and len(meta) == 3:
            return split_arrays(payload, count, meta[1], meta[2])
        if meta[0] in ("str", "bytes"):
            return split_varlen(payload, count, meta[0] == "str")
        raise ValueError(f"a \"vl\" batch's meta {meta!r} names no item kind")
    if encoding == m.ENC_MSGPACK:
        items = wire.make_unpacker()(payload)
        if type(items) is not list or len(items) != count:
            got = f"{len(items)} items" if type(items) is list else f"a {type(items).__name__}"
            raise ValueError(f"an \"mp\" batch of {count} items holds {got}")
        return items
    raise ValueError(f"batch encoding {encoding!r} is not \"nd\", \"vl\" or \"mp\"")


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


def split_arrays(payload, count: int, typestr: str, ndim: int) -> list:
    """The items of a ``"vl"`` batch of arrays (``meta = ["array", typestr, ndim]``): ``count + 1``
    uint64 byte offsets, ``count * ndim`` uint64 dimensions, then the data. Each item is a read-only
    numpy view into the one payload buffer: nothing is copied."""
    dtype = wire.ALLOWED_DTYPES.get(typestr) if type(typestr) is str else None
    if dtype is None or type(ndim) is not int or not 0 <= ndim <= wire.MAX_NDIM or count < 0:
        raise ValueError(f"an array batch's meta names dtype {typestr!r} and {ndim!r} dimensions")
    buf = memoryview(payload).cast("B")
    head = (count + 1 + count * ndim) * 8
    if len(buf) < head:
        raise ValueError(f"an array batch of {count} items is {len(buf)} bytes, shorter than its {head}-byte head")
    offsets = np.frombuffer(buf, dtype="<u8", count=count + 1).tolist()
    dims = np.frombuffer(buf, dtype="<u8", count=count * ndim, offset=(count + 1) * 8).tolist()
    data = len(buf) - head
    if offsets[0] != 0 or offsets[-1] != data:
        raise ValueError(f"an array batch of {count} items declares {offsets[-1]} bytes of data and carries {data}")
    itemsize = dtype.itemsize
    items = []
    for i in range(count):
        shape = dims[i * ndim:(i + 1) * ndim]
        n = 1
        for d in shape:
            n *= d
        a, b = offsets[i], offsets[i + 1]
        if b - a != n * itemsize or a % itemsize:
            raise ValueError(f"item {i} of an array batch spans bytes {a}..{b}; shape {shape} of {dtype} needs "
                             f"{n * itemsize}")
        items.append(np.frombuffer(buf, dtype=dtype, count=n, offset=head + a).reshape(shape))
    return items


_BEAT = msgpack.packb([m.C_HEARTBEAT])


class _Link:
    """One frontend this container serves: its socket and what it has heard from it."""

    __slots__ = ("address", "sock", "monitor", "handshake_failures", "last_heard", "next_beat", "interval",
                 "timeout", "replica_id", "lost", "rejections", "retry_at")

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = None
        self.monitor = None  # handshake events, until the first handshake succeeds
        self.handshake_failures = 0
        self.last_heard = self.next_beat = 0.0
        self.interval = 1.0  # heartbeat interval and timeout: what this frontend asked for in its welcome
        self.timeout = 5.0
        self.replica_id = None
        self.lost = False  # silent past its timeout (only counted under exit_on_frontend_loss)
        self.rejections = 0  # F_REJECTs in a row while other frontends took this container
        self.retry_at = 0.0  # (its socket closed) when to say hello again


def split_frontends(frontend) -> list[str]:
    """The frontend addresses in ``frontend``: one address, several separated by commas, or a list of those."""
    items = [frontend] if isinstance(frontend, str) else list(frontend)
    out = []
    for item in items:
        for addr in str(item).split(","):
            addr = addr.strip()
            if addr and addr not in out:
                out.append(addr)
    if not out:
        raise ValueError("no frontend address given")
    return out


class ContainerRuntime:
    """One model replica serving one frontend, or several (one ZeroMQ socket to each).

    A container given several frontend addresses (frontends of one system,
    sharing a state store) is a replica of its model in each of them: each
    frontend batches for it as for its own, and the container runs the
    batches of all of them one at a time, taking turns among the frontends
    with batches waiting. Each frontend has its own handshake, heartbeats and
    reconnects; a frontend that refuses it or goes away leaves the others
    served.
    """

    def __init__(
        self,
        predict: Callable,
        name: str,
        version: str,
        frontend: str | list[str] = "tcp://127.0.0.1:7000",
        input_dtype: str | None = None,
        input_shape: list[int] | None = None,
        exit_on_frontend_loss: bool = False,
        credentials: ContainerCredentials | None = None,
        load_ms: float | None = None,
    ) -> None:
        self.predict = predict
        self.load_ms = load_ms  # how long loading the model took (told to the frontend at handshake)
        self.credentials = credentials
        self.name = name
        self.version = str(version)
        self.frontends = split_frontends(frontend)
        self.frontend = self.frontends[0]
        self.input_dtype = input_dtype
        self.input_shape = input_shape
        self.exit_on_frontend_loss = exit_on_frontend_loss
        self.ctx: zmq.Context = zmq.Context.instance()
        self._links: list[_Link] = []
        self._poller: zmq.Poller | None = None
        self._sock_lock = threading.Lock()
        self._busy = False
        self._holding = False
        self._beater_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.batches_done = 0

    @property
    def replica_id(self):
        """The replica id the (first) frontend gave this container, once welcomed."""
        return self._links[0].replica_id if self._links else None

    @property
    def heartbeat_interval(self) -> float:
        return min((l.interval for l in self._links), default=1.0)

    # ---------------------------------------------------------------- batches
    def _run_batch(self, header: list, frames) -> list:
        """Run one batch through ``predict``; return the reply frames."""
        _, batch_id, count, encoding, meta = header
        try:
            frame = frames[1]
            batch = decode_batch(count, encoding, meta, frame.buffer if hasattr(frame, "buffer") else frame)
            self._busy = True  # the beater may use the sockets until _busy is False again
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

        The main thread holds ``_sock_lock`` whenever it touches the sockets and
        sets ``_busy`` only around ``predict``, when it does not; so this thread
        uses them only while the main thread provably does not (the lock is the
        memory barrier ZeroMQ asks for when a socket changes threads).
        """
        beat = msgpack.packb([m.C_HEARTBEAT])
        while not self._stop.wait(self.heartbeat_interval):
            if not self._busy:
                continue
            with self._sock_lock:
                if not self._busy:
                    continue
                for link in self._links:
                    if link.sock is not None:
                        try:
                            link.sock.send(beat, zmq.NOBLOCK)
                        except zmq.ZMQError:
                            pass

    # ----------------------------------------------------------------- main
    MAX_HANDSHAKE_FAILURES = 5  # handshakes failing without detail in a row before the container gives up
    _HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                         | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    _NEEDS_CREDENTIALS = ("requires credentials: start the container with --credentials FILE "
                          "(made by `clipper container-credentials MODEL [VERSION]`)")

    def _connect(self, link: _Link) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.copy_threshold = zio.COPY_THRESHOLD
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)  # a frontend away (or refusing, for now): back off to 5 s
        if self.credentials is not None:
            self.credentials.apply(sock)
        link.monitor = sock.get_monitor_socket(self._HANDSHAKE_EVENTS)
        sock.connect(link.address)
        info = {"model": self.name, "version": self.version, "pid": os.getpid(), "sdk": "clipper-container/0.1"}
        if self.credentials is not None:
            info["credential_id"] = self.credentials.id
        if self.input_dtype is not None:
            info["input_dtype"] = self.input_dtype
        if self.input_shape is not None:
            info["input_shape"] = list(self.input_shape)
        if self.load_ms is not None:
            info["load_ms"] = round(float(self.load_ms), 3)
        rss = rss_bytes()
        if rss is not None:
            info["rss_bytes"] = rss
        sock.send(msgpack.packb([m.C_HELLO, m.RPC_VERSION, info]))
        link.sock = sock
        link.last_heard = time.monotonic()
        link.next_beat = link.last_heard + link.interval
        self._poller = None  # the set of sockets to poll changed

    def _reconnect(self, link: _Link) -> None:
        self._close(link)
        self._connect(link)

    def _close(self, link: _Link, goodbye: bool = False) -> None:
        self._stop_monitor(link)
        sock, link.sock = link.sock, None
        if sock is not None:
            if goodbye:
                try:
                    sock.send(msgpack.packb([m.C_BYE]), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            sock.close(linger=100 if goodbye else 0)
        self._poller = None

    def _stop_monitor(self, link: _Link) -> None:
        if link.monitor is not None:
            try:
                link.sock.disable_monitor()
            except zmq.ZMQError:
                pass
            link.monitor.close(linger=0)
            link.monitor = None
            self._poller = None

    def _drop(self, link: _Link, rc: int) -> int | None:
        """``link``'s frontend refused this container: leave it; an exit code once no frontend is left."""
        self._close(link)
        self._links.remove(link)
        if not self._links:
            return rc
        log.warning("no longer serving %s; %d frontend(s) left", link.address, len(self._links))
        return None

    def _handshake_event(self, link: _Link) -> int | None:
        """Read one handshake event; an exit code if the frontend refused this container."""
        from zmq.utils.monitor import recv_monitor_message

        assert link.monitor is not None  # (a handshake event came from it)
        event = recv_monitor_message(link.monitor)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._stop_monitor(link)  # from here on, only the frontend's own messages matter
            link.handshake_failures = 0
            return None
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            # Frontends of one system learn a credential issued by one of them through their shared store:
            # usually within milliseconds, later for a frontend that starts or catches up after a Redis
            # outage. While another frontend takes this container, one that refuses it is asked again
            # (ZeroMQ's reconnects, backing off to RECONNECT_IVL_MAX); only when every frontend has refused
            # it repeatedly does it give up.
            link.handshake_failures += 1
            others = [l for l in self._links if l is not link]
            if others and not all(l.handshake_failures >= self.MAX_HANDSHAKE_FAILURES for l in others):
                if link.handshake_failures in (1, self.MAX_HANDSHAKE_FAILURES) or link.handshake_failures % 50 == 0:
                    log.warning("%s refused this container's credentials (%d in a row); asking again",
                                link.address, link.handshake_failures)
                return None
            if others and link.handshake_failures < self.MAX_HANDSHAKE_FAILURES:
                return None
            why = ("refused this container's credentials (revoked, or never issued by it)"
                   if self.credentials is not None else "refused this container")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and self.credentials is None:
            why = self._NEEDS_CREDENTIALS
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            why = "does not speak the security mechanism of these credentials (is its rpc_security \"none\"?)"
        else:
            # No detail: the frontend's key is not the one in the credentials (another frontend, or its
            # secrets folder was made anew), or the connection dropped mid-handshake (a restart). ZeroMQ
            # tries again by itself; only a failure that keeps coming ends the container.
            link.handshake_failures += 1
            if link.handshake_failures < self.MAX_HANDSHAKE_FAILURES and not self.exit_on_frontend_loss:
                log.warning("the handshake with %s failed (%d in a row); retrying", link.address,
                            link.handshake_failures)
                return None
            why = (f"failed the handshake {link.handshake_failures} times: its key is not the one these "
                   "credentials name (credentials of another frontend, or its secrets folder was made anew)"
                   if self.credentials is not None else
                   # A frontend with rpc_security "curve" closes a peer offering no credentials; whether this end
                   # sees a protocol error or a dropped connection depends on timing.
                   f"failed the handshake {link.handshake_failures} times: it {self._NEEDS_CREDENTIALS}")
        print(f"clipper container {self.name}:{self.version}: the frontend at {link.address} {why}",
              file=sys.stderr, flush=True)
        return self._drop(link, m.EXIT_REJECTED)

    def run(self) -> int:
        """Serve until stopped, rejected by every frontend, or (optionally) every frontend is lost.

        Returns an exit code. Batches run inline on this thread, between
        socket operations: no hand-off to another thread on the hot path. A
        daemon thread keeps the heartbeats going while a long ``predict`` runs.
        """
        self._sock_lock.acquire()
        self._holding = True
        try:
            self._links = [_Link(addr) for addr in self.frontends]
            for link in self._links:
                self._connect(link)
            return self._serve()
        finally:
            for link in self._links:
                self._close(link, goodbye=True)
            self._stop.set()
            if self._holding:
                self._holding = False
                self._sock_lock.release()

    def _make_poller(self) -> tuple[zmq.Poller, dict]:
        poller = zmq.Poller()
        owner: dict = {}
        for link in self._links:
            if link.sock is None:  # refused for now: asked again at retry_at
                continue
            poller.register(link.sock, zmq.POLLIN)
            owner[link.sock] = link
            if link.monitor is not None:
                poller.register(link.monitor, zmq.POLLIN)
                owner[link.monitor] = link
        return poller, owner

    def _serve(self) -> int:
        # Runs with _sock_lock held, letting go of it only around a batch.
        lock = self._sock_lock
        owner: dict = {}
        turn = 0  # which frontend goes first when several have batches waiting
        while not self._stop.is_set():
            if self._poller is None:
                self._poller, owner = self._make_poller()
            links = self._links
            now = time.monotonic()
            timeout_ms = max(0, int((min(l.next_beat if l.sock is not None else l.retry_at for l in links) - now)
                                    * 1000)) + 1
            ready = self._poller.poll(timeout_ms)
            if len(links) > 1 and len(ready) > 1:
                turn = (turn + 1) % len(ready)
                ready = ready[turn:] + ready[:turn]
            for sock, _ in ready:
                link = owner[sock]
                if link.sock is None:  # dropped or reconnected earlier in this round
                    continue
                if sock is link.monitor:
                    rc = self._handshake_event(link)
                    if rc is not None:
                        return rc
                    continue
                if sock is not link.sock:
                    continue
                try:
                    # [header, payload?]: the header as bytes, the payload a Frame (a batch's inputs are views of it)
                    frames = zio.recv_parts(sock, zio.NOBLOCK, 0b10)
                except zmq.Again:
                    continue
                rc = self._on_message(link, frames, lock)
                if rc is not None:
                    return rc
            now = time.monotonic()
            for link in list(self._links):
                if link.sock is None:
                    if now >= link.retry_at:
                        self._connect(link)
                    continue
                if now >= link.next_beat:
                    try:  # never wait on one frontend (its queue full while it is away): the others go on
                        link.sock.send(_BEAT, zmq.NOBLOCK)
                    except zmq.Again:
                        pass
                    link.next_beat = now + link.interval
                if now - link.last_heard > link.timeout:
                    if self.exit_on_frontend_loss:
                        link.lost = True
                        if all(l.lost for l in self._links):
                            print(f"clipper container {self.name}:{self.version}: frontend silent; exiting",
                                  file=sys.stderr, flush=True)
                            return m.EXIT_FRONTEND_LOST
                    log.warning("frontend %s silent for %.1f s; reconnecting", link.address, now - link.last_heard)
                    self._reconnect(link)
        return m.EXIT_OK

    def _on_message(self, link: _Link, frames, lock) -> int | None:
        try:
            header = parse_frontend_header(frames[0], len(frames))
        except FrontendMessageError as exc:
            log.warning("ignored a message from %s: %s", link.address, exc)
            if exc.batch_id is not None and link.sock is not None:
                # answered all the same, so the frontend fails its queries now, not at its batch timeout
                try:
                    link.sock.send(msgpack.packb([m.C_ERROR, exc.batch_id, ModelError.code,
                                                  f"the container could not read this batch: {exc}"]), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            return None
        kind = header[0]
        link.lost = False
        if kind == m.F_BATCH:
            self._holding = False
            lock.release()
            try:
                reply = self._run_batch(header, frames)
            finally:
                lock.acquire()
                self._holding = True
            if link.sock is not None:
                try:
                    zio.send_parts(link.sock, reply, zio.NOBLOCK)
                except zmq.Again:  # its frontend is away with a full queue: it has given this batch up
                    log.warning("could not send batch %s's answer to %s", header[1], link.address)
            self.batches_done += 1
        elif kind == m.F_WELCOME:
            link.replica_id = header[1]
            link.rejections = 0
            opts = header[2] if len(header) > 2 and type(header[2]) is dict else {}  # (else: the defaults)
            link.interval = _welcome_ms(opts, "heartbeat_interval_ms", 1000) / 1000
            link.timeout = _welcome_ms(opts, "heartbeat_timeout_ms", 5000) / 1000
            link.next_beat = min(link.next_beat, time.monotonic() + link.interval)
            log.info("connected to %s as replica %s", link.address, link.replica_id)
            if self._beater_thread is None:  # beats at the interval the frontends asked for
                self._beater_thread = threading.Thread(target=self._beater, name="clipper-heartbeat", daemon=True)
                self._beater_thread.start()
        elif kind == m.F_REJECT:
            print(f"clipper container {self.name}:{self.version}: frontend {link.address} rejected it: "
                  f"{header[1][:4096]}", file=sys.stderr, flush=True)
            if any(l.sock is not None and l is not link for l in self._links):
                # Others take it: this one may not know the model yet (a frontend of the group that is still
                # catching up with the store). Say hello again later, backing off to 30 s.
                link.rejections += 1
                self._close(link)
                link.retry_at = time.monotonic() + min(30.0, 0.5 * 2 ** (link.rejections - 1))
                return None
            return self._drop(link, m.EXIT_REJECTED)
        elif kind == m.F_REHELLO:
            self._reconnect(link)
        # F_HEARTBEAT: hearing anything is all that counts (from when it was handled: a batch counts from its end).
        link.last_heard = time.monotonic()
        return None

    def stop(self) -> None:
        self._stop.set()


def serve(predict, name: str, version: str, frontend: str | list[str] = "tcp://127.0.0.1:7000", **kw) -> int:
    """Load ``predict`` (see :func:`load_predictor`) and serve it; returns an exit code.

    ``frontend`` is one address, or several (a list, or separated by commas) of frontends sharing a state store.
    """
    t0 = time.perf_counter()
    fn = load_predictor(predict)
    kw.setdefault("load_ms", (time.perf_counter() - t0) * 1000)
    from ..gctune import settle_heap

    settle_heap()  # the model is loaded: the collector need not traverse it again
    return ContainerRuntime(fn, name, version, frontend, **kw).run()
