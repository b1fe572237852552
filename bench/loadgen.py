"""Load generator for Clipper's msgpack query port (or the echo floor).

Several worker processes (``multiprocessing``, spawn), each with its own
uvloop event loop and several TCP connections, send pipelined PREDICT frames.
Request frames are encoded once, before the run: a small pool of distinct
random inputs, each frame a template into which only the 4-byte request id
(and, with ``unique_inputs``, two input elements) is written per request.

Two modes:

closed loop
    Every connection keeps ``concurrency`` requests in flight; a reply
    releases the next request. Latency runs from the actual send.

open loop
    A fixed total arrival rate, on a timetable fixed before the run (uniform
    or Poisson gaps), shared round-robin over the connections. Latency runs
    from the *scheduled* send time, so time a request spent waiting for the
    generator or for a stalled connection is counted, not hidden. The report
    says when the generator fell behind its timetable (``behind``).
    A Linux timerfd paces the sends with microsecond resolution (uvloop's
    own timers tick in milliseconds).

With ``tls`` (``--tls``, ``--cafile``) every connection speaks TLS, verifying
the server's certificate against ``tls_cafile`` (or the system's CAs); the
frames inside are the same.

Two engines run the workers: ``engine="python"`` (the default; uvloop
processes, as above) and ``engine="c"`` (``--engine c``): bench/cload/cload.c,
one single-threaded C process per worker doing the same (same timetable,
frames, matching and records; no TLS) at a fraction of the CPU. It is compiled
with the system's gcc on first use into bench/cload/build/.

Every run stops by itself: the measurement window is ``warmup_s +
duration_s``, in-flight requests get ``drain_s`` to finish, and both the
workers and the parent enforce a hard timeout.

Use from Python with :func:`run_load` (returns a dict) or from the shell::

    python -m bench.loadgen --port 1339 --app noop --mode closed \\
        --workers 2 --connections 4 --concurrency 64 --duration 10
    python -m bench.loadgen --port 1339 --app noop --mode open --rate 20000
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import multiprocessing as mp
import os
import resource
import select
import shutil
import signal
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import msgpack
import numpy as np

from clipper._native import framing as _framing
from clipper.protocol import wire

# The native framing or its pure twin, as CLIPPER_NO_EXTENSIONS says.
FrameReader = _framing.FrameReader
pack_frame = _framing.pack_frame

__all__ = ["LoadSpec", "LoadgenError", "run_load", "build_templates", "main"]

_now = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process on the host

# A PREDICT body is built by hand so the request id sits at a fixed offset:
# fixarray of 4, positive fixint 1 (PREDICT), uint32 marker, 4 id bytes.
_PREDICT_HEAD = bytes((0x94, wire.PREDICT, 0xCE))
ID_OFFSET = 4 + len(_PREDICT_HEAD)  # after the frame's length prefix
_ID = struct.Struct(">I")
_ID_MASK = 0xFFFFFFFF
_LAG_BITS = 20  # an in-flight record: time << _LAG_BITS | the send lag in us (capped at ~1 s)
_LAG_MASK = (1 << _LAG_BITS) - 1

# Open-loop health: the generator is "behind" past these.
BEHIND_P50_LAG_MS = 0.5
BEHIND_P99_LAG_MS = 5.0
BEHIND_SENT_FRACTION = 0.99
# A worker whose CPU use during the window exceeds this fraction of a core is
# probably the bottleneck itself.
LOADGEN_SATURATED_CORES = 0.9

_MAX_REPLY_BYTES = 64 * 1024 * 1024
OVERLOADED_CODE = 309  # admission control's refusal (clipper.errors.OverloadedError)
_MAX_LOST_TIMES = 100_000  # send times of requests lost with their connection, kept per worker


class LoadgenError(RuntimeError):
    """The load generator could not run (connection refused, worker died, ...)."""


ENGINES = ("python", "c")


@dataclass
class LoadSpec:
    """What to send, how, and for how long. Times are seconds; rates req/s."""

    port: int
    host: str = "127.0.0.1"
    app: str = "noop"
    mode: str = "closed"  # "closed" or "open"
    workers: int = 1  # processes
    connections: int = 1  # in all, shared out over the workers
    concurrency: int = 1  # closed loop: requests in flight per connection
    rate: float = 0.0  # open loop: total arrival rate over all workers
    arrivals: str = "uniform"  # open loop: "uniform" or "poisson" gaps
    duration_s: float = 10.0  # the measurement window
    warmup_s: float = 2.0  # load before the window, not measured
    drain_s: float = 2.0  # after the window: time in-flight requests get
    inputs: int = 16  # distinct inputs in the pool
    unique_inputs: bool = False  # stamp a counter into each input (defeats caches)
    dtype: str = "float32"
    shape: tuple = (784,)
    seed: int = 0
    send_quantum_us: float = 0.0  # open loop: wake at most this often (0: at each scheduled time)
    max_outstanding: int = 200_000  # open loop, per worker: past it requests are skipped
    connect_timeout_s: float = 10.0
    hard_timeout_s: float | None = None  # default: warmup + duration + drain + 30
    latency_quantiles: int = 0  # > 0: the report gets latency_cdf_ms at this many even steps (plus the tail)
    # unique_inputs: a number in [0, 65536) stamped into every input of this run, so that two runs
    # against one server never send the same input either; -1 draws a fresh one per run.
    stamp_salt: int = -1
    tls: bool = False  # connect with TLS (the server's certificate is verified)
    tls_cafile: str | None = None  # the CA to trust instead of the system's (implies tls)
    # > 0: every reply (result, default or error) to a request sent in the window should arrive within
    # this many ms of its send (scheduled send, open loop); the report counts the late ones.
    deadline_ms: float = 0.0
    # ERROR codes after which a connection sends nothing more (a well-behaved client told to go away,
    # e.g. (310,) for SHUTTING_DOWN); its requests still due are skipped. Empty: never stop.
    stop_on_codes: tuple = ()
    # "python": uvloop worker processes; "c": bench/cload/cload.c worker processes (same behaviour, less
    # CPU per request; no TLS).
    engine: str = "python"
    # > 0: the worker processes run at this niceness (os.nice), so that on a small machine the server
    # measured gets the CPU first; a generator that then cannot keep its timetable says so (behind).
    nice: int = 0

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine is {self.engine!r}; expected one of {', '.join(map(repr, ENGINES))}")
        if self.mode not in ("closed", "open"):
            raise ValueError(f"mode is {self.mode!r}; expected 'closed' or 'open'")
        if self.arrivals not in ("uniform", "poisson"):
            raise ValueError(f"arrivals is {self.arrivals!r}; expected 'uniform' or 'poisson'")
        if self.workers < 1 or self.connections < 1:
            raise ValueError(f"workers ({self.workers}) and connections ({self.connections}) must be >= 1")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError(f"concurrency is {self.concurrency}; expected >= 1")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError(f"open loop needs a positive rate, got {self.rate}")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.drain_s < 0:
            raise ValueError("duration_s must be > 0; warmup_s and drain_s >= 0")
        if self.inputs < 1:
            raise ValueError(f"inputs is {self.inputs}; expected >= 1")
        if not -1 <= self.stamp_salt < 1 << 16:
            raise ValueError(f"stamp_salt is {self.stamp_salt}; expected -1 or an integer in [0, 65536)")
        if self.deadline_ms < 0:
            raise ValueError(f"deadline_ms is {self.deadline_ms}; expected >= 0 (0: no deadline)")
        if self.latency_quantiles < 0:
            raise ValueError(f"latency_quantiles is {self.latency_quantiles}; expected >= 0")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"nice is {self.nice}; expected an integer in [0, 19]")
        if self.unique_inputs and np.dtype(self.dtype) not in (np.float32, np.float64):
            raise ValueError(f"unique_inputs needs a float32 or float64 input, not {self.dtype}")

    def hard_timeout(self) -> float:
        if self.hard_timeout_s is not None:
            return self.hard_timeout_s
        return self.connect_timeout_s + self.warmup_s + self.duration_s + self.drain_s + 30.0


# ----------------------------------------------------------------- templates
def build_templates(app: str, n_inputs: int, dtype: str, shape, seed: int):
    """Encode ``n_inputs`` PREDICT frames with random inputs.

    Returns ``(frames, data_offset)``: each frame's request id is at
    ``ID_OFFSET``; its raw input elements start at ``data_offset``.
    """
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    app_packed = msgpack.packb(app, use_bin_type=True)
    frames = []
    data_offset = None
    for _ in range(n_inputs):
        if dt.kind == "f":
            x = rng.standard_normal(tuple(shape)).astype(dt)
        elif dt.kind in "iu":
            x = rng.integers(0, 100, size=tuple(shape)).astype(dt)
        elif dt.kind == "b":
            x = rng.integers(0, 2, size=tuple(shape)).astype(dt)
        else:
            raise ValueError(f"no random inputs for dtype {dt}")
        body = _PREDICT_HEAD + b"\0\0\0\0" + app_packed + wire.pack(x)
        frame = pack_frame(body)
        frames.append(frame)
        data_offset = len(frame) - x.nbytes  # the ndarray extension ends with the elements
    # The hand-built body must decode like any client's.
    check = wire.make_unpacker()(frames[0][4:])
    if check[0] != wire.PREDICT or check[2] != app or check[3].shape != tuple(shape):
        raise AssertionError(f"template frame decodes to {check[:3]!r}")
    return frames, data_offset


# ------------------------------------------------------------------ timerfd
class _TimerFD:
    """One-shot absolute CLOCK_MONOTONIC timer, watched by the event loop."""

    _libc = None

    class _Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    class _Itimerspec(ctypes.Structure):
        _fields_ = [("it_interval", ctypes.c_long * 2), ("it_value", ctypes.c_long * 2)]

    def __init__(self, loop, callback) -> None:
        if _TimerFD._libc is None:
            _TimerFD._libc = ctypes.CDLL(None, use_errno=True)
        libc = _TimerFD._libc
        self._settime = libc.timerfd_settime
        # CLOCK_MONOTONIC = 1; TFD_NONBLOCK | TFD_CLOEXEC = 0o4000 | 0o2000000
        fd = libc.timerfd_create(1, 0o4000 | 0o2000000)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd = fd
        self._spec = self._Itimerspec()
        self._loop = loop
        self._callback = callback
        loop.add_reader(fd, self._on_ready)

    def arm_at(self, t_ns: int) -> None:
        t_ns = max(t_ns, 1)  # an all-zero value would disarm the timer
        self._spec.it_value[0] = t_ns // 1_000_000_000
        self._spec.it_value[1] = t_ns % 1_000_000_000
        # TFD_TIMER_ABSTIME = 1
        if self._settime(self.fd, 1, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _on_ready(self) -> None:
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            return
        self._callback()

    def close(self) -> None:
        self._loop.remove_reader(self.fd)
        os.close(self.fd)


class _LoopTimer:
    """Fallback where there is no timerfd: uvloop timers (millisecond ticks)."""

    def __init__(self, loop, callback) -> None:
        self._loop = loop
        self._callback = callback
        self._handle = None

    def arm_at(self, t_ns: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_later(max(0.0, (t_ns - _now()) / 1e9), self._callback)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


# ------------------------------------------------------------ worker process
def _error_key(msg: list) -> str:
    """``"<code> <name>"`` of an ERROR message, tolerating short ones."""
    if len(msg) >= 4:
        return f"{msg[2]} {msg[3]}"
    return "malformed_error_reply"


class _Connection(asyncio.Protocol):
    """One TCP connection of a worker: writes request batches, matches replies."""

    def __init__(self, worker: "_Worker") -> None:
        self.w = worker
        self.transport = None
        self.reader = FrameReader(_MAX_REPLY_BYTES)
        # request id -> its send (closed loop) or scheduled (open loop) time in ns, shifted left by
        # _LAG_BITS, with how late the generator actually sent it (us, open loop) in the low bits:
        # one int per request, so replies can be timed from the timetable and from the actual send.
        self.inflight: dict[int, int] = {}
        self.next_id = 0
        self.closing = False
        self.stopped = False  # told to stop (LoadSpec.stop_on_codes): sends nothing more

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.transport = None
        if self.closing:
            return
        w = self.w
        w.count_error("connection_lost")
        lost = len(self.inflight)
        if lost:
            w.errors["lost_in_flight"] = w.errors.get("lost_in_flight", 0) + lost
            if len(w.lost_sent) < _MAX_LOST_TIMES:
                w.lost_sent.extend([v >> _LAG_BITS for v in self.inflight.values()][:_MAX_LOST_TIMES - len(w.lost_sent)])
            w.outstanding -= lost
            self.inflight.clear()
        w.check_drained()

    def send(self, n: int) -> None:
        """Closed loop: send ``n`` requests now."""
        if self.transport is None or self.stopped:
            return
        w = self.w
        templates = w.templates
        ntemplates = len(templates)
        inflight = self.inflight
        pack_id = _ID.pack_into
        stamp = w.stamp
        buf = bytearray()
        rid = self.next_id
        k = w.template_index
        t = _now()
        tv = t << _LAG_BITS
        for _ in range(n):
            pos = len(buf)
            buf += templates[k]
            k += 1
            if k == ntemplates:
                k = 0
            pack_id(buf, pos + ID_OFFSET, rid)
            if stamp is not None:
                stamp(buf, pos)
            inflight[rid] = tv
            rid = (rid + 1) & _ID_MASK
        self.next_id = rid
        w.template_index = k
        w.outstanding += n
        if w.window_start <= t < w.window_end:
            w.sent_in_window += n
        self.transport.write(buf)

    def data_received(self, data) -> None:
        t_recv = _now()
        w = self.w
        inflight = self.inflight
        ws = w.window_start
        we = w.window_end
        lat_append = w.latencies.append
        good_append = w.good_latencies.append
        default_append = w.default_latencies.append
        unpackb = msgpack.unpackb
        done = 0
        results = 0
        defaults = 0
        for body in self.reader.feed(data):
            if type(body) is int:
                w.count_error("reply_too_large")
                continue
            try:
                msg = unpackb(body)
                kind = msg[0]
                rid = msg[1]
            except Exception:
                w.count_error("malformed_reply")
                continue
            v = inflight.pop(rid, None)
            if v is None:
                # An ERROR without a known id is about the connection, not a request.
                w.count_error(_error_key(msg) if kind == wire.ERROR else "unmatched_reply")
                continue
            done += 1
            t0 = v >> _LAG_BITS
            if kind == wire.RESULT and len(msg) >= 5:
                if ws <= t0 < we:
                    lat_append(t_recv - t0)
                    if msg[4]:
                        defaults += 1
                        default_append(t_recv - t0)
                    else:
                        good_append(t_recv - t0)
                results += 1
            elif kind == wire.ERROR:
                key = _error_key(msg)
                w.count_error(key)
                if w.stop_codes and len(msg) >= 3 and msg[2] in w.stop_codes and not self.stopped:
                    self.stopped = True
                    w.stopped_connections += 1
                if ws <= t0 < we:
                    w.error_latency(key).append(t_recv - t0)
                    # the same from the actual send: the server's part, without the generator's lateness
                    w.error_latency(key, True).append(t_recv - t0 - (v & _LAG_MASK) * 1000)
            else:
                w.count_error(f"unexpected_reply_{kind!r}")
        if not done:
            return
        w.outstanding -= done
        if ws <= t_recv < we:
            w.results_in_window += results
        w.defaults += defaults
        if w.closed_loop:
            if w.sending:
                self.send(done)
            elif w.outstanding == 0:
                w.check_drained()
        elif w.outstanding == 0 and not w.sending:
            w.check_drained()


class _Worker:
    """The state of one worker process: its connections, timetable and records."""

    def __init__(self, spec: LoadSpec, index: int, n_connections: int, rate: float) -> None:
        self.spec = spec
        self.index = index
        self.n_connections = n_connections
        self.rate = rate  # open loop: this worker's share
        self.closed_loop = spec.mode == "closed"
        self.templates, self.data_offset = build_templates(
            spec.app, spec.inputs, spec.dtype, spec.shape, spec.seed
        )
        # Workers start at different places in the pool.
        self.template_index = (index * 7) % len(self.templates)
        self.stamp = self._make_stamp() if spec.unique_inputs else None
        self.stop_codes = frozenset(spec.stop_on_codes)
        self.stopped_connections = 0
        self.lost_sent = array("q")  # (scheduled) send times, ns, of requests lost with their connection
        self.conns: list[_Connection] = []
        self.latencies = array("q")  # ns, one per RESULT of a request sent in the window
        self.good_latencies = array("q")  # ns, the same for RESULTs that are not default outputs
        self.default_latencies = array("q")  # ns, ... and for the default outputs
        self.error_latencies: dict[str, array] = {}  # "<code> <name>" -> ns, ERRORs of requests sent in the window
        self.error_sent_latencies: dict[str, array] = {}  # the same from the actual send (open loop: not scheduled)
        self.send_lags = array("q")  # ns, open loop: actual send - scheduled send
        self.errors: dict[str, int] = {}
        self.errors_in_window = 0
        self.defaults = 0
        self.outstanding = 0
        self.sent_in_window = 0
        self.scheduled_in_window = 0
        self.results_in_window = 0
        self.skipped = 0
        self.sending = False
        self.window_start = 1 << 62  # set once the start time is known
        self.window_end = 1 << 62
        self.rusage_start = None
        self.rusage_end = None
        self.window_actual = [None, None]
        self.drained = None

    def _make_stamp(self):
        # Two input elements carry a per-request counter so no two requests
        # share an input (a prediction cache then never hits): the low 24 bits
        # in the first, the run's salt and the next 8 bits in the second (all
        # exact in a float32). The salt keeps successive runs against one
        # server (and its cache) apart.
        fmt = struct.Struct("<ff" if np.dtype(self.spec.dtype) == np.float32 else "<dd")
        pack = fmt.pack_into
        off = self.data_offset
        step = self.spec.workers
        seq = [self.index]
        salt = max(self.spec.stamp_salt, 0) << 8

        def stamp(buf, pos):
            s = seq[0]
            seq[0] = s + step
            pack(buf, pos + off, float(s & 0xFFFFFF), float(salt | ((s >> 24) & 0xFF)))

        return stamp

    def count_error(self, key: str) -> None:
        self.errors[key] = self.errors.get(key, 0) + 1
        t = _now()
        if self.window_start <= t < self.window_end:
            self.errors_in_window += 1

    def error_latency(self, key: str, from_send: bool = False) -> array:
        table = self.error_sent_latencies if from_send else self.error_latencies
        arr = table.get(key)
        if arr is None:
            arr = table[key] = array("q")
        return arr

    def check_drained(self) -> None:
        if self.drained is not None and not self.drained.done() and not self.sending:
            if self.outstanding <= 0 or all(c.transport is None for c in self.conns):
                self.drained.set_result(None)

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        tls = {}
        if spec.tls or spec.tls_cafile:
            # Made here: a context does not cross the process boundary. One per worker, so sessions
            # of its connections share nothing with other workers (each pays a full handshake).
            tls = {"ssl": ssl.create_default_context(cafile=spec.tls_cafile), "server_hostname": spec.host}
        for _ in range(self.n_connections):
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), spec.host, spec.port, **tls),
                spec.connect_timeout_s,
            )
            self.conns.append(conn)

    def _begin_window(self) -> None:
        self.window_actual[0] = _now()
        self.rusage_start = resource.getrusage(resource.RUSAGE_SELF)

    def _end_window(self) -> None:
        self.window_actual[1] = _now()
        self.rusage_end = resource.getrusage(resource.RUSAGE_SELF)
        self.sending = False
        self.check_drained()

    async def run(self, t_start: int) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        self.window_start = t_start + int(spec.warmup_s * 1e9)
        self.window_end = self.window_start + int(spec.duration_s * 1e9)
        self.drained = loop.create_future()
        delay = (t_start - _now()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        loop.call_later(max(0.0, (self.window_start - _now()) / 1e9), self._begin_window)
        loop.call_later(max(0.0, (self.window_end - _now()) / 1e9), self._end_window)
        self.sending = True
        if self.closed_loop:
            for conn in self.conns:
                conn.send(spec.concurrency)
        else:
            self._start_open_loop(t_start)
        remaining = (self.window_end - _now()) / 1e9
        try:
            await asyncio.wait_for(asyncio.shield(self.drained), remaining + spec.drain_s)
        except asyncio.TimeoutError:
            pass
        finally:
            self.sending = False
            if self.window_actual[1] is None:
                self._end_window()
            if self.timer is not None:
                self.timer.close()

    # --- open loop
    timer = None

    def _start_open_loop(self, t_start: int) -> None:
        loop = asyncio.get_running_loop()
        spec = self.spec
        self.rng = np.random.default_rng(spec.seed + 1000 + self.index)
        self.period_ns = 1e9 / self.rate
        self.quantum_ns = int(spec.send_quantum_us * 1000)
        # Workers interleave: worker i starts i/total_rate after worker 0.
        self.sched_base = t_start + (self.index * 1e9 / spec.rate if spec.rate else 0)
        self.sched_k = 0  # requests scheduled so far
        self.sched = []  # the next scheduled times, ns, ascending
        self.sched_i = 0
        self.next_conn = 0
        self._refill()
        try:
            self.timer = _TimerFD(loop, self._fire)
        except (OSError, AttributeError):
            self.timer = _LoopTimer(loop, self._fire)
        self.timer.arm_at(self.sched[0])

    def _refill(self) -> None:
        chunk = 4096
        if self.spec.arrivals == "poisson":
            gaps = self.rng.exponential(self.period_ns, chunk)
            last = self.sched[-1] if self.sched else self.sched_base
            times = last + np.cumsum(gaps)
        else:
            times = self.sched_base + (self.sched_k + np.arange(chunk)) * self.period_ns
        self.sched_k += chunk
        self.sched = times.astype(np.int64).tolist()
        self.sched_i = 0

    def _fire(self) -> None:
        if not self.sending:
            return
        now = _now()
        we = self.window_end
        ws = self.window_start
        sched = self.sched
        i = self.sched_i
        conns = self.conns
        nconns = len(conns)
        c = self.next_conn
        templates = self.templates
        ntemplates = len(templates)
        k = self.template_index
        pack_id = _ID.pack_into
        stamp = self.stamp
        bufs = [None] * nconns
        cap = self.spec.max_outstanding
        lag_append = self.send_lags.append
        t_send = _now()
        n = 0
        while True:
            if i == len(sched):
                self._refill()
                sched = self.sched
                i = 0
            t = sched[i]
            if t > now or t >= we:
                break
            i += 1
            in_window = t >= ws
            if in_window:
                self.scheduled_in_window += 1
            if self.outstanding + n >= cap:
                self.skipped += 1
                continue
            ci = c
            c += 1
            if c == nconns:
                c = 0
            conn = conns[ci]
            if conn.transport is None or conn.stopped:
                self.skipped += 1
                continue
            buf = bufs[ci]
            if buf is None:
                buf = bufs[ci] = bytearray()
            pos = len(buf)
            buf += templates[k]
            k += 1
            if k == ntemplates:
                k = 0
            rid = conn.next_id
            conn.next_id = (rid + 1) & _ID_MASK
            pack_id(buf, pos + ID_OFFSET, rid)
            if stamp is not None:
                stamp(buf, pos)
            # latency counts from the timetable; the send lag (us) rides in the low bits
            conn.inflight[rid] = (t << _LAG_BITS) | min(_LAG_MASK, (t_send - t) // 1000)
            n += 1
            if in_window:
                self.sent_in_window += 1
                lag_append(t_send - t)
        self.sched_i = i
        self.next_conn = c
        self.template_index = k
        self.outstanding += n
        for j in range(nconns):
            if bufs[j] is not None:
                conns[j].transport.write(bufs[j])
        if i == len(sched):
            self._refill()
            sched = self.sched
            i = 0
        if sched[i] < we:
            self.timer.arm_at(max(sched[i], now + self.quantum_ns))
        else:
            self.sending = False

    def report(self) -> dict:
        ru0, ru1 = self.rusage_start, self.rusage_end
        cpu = cpu_user = None
        if ru0 is not None and ru1 is not None:
            cpu_user = ru1.ru_utime - ru0.ru_utime
            cpu = cpu_user + (ru1.ru_stime - ru0.ru_stime)
        unfinished = sum(
            1
            for conn in self.conns
            for v in conn.inflight.values()
            if self.window_start <= v >> _LAG_BITS < self.window_end
        )
        w0, w1 = self.window_actual
        return {
            "index": self.index,
            "connections": self.n_connections,
            "latencies_ns": np.frombuffer(self.latencies, dtype=np.int64).copy(),
            "good_latencies_ns": np.frombuffer(self.good_latencies, dtype=np.int64).copy(),
            "default_latencies_ns": np.frombuffer(self.default_latencies, dtype=np.int64).copy(),
            "error_latencies_ns": {k: np.frombuffer(v, dtype=np.int64).copy()
                                   for k, v in self.error_latencies.items()},
            "error_sent_latencies_ns": {k: np.frombuffer(v, dtype=np.int64).copy()
                                        for k, v in self.error_sent_latencies.items()},
            "send_lags_ns": np.frombuffer(self.send_lags, dtype=np.int64).copy(),
            "errors": dict(self.errors),
            "errors_in_window": self.errors_in_window,
            "defaults": self.defaults,
            "sent_in_window": self.sent_in_window,
            "scheduled_in_window": self.scheduled_in_window,
            "results_in_window": self.results_in_window,
            "skipped": self.skipped,
            "stopped_connections": self.stopped_connections,
            "lost_sent_ns": np.frombuffer(self.lost_sent, dtype=np.int64).copy(),
            "unfinished": unfinished,
            "cpu_s": cpu,
            "cpu_user_s": cpu_user,
            "window_ns": (w1 - w0) if (w0 is not None and w1 is not None) else None,
        }

    def close(self) -> None:
        for conn in self.conns:
            conn.closing = True
            if conn.transport is not None:
                conn.transport.abort()


def _worker_main(pipe, spec_dict: dict, index: int, n_connections: int, rate: float) -> None:
    """Entry point of a worker process; talks to the parent over ``pipe``."""
    spec = LoadSpec(**spec_dict)
    if spec.nice:
        os.nice(spec.nice)
    # Last resort: the process ends itself even if its loop is wedged.
    signal.alarm(int(spec.hard_timeout()) + 5)
    gc.disable()  # no collector pauses inside the window; little garbage is cyclic
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = None
    try:
        worker = _Worker(spec, index, n_connections, rate)
        try:
            loop.run_until_complete(worker.connect())
        except (OSError, asyncio.TimeoutError) as exc:
            pipe.send(("error", f"worker {index} cannot connect to {spec.host}:{spec.port}: {exc!r}"))
            return
        pipe.send(("ready", None))
        if not pipe.poll(spec.connect_timeout_s + 30):
            return
        cmd, t_start = pipe.recv()
        if cmd != "start":
            return
        loop.run_until_complete(asyncio.wait_for(worker.run(t_start), spec.hard_timeout()))
        pipe.send(("result", worker.report()))
    except BaseException as exc:  # report, never hang the parent
        try:
            pipe.send(("error", f"worker {index} failed: {type(exc).__name__}: {exc}"))
        except Exception:
            pass
    finally:
        if worker is not None:
            worker.close()
        try:
            loop.run_until_complete(asyncio.sleep(0))
        except Exception:
            pass
        loop.close()


# -------------------------------------------------------------------- parent
def _percentiles_ms(values_ns: np.ndarray) -> dict:
    if values_ns.size == 0:
        return {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None, "p99.9": None, "max": None}
    q = np.percentile(values_ns, [50, 90, 99, 99.9])
    ms = lambda v: round(float(v) / 1e6, 4)  # noqa: E731
    return {
        "count": int(values_ns.size),
        "mean": ms(values_ns.mean()),
        "p50": ms(q[0]),
        "p90": ms(q[1]),
        "p99": ms(q[2]),
        "p99.9": ms(q[3]),
        "max": ms(values_ns.max()),
    }


# The tail quantiles latency_cdf_ms always includes, on top of the even steps.
CDF_TAIL = (0.995, 0.999, 0.9995, 0.9999)


def latency_cdf_ms(values_ns: np.ndarray, steps: int) -> dict:
    """Quantiles of ``values_ns`` in ms at ``0, 1/steps, ..., 1`` and :data:`CDF_TAIL`.

    Returns ``{"q": [...], "ms": [...]}`` (ascending); empty lists without samples.
    """
    if values_ns.size == 0 or steps < 1:
        return {"q": [], "ms": []}
    qs = sorted({round(i / steps, 6) for i in range(steps + 1)} | set(CDF_TAIL))
    vals = np.quantile(values_ns, qs)
    return {"q": qs, "ms": [round(float(v) / 1e6, 4) for v in vals]}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _sample_window(probe, t_from: int, t_to: int, out: dict, stop) -> None:
    # Runs in a thread: read ``probe()`` (cumulative CPU seconds of the
    # server) at the start and at the end of the measurement window.
    try:
        if stop.wait(max(0.0, (t_from - _now()) / 1e9)):
            return
        a, ta = probe(), _now()
        if stop.wait(max(0.0, (t_to - _now()) / 1e9)):
            return
        b, tb = probe(), _now()
        if a is not None and b is not None:
            out["server_cpu_s"] = round(b - a, 3)
            out["server_cpu_cores"] = round((b - a) / ((tb - ta) / 1e9), 3)
    except Exception as exc:  # a probe failure must not fail the run
        out["server_cpu_error"] = repr(exc)


# ------------------------------------------------------------ worker handles
class _PyWorkerProc:
    """A Python worker process (:func:`_worker_main`) and the parent's end of its pipe."""

    def __init__(self, ctx, spec_dict: dict, index: int, n_connections: int, rate: float) -> None:
        self.index = index
        parent_end, child_end = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child_end, spec_dict, index, n_connections, rate),
            name=f"loadgen-{index}",
            daemon=True,
        )
        self.proc.start()
        child_end.close()
        self.pipe = parent_end

    def wait_ready(self, timeout: float) -> None:
        i = self.index
        if not self.pipe.poll(timeout):
            raise LoadgenError(f"worker {i} did not connect in time")
        try:
            kind, payload = self.pipe.recv()
        except EOFError:
            code = self.proc.exitcode
            raise LoadgenError(f"worker {i} died while starting (exit code {code})") from None
        if kind != "ready":
            raise LoadgenError(payload)

    def start(self, t_start: int) -> None:
        self.pipe.send(("start", t_start))

    def wait_result(self, timeout: float) -> dict:
        i = self.index
        if not self.pipe.poll(timeout):
            raise LoadgenError(f"worker {i} did not finish within the hard timeout")
        try:
            kind, payload = self.pipe.recv()
        except EOFError:
            raise LoadgenError(f"worker {i} died (exit code {self.proc.exitcode})") from None
        if kind != "result":
            raise LoadgenError(payload)
        return payload

    def join(self, timeout: float) -> None:
        self.proc.join(timeout=timeout)

    def reap(self) -> None:
        p = self.proc
        if p.is_alive():
            p.terminate()
            p.join(timeout=2)
        if p.is_alive():
            p.kill()
            p.join()

    def close(self) -> None:
        self.pipe.close()


CLOAD_SOURCE = Path(__file__).resolve().parent / "cload" / "cload.c"
CLOAD_BUILD = CLOAD_SOURCE.parent / "build"


def cload_binary() -> str:
    """The C engine's executable, compiled with the system's gcc when missing or older than its source."""
    exe = CLOAD_BUILD / "cload"
    try:
        if exe.stat().st_mtime >= CLOAD_SOURCE.stat().st_mtime:
            return str(exe)
    except FileNotFoundError:
        pass
    if not CLOAD_SOURCE.is_file():
        raise LoadgenError(f"the C engine's source {CLOAD_SOURCE} is missing")
    gcc = shutil.which("gcc")
    if gcc is None:
        raise LoadgenError(
            "engine 'c' needs a C compiler but gcc is not installed (scripts/bench-setup.sh installs it); "
            "or use engine 'python'"
        )
    # concurrent builds (processes, threads) each rename a whole file into place
    tmp = CLOAD_BUILD / f"cload.tmp{os.getpid()}-{threading.get_ident()}"
    try:
        CLOAD_BUILD.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [gcc, "-O2", "-std=gnu11", "-Wall", "-o", str(tmp), str(CLOAD_SOURCE), "-lm"],
            capture_output=True, text=True, timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoadgenError(f"cannot compile {CLOAD_SOURCE} with {gcc}: {exc}") from None
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise LoadgenError(f"compiling {CLOAD_SOURCE} failed:\n{(proc.stderr or proc.stdout).strip()[-3000:]}")
    os.replace(tmp, exe)
    return str(exe)


def _write_templates(path: Path, frames: list) -> None:
    # The C engine's template file: "CCLT", u32 count, then per frame u32 length + bytes (little-endian).
    with open(path, "wb") as fh:
        fh.write(b"CCLT" + struct.pack("<I", len(frames)))
        for f in frames:
            fh.write(struct.pack("<I", len(f)))
            fh.write(bytes(f))


def _read_c_report(out: Path, index: int, n_connections: int) -> dict:
    """Turn a C worker's output files into the dict :meth:`_Worker.report` returns."""

    def arr(name: str) -> np.ndarray:
        return np.fromfile(out / name, dtype="<i8").astype(np.int64, copy=False)

    scalars = {}
    for line in (out / "scalars.txt").read_text().splitlines():
        k, _, v = line.partition("=")
        scalars[k] = int(v)
    errors: dict[str, int] = {}
    err_lat: dict[str, np.ndarray] = {}
    err_sent: dict[str, np.ndarray] = {}
    data = (out / "errors.bin").read_bytes()
    pos = 0
    while pos < len(data):
        (klen,) = struct.unpack_from("<I", data, pos)
        pos += 4
        key = data[pos:pos + klen].decode("utf-8", "replace")
        pos += klen
        count, has = struct.unpack_from("<qB", data, pos)
        pos += 9
        errors[key] = errors.get(key, 0) + count
        if has:
            for table in (err_lat, err_sent):
                (n,) = struct.unpack_from("<Q", data, pos)
                pos += 8
                table[key] = np.frombuffer(data, dtype="<i8", count=n, offset=pos).astype(np.int64)
                pos += 8 * n
    cpu = cpu_user = window_ns = None
    if "window_ns" in scalars:
        cpu_user = scalars["cpu_user_us"] / 1e6
        cpu = (scalars["cpu_user_us"] + scalars["cpu_sys_us"]) / 1e6
        window_ns = scalars["window_ns"]
    return {
        "index": index,
        "connections": n_connections,
        "latencies_ns": arr("latencies.i64"),
        "good_latencies_ns": arr("good.i64"),
        "default_latencies_ns": arr("default.i64"),
        "error_latencies_ns": err_lat,
        "error_sent_latencies_ns": err_sent,
        "send_lags_ns": arr("lags.i64"),
        "errors": errors,
        "errors_in_window": scalars["errors_in_window"],
        "defaults": scalars["defaults"],
        "sent_in_window": scalars["sent_in_window"],
        "scheduled_in_window": scalars["scheduled_in_window"],
        "results_in_window": scalars["results_in_window"],
        "skipped": scalars["skipped"],
        "stopped_connections": scalars["stopped_connections"],
        "lost_sent_ns": arr("lost_sent.i64"),
        "unfinished": scalars["unfinished"],
        "cpu_s": cpu,
        "cpu_user_s": cpu_user,
        "window_ns": window_ns,
    }


class _CWorkerProc:
    """A C worker process (bench/cload/cload.c): "ready" on its stdout, "start <ns>" on its stdin,
    its records in files under ``out``."""

    def __init__(self, exe: str, spec: LoadSpec, spec_dict: dict, index: int, n_connections: int, rate: float,
                 templates: Path, data_offset: int, out: Path) -> None:
        self.index = index
        self.n_connections = n_connections
        self.out = out
        out.mkdir()
        stamp = 0
        if spec.unique_inputs:
            stamp = 4 if np.dtype(spec.dtype) == np.float32 else 8
        args = [
            f"host={spec.host}", f"port={spec.port}", f"mode={spec.mode}", f"arrivals={spec.arrivals}",
            f"index={index}", f"workers={spec_dict['workers']}", f"connections={n_connections}",
            f"concurrency={spec.concurrency}", f"rate={float(rate)!r}", f"total_rate={float(spec.rate)!r}",
            f"seed={int(spec.seed)}",
            f"warmup_ns={int(spec.warmup_s * 1e9)}", f"duration_ns={int(spec.duration_s * 1e9)}",
            f"drain_ns={int(spec.drain_s * 1e9)}", f"connect_timeout_ns={int(spec.connect_timeout_s * 1e9)}",
            f"hard_timeout_ns={int(spec.hard_timeout() * 1e9)}", f"quantum_ns={int(spec.send_quantum_us * 1000)}",
            f"max_outstanding={int(spec.max_outstanding)}", f"templates={templates}",
            f"template_start={(index * 7) % spec.inputs}", f"id_offset={ID_OFFSET}", f"data_offset={data_offset}",
            f"stamp={stamp}", f"salt={max(int(spec_dict['stamp_salt']), 0)}",
            f"wire_result={wire.RESULT}", f"wire_error={wire.ERROR}",
            f"stop_codes={','.join(str(int(c)) for c in spec.stop_on_codes)}", f"out={out}",
        ]
        try:
            self.proc = subprocess.Popen(
                [exe, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                preexec_fn=(lambda n=spec.nice: os.nice(n)) if spec.nice else None,
            )
        except OSError as exc:
            raise LoadgenError(f"cannot start the C worker {exe}: {exc}") from None

    def _failure(self, what: str) -> str:
        # The worker's one-line message, or what became of it.
        p = self.proc
        try:
            p.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        lines = []
        if p.returncode is not None:
            lines = p.stderr.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else f"worker {self.index} {what} (exit code {p.returncode})"

    def wait_ready(self, timeout: float) -> None:
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, timeout))
        if not ready:
            raise LoadgenError(f"worker {self.index} did not connect in time")
        if self.proc.stdout.readline().strip() != b"ready":
            raise LoadgenError(self._failure("died while starting"))

    def start(self, t_start: int) -> None:
        try:
            self.proc.stdin.write(f"start {t_start}\n".encode())
        except OSError:
            raise LoadgenError(self._failure("died")) from None

    def wait_result(self, timeout: float) -> dict:
        try:
            code = self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            raise LoadgenError(f"worker {self.index} did not finish within the hard timeout") from None
        if code != 0:
            raise LoadgenError(self._failure("died"))
        try:
            return _read_c_report(self.out, self.index, self.n_connections)
        except (OSError, ValueError, KeyError, struct.error) as exc:
            raise LoadgenError(f"worker {self.index} left an unreadable report in {self.out}: {exc!r}") from None

    def join(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def reap(self) -> None:
        p = self.proc
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


def run_load(spec: LoadSpec, cpu_probe=None, on_start=None) -> dict:
    """Run one measurement; return the report (see bench/README.md).

    ``cpu_probe``, if given, returns the server's cumulative CPU seconds; it
    is read at both ends of the window and the report gets
    ``server_cpu_cores``. ``on_start``, if given, is called with the start
    time (CLOCK_MONOTONIC ns; the window opens ``warmup_s`` later) once the
    workers are told it, so a caller can time events (a fault) against the window.
    """
    spec.validate()
    c_engine = spec.engine == "c"
    if c_engine and (spec.tls or spec.tls_cafile):
        raise LoadgenError("the C engine (engine 'c') does not speak TLS; use engine 'python' with tls")
    workers = min(spec.workers, spec.connections)
    conns = _split(spec.connections, workers)
    rates = [spec.rate * c / spec.connections for c in conns]
    spec_dict = asdict(spec)
    spec_dict["workers"] = workers
    if spec.stamp_salt < 0:  # one salt per run, shared by its workers (their counters interleave)
        spec_dict["stamp_salt"] = int.from_bytes(os.urandom(2), "little")
    spec_dict["shape"] = tuple(spec.shape)
    handles: list = []
    probed: dict = {}
    probe_stop = threading.Event()
    probe_thread = None
    c_dir = None
    deadline = time.monotonic() + spec.hard_timeout() + 15
    try:
        if c_engine:
            exe = cload_binary()
            c_dir = Path(tempfile.mkdtemp(prefix="cload-"))
            frames, data_offset = build_templates(spec.app, spec.inputs, spec.dtype, spec.shape, spec.seed)
            _write_templates(c_dir / "templates.bin", frames)
            for i in range(workers):
                handles.append(_CWorkerProc(exe, spec, spec_dict, i, conns[i], rates[i], c_dir / "templates.bin",
                                            data_offset, c_dir / f"worker-{i}"))
        else:
            ctx = mp.get_context("spawn")
            for i in range(workers):
                handles.append(_PyWorkerProc(ctx, spec_dict, i, conns[i], rates[i]))
        # Every worker connected?
        ready_by = time.monotonic() + spec.connect_timeout_s + 30
        for h in handles:
            h.wait_ready(max(0.0, ready_by - time.monotonic()))
        t_start = _now() + 100_000_000  # every worker starts at the same instant
        for h in handles:
            h.start(t_start)
        if on_start is not None:
            on_start(t_start)
        if cpu_probe is not None:
            ws = t_start + int(spec.warmup_s * 1e9)
            probe_thread = threading.Thread(
                target=_sample_window,
                args=(cpu_probe, ws, ws + int(spec.duration_s * 1e9), probed, probe_stop),
                daemon=True,
            )
            probe_thread.start()
        reports = [h.wait_result(max(0.0, deadline - time.monotonic())) for h in handles]
        if probe_thread is not None:
            probe_thread.join(timeout=5)
    finally:
        probe_stop.set()
        for h in handles:
            h.join(2)
        for h in handles:
            h.reap()
        for h in handles:
            h.close()
        if c_dir is not None:
            shutil.rmtree(c_dir, ignore_errors=True)
    report = _merge(spec, workers, reports)
    report.update(probed)
    if spec.unique_inputs:
        report["stamp_salt"] = spec_dict["stamp_salt"]
    # CLOCK_MONOTONIC ns, so a caller can line other samples up with the window.
    report["t_start_ns"] = t_start
    report["window_start_ns"] = t_start + int(spec.warmup_s * 1e9)
    report["window_end_ns"] = report["window_start_ns"] + int(spec.duration_s * 1e9)
    return report


def _merge(spec: LoadSpec, workers: int, reports: list[dict]) -> dict:
    lat = np.concatenate([r["latencies_ns"] for r in reports])
    lags = np.concatenate([r["send_lags_ns"] for r in reports])
    window_ns = [r["window_ns"] for r in reports if r["window_ns"]]
    window_s = (sum(window_ns) / len(window_ns) / 1e9) if window_ns else spec.duration_s
    errors: dict[str, int] = {}
    for r in reports:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    results = sum(r["results_in_window"] for r in reports)
    defaults = sum(r["defaults"] for r in reports)
    sent = sum(r["sent_in_window"] for r in reports)
    cpu = [r["cpu_s"] for r in reports]
    cpu_total = sum(c for c in cpu if c is not None)
    good_lat = np.concatenate([r["good_latencies_ns"] for r in reports])
    default_lat = np.concatenate([r["default_latencies_ns"] for r in reports])
    err_lat: dict[str, np.ndarray] = {}
    for r in reports:
        for k, v in r["error_latencies_ns"].items():
            err_lat[k] = np.concatenate([err_lat[k], v]) if k in err_lat else v
    err_lat = dict(sorted(err_lat.items()))
    err_sent_lat: dict[str, np.ndarray] = {}
    for r in reports:
        for k, v in r.get("error_sent_latencies_ns", {}).items():
            err_sent_lat[k] = np.concatenate([err_sent_lat[k], v]) if k in err_sent_lat else v
    out = {
        "mode": spec.mode,
        "target": f"{spec.host}:{spec.port}",
        "tls": bool(spec.tls or spec.tls_cafile),
        "app": spec.app,
        "workers": workers,
        "connections": spec.connections,
        "warmup_s": spec.warmup_s,
        "duration_s": spec.duration_s,
        "window_s": round(window_s, 4),
        "inputs": spec.inputs,
        "unique_inputs": spec.unique_inputs,
        "sent": sent,
        "completed": results,
        "throughput_rps": round(results / window_s, 1),
        "goodput_rps": round(max(0, results - defaults) / window_s, 1),
        "latency_ms": _percentiles_ms(lat),
        **({"latency_cdf_ms": latency_cdf_ms(lat, spec.latency_quantiles)} if spec.latency_quantiles else {}),
        "errors": dict(sorted(errors.items())),
        "errors_total": sum(errors.values()),
        "errors_in_window": sum(r["errors_in_window"] for r in reports),
        "defaults": defaults,
        # By outcome, over the replies to requests sent in the window (latency as in latency_ms):
        "goodput_latency_ms": _percentiles_ms(good_lat),  # results from a model (not defaults)
        "default_latency_ms": _percentiles_ms(default_lat),
        "window_errors": {k: int(v.size) for k, v in err_lat.items()},  # "<code> <name>" -> count
        "error_latency_ms": {k: _percentiles_ms(v) for k, v in err_lat.items()},
        # ... from the actual send instead of the timetable: the server's and the kernel's part alone
        "error_latency_from_send_ms": {k: _percentiles_ms(v) for k, v in sorted(err_sent_lat.items())},
        "overloaded": sum(int(v.size) for k, v in err_lat.items() if k.startswith(f"{OVERLOADED_CODE} ")),
        "unfinished": sum(r["unfinished"] for r in reports),
        **({"stopped_connections": sum(r["stopped_connections"] for r in reports)} if spec.stop_on_codes else {}),
        # CLOCK_MONOTONIC ns of the (scheduled) sends of requests lost with their connection (at most
        # 100,000 per worker), so a caller can tell those in flight at an event from those sent after it.
        "lost_sent_ns": sorted(int(t) for r in reports for t in r["lost_sent_ns"]),
        "loadgen_cpu_s": round(cpu_total, 3),
        "loadgen_cpu_user_s": round(sum(r["cpu_user_s"] or 0.0 for r in reports), 3),
        "loadgen_cpu_cores": round(cpu_total / window_s, 3),
        "loadgen_cpu_per_worker": [None if c is None else round(c / window_s, 3) for c in cpu],
        "warnings": [],
    }
    if spec.deadline_ms > 0:
        limit_ns = spec.deadline_ms * 1e6
        late = int((lat > limit_ns).sum()) + sum(int((v > limit_ns).sum()) for v in err_lat.values())
        lost = errors.get("lost_in_flight", 0)
        out["deadline_ms"] = spec.deadline_ms
        out["late_replies"] = late  # replies to requests sent in the window that came after deadline_ms
        # Every request sent in the window got a reply (result, default or error) within deadline_ms.
        out["answered_by_deadline"] = late == 0 and out["unfinished"] == 0 and lost == 0
    if spec.mode == "closed":
        out["concurrency"] = spec.concurrency
        out["in_flight"] = spec.concurrency * spec.connections
    else:
        scheduled = sum(r["scheduled_in_window"] for r in reports)
        lag = _percentiles_ms(lags)
        out.update(
            rate_rps=spec.rate,
            arrivals=spec.arrivals,
            scheduled=scheduled,
            offered_rps=round(sent / window_s, 1),
            skipped=sum(r["skipped"] for r in reports),
            send_lag_ms=lag,
        )
        reasons = []
        if scheduled and sent < BEHIND_SENT_FRACTION * scheduled:
            reasons.append(f"sent {sent} of {scheduled} scheduled requests")
        if out["skipped"]:
            reasons.append(
                f"skipped {out['skipped']} requests (over {spec.max_outstanding} outstanding per worker)"
            )
        if lag["count"] and lag["p50"] > BEHIND_P50_LAG_MS:
            reasons.append(f"median send lag {lag['p50']} ms > {BEHIND_P50_LAG_MS} ms")
        if lag["count"] and lag["p99"] > BEHIND_P99_LAG_MS:
            reasons.append(f"p99 send lag {lag['p99']} ms > {BEHIND_P99_LAG_MS} ms")
        out["behind"] = bool(reasons)
        out["behind_reason"] = "; ".join(reasons) or None
        if reasons:
            out["warnings"].append("open loop fell behind its timetable: " + out["behind_reason"])
    busy = [c for c in out["loadgen_cpu_per_worker"] if c is not None and c > LOADGEN_SATURATED_CORES]
    if busy:
        out["warnings"].append(
            f"a load generator worker used {max(busy):.2f} of a core: it may be the bottleneck; add --workers"
        )
    if out["unfinished"]:
        out["warnings"].append(
            f"{out['unfinished']} requests sent in the window got no reply within the drain time"
        )
    return out


def format_summary(r: dict) -> str:
    lat = r["latency_ms"]
    head = (
        f"{r['mode']} {r['target']}{' (TLS)' if r.get('tls') else ''} app={r['app']}: "
        f"{r['throughput_rps']:,.0f} req/s"
        + (f" (offered {r['offered_rps']:,.0f} of {r['rate_rps']:,.0f})" if r["mode"] == "open" else "")
    )
    if lat["count"]:
        head += (
            f"; p50 {lat['p50']:.3f} p99 {lat['p99']:.3f} p99.9 {lat['p99.9']:.3f} max {lat['max']:.3f} ms"
        )
    if r.get("overloaded"):
        head += f"; overloaded {r['overloaded']}"
    head += (
        f"; errors {r['errors_total']} defaults {r['defaults']}"
        f"; loadgen cpu {r['loadgen_cpu_cores']:.2f} cores"
    )
    for w in r["warnings"]:
        head += f"\n  WARNING: {w}"
    return head


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.loadgen", description="Load for Clipper's msgpack query port."
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--app", default="noop")
    ap.add_argument("--mode", choices=("closed", "open"), default="closed")
    ap.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    ap.add_argument("--connections", type=int, default=1, help="in all, over the workers")
    ap.add_argument("--concurrency", type=int, default=1, help="closed loop: in flight per connection")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: total req/s")
    ap.add_argument("--arrivals", choices=("uniform", "poisson"), default="uniform")
    ap.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    ap.add_argument("--drain", type=float, default=2.0,
                    help="seconds in-flight requests get after the window")
    ap.add_argument("--inputs", type=int, default=16, help="distinct inputs in the pool")
    ap.add_argument("--unique-inputs", action="store_true", help="make every input distinct (defeats caches)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--shape", default="784", help="comma-separated, e.g. 28,28")
    ap.add_argument("--send-quantum-us", type=float, default=0.0,
                    help="open loop: wake the sender at most this often (trades send lag for CPU)")
    ap.add_argument("--timeout", type=float, default=None, help="hard timeout, seconds")
    ap.add_argument("--latency-quantiles", type=int, default=0,
                    help="report latency_cdf_ms at this many even quantile steps (plus the tail)")
    ap.add_argument("--tls", action="store_true", help="connect with TLS (verifying the server's certificate)")
    ap.add_argument("--cafile", default=None, help="PEM file of the CA to trust (implies --tls)")
    ap.add_argument("--deadline-ms", type=float, default=0.0,
                    help="count replies later than this after their (scheduled) send (0: no deadline)")
    ap.add_argument("--engine", choices=ENGINES, default="python",
                    help="worker processes: python (uvloop) or c (bench/cload, less CPU per request; no TLS)")
    ap.add_argument("--json", action="store_true", help="print the full report as JSON")
    args = ap.parse_args(argv)
    spec = LoadSpec(
        port=args.port,
        host=args.host,
        app=args.app,
        mode=args.mode,
        workers=args.workers,
        connections=args.connections,
        concurrency=args.concurrency,
        rate=args.rate,
        arrivals=args.arrivals,
        duration_s=args.duration,
        warmup_s=args.warmup,
        drain_s=args.drain,
        inputs=args.inputs,
        unique_inputs=args.unique_inputs,
        dtype=args.dtype,
        shape=tuple(int(d) for d in args.shape.split(",") if d),
        send_quantum_us=args.send_quantum_us,
        hard_timeout_s=args.timeout,
        latency_quantiles=args.latency_quantiles,
        tls=args.tls,
        tls_cafile=args.cafile,
        deadline_ms=args.deadline_ms,
        engine=args.engine,
    )
    try:
        report = run_load(spec)
    except (LoadgenError, ValueError) as exc:
        print(f"loadgen: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_summary(report))
    return 1 if report["errors_total"] else 0


if __name__ == "__main__":
    sys.exit(main())
