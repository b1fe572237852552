"""Abusive clients and faults against one frontend: what they cost a well-behaved client.

    python -m bench.abuse --scenario all --out bench/results/abuse.json

The scenarios of issue 10's "Done when", each on a fresh frontend
(``python -m clipper start``, ``containers/examples/noop.toml``, the cache
off), each bounded in time and stopping by itself, all traffic on loopback:

=========== ==================================================================
``frames``     (a) 48 connections each holding a frame of ``max_frame_bytes``
               minus one byte (the length prefix says ``max_frame_bytes``; the
               last byte never comes)
``nonreaders`` (b) 8 clients that pipeline requests (HELLOs by default: the
               largest reply for the smallest request) and never read a reply
``slowloris``  (c) 4,096 connections on the REST port and 4,096 on the msgpack
               port, each sending one byte of a request head (or frame) a second,
               reopened when the server closes them; the client is measured after
               ``--slowloris-hold-s`` (12 s: past a 10 s header timeout)
``metrics``    (d) 20,000 pipelined ``GET /metrics`` on one connection, never read
``bigframes``  (e) one client streaming 15.7 MB PREDICT frames whose input is a
               nested list of 784 x 20,000 small integers (1 byte each in msgpack;
               msgpack floats would not fit in a 16 MiB frame)
``sigstop``    (f) the only replica SIGSTOPped for 10 s under an open loop of
               12k req/s: QUEUE_FULL errors, RSS, every query answered by its
               deadline (SLO + ``--deadline-margin-ms``)?
``register``   (g) 2,000 applications registered through the admin API while a
               client PINGs: PING p99, registration latency
``sigterm``    (h) SIGTERM to the frontend under an open loop: requests left
               without a reply (neither a result nor an error such as SHUTTING_DOWN);
               a connection told SHUTTING_DOWN sends nothing more
=========== ==================================================================

For (a)-(e) the well-behaved client is ``bench.loadgen``, msgpack, pipelined
(closed loop, ``--client-level``, new connections each run), measured alone and
then under the abuse; the ratio is the figure. A PING prober (its own process,
one PING in flight, one every 2 ms) runs throughout. The frontend's RSS (``VmRSS``
of the ``clipper start`` process) is sampled every 0.2 s; the growth is the peak
during the abuse minus the value just before it.

The abusers run on an asyncio loop in a thread of this process (non-blocking
sockets, no copies of the large buffers); this process raises its soft
RLIMIT_NOFILE to the hard limit first, and the frontend inherits it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import numpy as np

from clipper._native import framing
from clipper.protocol import wire

from .harness import NOOP_TOML, RssSampler, container_pids, raise_nofile, rss_mb, write_deployment
from .loadgen import LoadgenError, LoadSpec, format_summary, run_load
from .run import REPO, Server, TargetError, clipper_server, machine_info, parse_sweep

SCENARIOS = {
    "frames": "a", "nonreaders": "b", "slowloris": "c", "metrics": "d", "bigframes": "e", "sigstop": "f",
    "register": "g", "sigterm": "h",
}
RATIO_BAR = 0.8  # "Done when": the well-behaved client keeps 80% of its solo throughput ...
RSS_BAR_MB = 256.0  # ... and the frontend grows by less than 256 MB
SIGSTOP_RSS_BAR_MB = 64.0
PING_BAR_MS = 5.0

_now = time.monotonic_ns


# ------------------------------------------------------------------ the PING prober
def _ping_main(pipe, port: int, gap_s: float, max_s: float) -> None:
    """A process: one PING in flight on one connection until told to stop; sends back the RTTs."""
    signal.alarm(int(max_s) + 10)
    rtts: list[float] = []
    stamps: list[float] = []
    errors: dict[str, int] = {}
    reader = framing.FrameReader(1 << 20)
    sock = None
    rid = 0
    t_end = time.monotonic() + max_s
    pipe.send("ready")
    while time.monotonic() < t_end and not pipe.poll(0):
        try:
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader = framing.FrameReader(1 << 20)
            rid += 1
            t0 = time.monotonic_ns()
            sock.sendall(framing.pack_frame(wire.pack(wire.ping(rid))))
            got = False
            while not got:
                # A stalled server shows as one long RTT (up to 30 s), not as a gap in the samples.
                sock.settimeout(30)
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed by the server")
                for body in reader.feed(data):
                    msg = msgpack.unpackb(body) if type(body) is not int else None
                    if msg and msg[0] == wire.PONG and msg[1] == rid:
                        got = True
                    elif msg and msg[0] == wire.ERROR:
                        errors[f"{msg[2]} {msg[3]}"] = errors.get(f"{msg[2]} {msg[3]}", 0) + 1
            rtts.append((time.monotonic_ns() - t0) / 1e6)
            stamps.append(t0 / 1e9)
        except (OSError, ConnectionError) as exc:
            key = type(exc).__name__
            errors[key] = errors.get(key, 0) + 1
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.1)
        time.sleep(gap_s)
    if sock is not None:
        sock.close()
    pipe.send({"rtts_ms": rtts, "t_s": stamps, "errors": errors})


class PingProbe:
    """PINGs from another process (so this one's threads do not skew it); :meth:`window` gives the
    percentiles of the RTTs of PINGs sent between two ``time.monotonic()`` instants."""

    def __init__(self, port: int, gap_ms: float = 2.0, max_s: float = 600.0) -> None:
        ctx = mp.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_ping_main, args=(child, port, gap_ms / 1000, max_s), daemon=True)
        self.proc.start()
        child.close()
        if not self.pipe.poll(30):
            raise TargetError("the PING prober did not start")
        self.pipe.recv()
        self.data: dict | None = None

    def stop(self) -> dict:
        if self.data is None:
            try:
                self.pipe.send("stop")
                self.data = self.pipe.recv() if self.pipe.poll(40) else {"rtts_ms": [], "t_s": [], "errors": {}}
            except (OSError, EOFError):
                self.data = {"rtts_ms": [], "t_s": [], "errors": {"prober_died": 1}}
            self.proc.join(5)
            if self.proc.is_alive():
                self.proc.kill()
        return self.data

    def window(self, t_from: float, t_to: float) -> dict:
        d = self.stop()
        v = [r for r, t in zip(d["rtts_ms"], d["t_s"]) if t_from <= t < t_to]
        return pct(v)


def pct(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    a = np.asarray(values)
    return {"count": len(values), "p50": round(float(np.percentile(a, 50)), 3),
            "p99": round(float(np.percentile(a, 99)), 3), "max": round(float(a.max()), 3)}


# ------------------------------------------------------------------ the abusers
class AbuseLoop:
    """An asyncio loop in a thread of this process, for the abusive clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="abusers", daemon=True)
        self.thread.start()

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, coro, timeout: float):
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        try:
            self.loop.close()
        except RuntimeError:
            pass


async def _close_all(socks) -> None:
    """Close sockets once the loop has run the callbacks of cancelled sock_* calls on them."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for s in socks:
        s.close()


async def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port)), 10)
    except BaseException:
        s.close()
        raise
    return s


def _peer_closed(s: socket.socket) -> bool | None:
    """True when the server closed ``s`` (EOF or reset), False when it is open, None when unknown."""
    try:
        data = s.recv(65536, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:
        return True
    if data == b"":
        return True
    # Something came (an error reply): drain it and look again.
    try:
        s.recv(65536, socket.MSG_DONTWAIT)
    except OSError:
        return True
    return None


class Abuser:
    """One abusive workload: :meth:`start` sets it up and returns when it is in effect (or its setup time
    is up), it keeps going until :meth:`stop`; ``stats`` says what it did."""

    def __init__(self, loop: AbuseLoop) -> None:
        self.al = loop
        self.stats: dict = {}
        self._stop: asyncio.Event | None = None
        self._main = None

    async def _run(self, ready: asyncio.Future) -> None:
        raise NotImplementedError

    def start(self, setup_timeout_s: float) -> dict:
        async def go():
            self._stop = asyncio.Event()
            ready = asyncio.get_running_loop().create_future()
            self._main = asyncio.ensure_future(self._run(ready))
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.shield(ready), setup_timeout_s)
            except TimeoutError:
                self.stats["setup_timed_out"] = True
            self.stats["setup_s"] = round(time.monotonic() - t0, 2)

        self.al.call(go(), setup_timeout_s + 30)
        return self.stats

    def stop(self) -> dict:
        async def halt():
            self._stop.set()
            try:
                await asyncio.wait_for(self._main, 20)
            except TimeoutError:
                self._main.cancel()
                self.stats["stop_timed_out"] = True
            except Exception as exc:
                self.stats["error"] = f"{type(exc).__name__}: {exc}"

        self.al.call(halt(), 60)
        return self.stats


class PartialFrames(Abuser):
    """(a) ``n`` connections, each sends a length prefix of ``frame_bytes`` and ``frame_bytes - 1`` bytes."""

    def __init__(self, loop, port: int, n: int, frame_bytes: int) -> None:
        super().__init__(loop)
        self.port, self.n, self.frame_bytes = port, n, frame_bytes

    async def _run(self, ready) -> None:
        loop = asyncio.get_running_loop()
        body = memoryview(bytes(self.frame_bytes - 1))  # one zero-filled buffer, shared by every connection
        st = self.stats
        st.update(connections=self.n, frame_bytes=self.frame_bytes, filled=0, closed_by_server=0, connect_failed=0)
        socks = []

        async def fill(s):
            try:
                await loop.sock_sendall(s, struct.pack(">I", self.frame_bytes))
                await loop.sock_sendall(s, body)
                st["filled"] += 1
            except OSError:
                st["closed_by_server"] += 1

        for _ in range(self.n):
            try:
                socks.append(await _connect(self.port))
            except OSError:
                st["connect_failed"] += 1
        tasks = [asyncio.ensure_future(fill(s)) for s in socks]
        done_all = asyncio.ensure_future(asyncio.gather(*tasks, return_exceptions=True))
        await asyncio.wait([done_all, asyncio.ensure_future(self._stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.set_result(None)
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        st["closed_by_server"] += sum(1 for s in socks if _peer_closed(s))
        await _close_all(socks)


def _hello_frame() -> bytes:
    return framing.pack_frame(wire.pack(wire.hello(1, [wire.PROTOCOL_VERSION], "abuse")))


def _predict_frames(app: str, k: int) -> bytes:
    x = np.random.default_rng(0).standard_normal(784).astype(np.float32)
    return b"".join(framing.pack_frame(wire.pack(wire.predict(i, app, x))) for i in range(k))


class NonReaders(Abuser):
    """(b) ``n`` connections that pipeline requests as fast as the server takes them and never read."""

    def __init__(self, loop, port: int, n: int, kind: str, app: str) -> None:
        super().__init__(loop)
        self.port, self.n, self.kind, self.app = port, n, kind, app

    async def _run(self, ready) -> None:
        loop = asyncio.get_running_loop()
        batch = _hello_frame() * 512 if self.kind == "hello" else _predict_frames(self.app, 64)
        st = self.stats
        st.update(connections=self.n, kind=self.kind, batch_bytes=len(batch), sent_bytes=0, closed_by_server=0)
        progress = [time.monotonic()]

        async def pump(s):
            try:
                while not self._stop.is_set():
                    await loop.sock_sendall(s, batch)
                    st["sent_bytes"] += len(batch)
                    progress[0] = time.monotonic()
            except OSError:
                st["closed_by_server"] += 1

        socks = [await _connect(self.port, rcvbuf=4096) for _ in range(self.n)]
        tasks = [asyncio.ensure_future(pump(s)) for s in socks]
        # In effect once every sender is blocked (the server stopped reading them) or after the setup time.
        while not self._stop.is_set():
            await asyncio.sleep(0.25)
            if time.monotonic() - progress[0] > 1.0 and not ready.done():
                st["stalled_after_s"] = round(time.monotonic() - progress[0], 2)
                ready.set_result(None)
        if not ready.done():
            ready.set_result(None)
        for t in tasks:
            t.cancel()
        st["requests_sent"] = st["sent_bytes"] // (len(batch) // (512 if self.kind == "hello" else 64))
        await _close_all(socks)


class Slowloris(Abuser):
    """(c) ``n`` connections per port, each sending the next byte of a never-ending request every second;
    a connection the server closes is opened again (as an attacker would), up to ``n`` per port.

    In effect after ``hold_s``: long enough for a server's header timeout to have fired once, so the
    client is measured in the steady state, not in the first seconds."""

    REST_HEAD = (b"POST /noop/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + b"".join(b"X-Slow-%d: %d\r\n" % (i, i) for i in range(10_000)))
    MSGPACK_HEAD = struct.pack(">I", 4096) + bytes(4096)  # a frame whose body comes at one byte a second

    def __init__(self, loop, ports: dict[str, int], n: int, interval_s: float = 1.0, hold_s: float = 0.0) -> None:
        super().__init__(loop)
        self.ports, self.n, self.interval_s, self.hold_s = ports, n, interval_s, hold_s

    async def _run(self, ready) -> None:
        st = self.stats
        conns: list[list] = []  # [socket, port name, next byte index, alive]
        for name, port in self.ports.items():
            st[name] = {"wanted": self.n, "opened": 0, "connect_failed": 0, "closed_by_server": 0,
                        "reopened": 0, "first_error": None}

        async def open_one(name, port):
            try:
                s = await _connect(port, rcvbuf=4096)
            except OSError as exc:
                st[name]["connect_failed"] += 1
                st[name]["first_error"] = st[name]["first_error"] or repr(exc)
                return
            st[name]["opened"] += 1
            conns.append([s, name, 0, True])

        for name, port in self.ports.items():
            for start in range(0, self.n, 256):
                if self._stop.is_set():
                    break
                await asyncio.gather(*(open_one(name, port) for _ in range(min(256, self.n - start))))
        heads = {"rest": self.REST_HEAD, "msgpack": self.MSGPACK_HEAD}
        rounds = 0
        t_open = time.monotonic()
        while not self._stop.is_set():
            dead = [c for c in conns if not c[3]]
            if dead:  # keep n per port: open again what the server closed
                for c in dead:
                    conns.remove(c)
                    c[0].close()
                for start in range(0, len(dead), 256):
                    chunk = dead[start:start + 256]
                    await asyncio.gather(*(open_one(c[1], self.ports[c[1]]) for c in chunk))
                    for c in chunk:
                        st[c[1]]["reopened"] += 1
            for c in conns:
                if not c[3]:
                    continue
                s, name, i, _ = c
                head = heads[name]
                try:
                    s.send(head[i % len(head):i % len(head) + 1])
                    c[2] = i + 1
                except BlockingIOError:
                    pass
                except OSError:
                    c[3] = False
                    st[name]["closed_by_server"] += 1
                    continue
                if rounds % 5 == 0 and _peer_closed(s):
                    c[3] = False
                    st[name]["closed_by_server"] += 1
            rounds += 1
            if not ready.done() and time.monotonic() - t_open >= self.hold_s:
                ready.set_result(None)
            try:
                await asyncio.wait_for(self._stop.wait(), self.interval_s)
            except TimeoutError:
                pass
        st["rounds"] = rounds
        for name in self.ports:
            st[name]["alive_at_end"] = sum(1 for c in conns if c[1] == name and c[3])
        await _close_all([c[0] for c in conns])


class MetricsFlood(Abuser):
    """(d) ``n`` pipelined ``GET /metrics`` on one connection, never read."""

    def __init__(self, loop, port: int, n: int) -> None:
        super().__init__(loop)
        self.port, self.n = port, n

    async def _run(self, ready) -> None:
        loop = asyncio.get_running_loop()
        req = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        st = self.stats
        st.update(requests=self.n, sent_requests=0, closed_by_server=False)
        s = await _connect(self.port, rcvbuf=4096)
        chunk = 500
        try:
            for i in range(0, self.n, chunk):
                k = min(chunk, self.n - i)
                send = asyncio.ensure_future(loop.sock_sendall(s, req * k))
                stop = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait([send, stop], return_when=asyncio.FIRST_COMPLETED)
                if not send.done():
                    send.cancel()
                    st["stalled"] = True
                    break
                stop.cancel()
                send.result()
                st["sent_requests"] += k
        except OSError:
            st["closed_by_server"] = True
        if not ready.done():
            ready.set_result(None)
        await self._stop.wait()
        st["closed_by_server"] = st["closed_by_server"] or bool(_peer_closed(s))
        await _close_all([s])


def big_list_frame(app: str, rows: int = 784, cols: int = 20_000) -> bytes:
    """A PREDICT frame whose input is a nested list ``rows`` x ``cols`` of small ints (1 byte each)."""
    row = b"\xdc" + struct.pack(">H", cols) + bytes(i % 100 for i in range(cols))
    outer = (b"\xdc" + struct.pack(">H", rows)) if rows < 65536 else (b"\xdd" + struct.pack(">I", rows))
    body = b"\x94\x01\xce\x00\x00\x00\x01" + msgpack.packb(app) + outer + row * rows
    return framing.pack_frame(body)


class BigFrames(Abuser):
    """(e) one client streaming large nested-list PREDICT frames back to back, reading its replies."""

    def __init__(self, loop, port: int, app: str, rows: int, cols: int) -> None:
        super().__init__(loop)
        self.port, self.app, self.rows, self.cols = port, app, rows, cols

    async def _run(self, ready) -> None:
        loop = asyncio.get_running_loop()
        frame = memoryview(big_list_frame(self.app, self.rows, self.cols))
        st = self.stats
        st.update(frame_bytes=len(frame), shape=[self.rows, self.cols], frames_sent=0, replies={},
                  closed_by_server=False)
        s = await _connect(self.port)
        reader = framing.FrameReader(1 << 26)

        async def read():
            while not self._stop.is_set():
                try:
                    data = await loop.sock_recv(s, 1 << 20)
                except OSError:
                    break
                if not data:
                    st["closed_by_server"] = True
                    break
                for body in reader.feed(data):
                    if type(body) is int:
                        continue
                    msg = msgpack.unpackb(body)
                    key = "result" if msg[0] == wire.RESULT else (f"{msg[2]} {msg[3]}" if msg[0] == wire.ERROR
                                                                   else str(msg[0]))
                    st["replies"][key] = st["replies"].get(key, 0) + 1

        reading = asyncio.ensure_future(read())
        try:
            while not self._stop.is_set():
                send = asyncio.ensure_future(loop.sock_sendall(s, frame))
                stop = asyncio.ensure_future(self._stop.wait())
                await asyncio.wait([send, stop], return_when=asyncio.FIRST_COMPLETED)
                if not send.done():
                    send.cancel()
                    break
                stop.cancel()
                send.result()
                st["frames_sent"] += 1
                if not ready.done():
                    ready.set_result(None)
        except OSError:
            st["closed_by_server"] = True
        if not ready.done():
            ready.set_result(None)
        await self._stop.wait()
        reading.cancel()
        await _close_all([s])


# ------------------------------------------------------------------ measurement helpers
def rest_probe(port: int, n: int = 10, timeout_s: float = 2.0) -> dict:
    """``n`` new REST connections, one POST each: how many got an answer (any HTTP status) in time."""
    import http.client

    body = json.dumps({"input": [0.0] * 784})
    out = {"tried": n, "status": {}, "failed": {}}
    lat = []
    for _ in range(n):
        t0 = time.monotonic()
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
            c.request("POST", "/noop/predict", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            out["status"][str(r.status)] = out["status"].get(str(r.status), 0) + 1
            lat.append((time.monotonic() - t0) * 1000)
            c.close()
        except (OSError, http.client.HTTPException) as exc:
            k = type(exc).__name__
            out["failed"][k] = out["failed"].get(k, 0) + 1
    out["ok"] = out["status"].get("200", 0)
    out["latency_ms"] = pct(lat)
    return out


def _client(args, port: int, label: str, log, **kw) -> dict:
    c, d = args.client_level
    spec = LoadSpec(port=port, app=args.app, mode="closed", connections=c, concurrency=d,
                    duration_s=args.duration, warmup_s=args.warmup, drain_s=2.0, connect_timeout_s=5.0, **kw)
    try:
        r = run_load(spec)
    except LoadgenError as exc:
        log(f"    {label}: the client could not run: {exc}")
        return {"throughput_rps": 0.0, "goodput_rps": 0.0, "error": str(exc)}
    log(f"    {label}: {format_summary(r)}")
    keep = ("throughput_rps", "goodput_rps", "latency_ms", "errors", "errors_total", "defaults", "unfinished",
            "loadgen_cpu_cores", "window_s", "sent")
    return {k: r[k] for k in keep}


class ScenarioFrontend:
    """A fresh ``clipper start`` for one scenario, with its RSS sampler."""

    def __init__(self, args, tmp: Path, tag: str, **variant) -> None:
        cfg = write_deployment(args.config, tmp / f"{tag}.toml", **variant) if variant else args.config
        self.server: Server = clipper_server(cfg, tmp, args.ready_timeout, args.clipper_cmd.split(), tag)
        self.info = self.server.start()
        self.pid = self.server.proc.pid
        self.rss = RssSampler(self.pid, 0.2).start()

    def port(self, name: str) -> int:
        return int(self.info[f"{name}_port"])

    def rss_between(self, t_from: float, t_to: float) -> dict:
        """RSS figures (MiB) of the samples in [t_from, t_to] (time.monotonic), against the last one before."""
        t0 = self.rss.t0
        before = [v for t, v in self.rss.series if t + t0 < t_from]
        during = [v for t, v in self.rss.series if t_from <= t + t0 <= t_to]
        base = before[-1] if before else (during[0] if during else None)
        if base is None or not during:
            return {"baseline_mb": base}
        return {"baseline_mb": base, "peak_mb": max(during), "end_mb": during[-1],
                "growth_mb": round(max(during) - base, 1)}

    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def stop(self) -> dict:
        self.rss.stop()
        alive = self.alive()
        code = self.server.stop()
        return {"alive_at_end": alive, "exit_code": code, "log_tail": None if alive else self.server.log_tail(15)}


def ping_once(port: int, timeout_s: float = 5.0) -> float | None:
    """One PING on a new connection: its RTT in ms, or None if no PONG came in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            t0 = time.monotonic()
            s.sendall(framing.pack_frame(wire.pack(wire.ping(7))))
            reader = framing.FrameReader(1 << 20)
            while True:
                data = s.recv(65536)
                if not data:
                    return None
                for body in reader.feed(data):
                    if type(body) is not int and msgpack.unpackb(body)[0] == wire.PONG:
                        return round((time.monotonic() - t0) * 1000, 3)
    except OSError:
        return None


def abuse_scenario(args, tmp: Path, name: str, make_abuser, log, setup_timeout_s: float = 30.0,
                   probe_rest: bool = False) -> dict:
    """Solo client, then the abuse: set up, client under it, stop. Returns the scenario's record."""
    fe = ScenarioFrontend(args, tmp, name)
    al = AbuseLoop()
    out: dict = {"ready_info": fe.info}
    probe = None
    abuser = None
    try:
        probe = PingProbe(fe.port("query"))
        t_solo0 = time.monotonic()
        out["solo"] = _client(args, fe.port("query"), "solo", log)
        t_solo1 = time.monotonic()
        if probe_rest:
            out["rest_probe_solo"] = rest_probe(fe.port("rest"), n=args.rest_probes)
        abuser = make_abuser(al, fe)
        t_abuse = time.monotonic()
        out["abuse_setup"] = dict(abuser.start(setup_timeout_s))
        log(f"    abuse in effect after {out['abuse_setup'].get('setup_s')} s: "
            f"{ {k: v for k, v in abuser.stats.items() if k != 'replies'} }")
        t_u0 = time.monotonic()
        out["under_abuse"] = _client(args, fe.port("query"), "under abuse", log)
        t_u1 = time.monotonic()
        if probe_rest:
            out["rest_probe_under_abuse"] = rest_probe(fe.port("rest"), n=args.rest_probes)
        out["abuse"] = dict(abuser.stop())
        abuser = None
        t_end = time.monotonic()
        time.sleep(1.0)
        out["rss"] = fe.rss_between(t_abuse, t_end)
        out["rss"]["after_abuse_mb"] = rss_mb(fe.pid)
        out["ping_solo_ms"] = probe.window(t_solo0, t_solo1)
        out["ping_under_abuse_ms"] = probe.window(t_u0, t_u1)
        out["ping_errors"] = probe.stop()["errors"]
        out["ping_after_ms"] = ping_once(fe.port("query"))
    finally:
        if abuser is not None:
            try:
                abuser.stop()
            except Exception:
                pass
        if probe is not None:
            probe.stop()
        al.close()
        out["frontend"] = fe.stop()
    solo = out["solo"].get("throughput_rps") or 0
    under = out["under_abuse"].get("throughput_rps") or 0
    out["throughput_ratio"] = round(under / solo, 4) if solo else None
    growth = out["rss"].get("growth_mb")
    out["done_when_met"] = bool(out["throughput_ratio"] is not None and out["throughput_ratio"] >= RATIO_BAR
                                and growth is not None and growth < RSS_BAR_MB and out["frontend"]["alive_at_end"])
    return out


# ------------------------------------------------------------------ the scenarios
def scen_frames(args, tmp, log):
    from clipper.config import Limits

    frame = Limits().max_frame_bytes
    return abuse_scenario(args, tmp, "frames", lambda al, fe: PartialFrames(al, fe.port("query"), args.frames,
                                                                            frame), log, setup_timeout_s=60)


def scen_nonreaders(args, tmp, log):
    return abuse_scenario(args, tmp, "nonreaders",
                          lambda al, fe: NonReaders(al, fe.port("query"), args.nonreaders, args.nonreader_kind,
                                                    args.app), log, setup_timeout_s=args.nonreader_fill_s)


def scen_slowloris(args, tmp, log):
    out = abuse_scenario(args, tmp, "slowloris",
                         lambda al, fe: Slowloris(al, {"rest": fe.port("rest"), "msgpack": fe.port("query")},
                                                  args.slowloris, hold_s=args.slowloris_hold_s), log,
                         setup_timeout_s=120 + args.slowloris_hold_s, probe_rest=True)
    opened = {k: out["abuse"].get(k, {}).get("opened") for k in ("rest", "msgpack")}
    out["fewer_opened_than_asked"] = {k: v for k, v in opened.items() if v is not None and v < args.slowloris}
    rp = out.get("rest_probe_under_abuse", {})
    out["done_when_met"] = out["done_when_met"] and rp.get("ok", 0) == rp.get("tried", 0)
    return out


def scen_metrics(args, tmp, log):
    return abuse_scenario(args, tmp, "metrics",
                          lambda al, fe: MetricsFlood(al, fe.port("metrics"), args.metrics_requests), log,
                          setup_timeout_s=30)


def scen_bigframes(args, tmp, log):
    return abuse_scenario(args, tmp, "bigframes",
                          lambda al, fe: BigFrames(al, fe.port("query"), args.app, 784, 20_000), log,
                          setup_timeout_s=30)


def scen_sigstop(args, tmp, log):
    """(f) SIGSTOP the only replica for ``stop_s`` under an open loop; SIGCONT; count what came back."""
    fe = ScenarioFrontend(args, tmp, "sigstop")
    out: dict = {"ready_info": fe.info, "rate_rps": args.sigstop_rate, "stop_s": args.stop_s}
    try:
        pids = container_pids(fe.pid)
        if len(pids) != 1:
            raise TargetError(f"expected one container, found {pids}")
        pid = pids[0]
        slo = args.slo_ms
        pre, post = 2.0, 5.0
        events: dict = {}

        def on_start(t_start_ns: int) -> None:
            t_stop = t_start_ns / 1e9 + args.warmup + pre

            def fault():
                time.sleep(max(0.0, t_stop - time.monotonic()))
                events["rss_before_mb"] = rss_mb(fe.pid)
                events["t_stop"] = time.monotonic()
                os.kill(pid, signal.SIGSTOP)
                time.sleep(args.stop_s)
                events["rss_at_cont_mb"] = rss_mb(fe.pid)
                os.kill(pid, signal.SIGCONT)
                events["t_cont"] = time.monotonic()

            threading.Thread(target=fault, daemon=True).start()

        spec = LoadSpec(port=fe.port("query"), app=args.app, mode="open", rate=args.sigstop_rate, arrivals="poisson",
                        connections=4, duration_s=pre + args.stop_s + post, warmup_s=args.warmup, drain_s=3.0,
                        send_quantum_us=100, deadline_ms=slo + args.deadline_margin_ms)
        try:
            r = run_load(spec, cpu_probe=fe.server.cpu_seconds, on_start=on_start)
        finally:
            try:  # never leave the replica stopped
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        log(f"    {format_summary(r)}")
        t_end = time.monotonic()
        out["rss"] = fe.rss_between(events.get("t_stop", t_end), t_end)
        out["rss"].update({k: v for k, v in events.items() if k.endswith("_mb")})
        keep = ("sent", "throughput_rps", "goodput_rps", "defaults", "window_errors", "errors", "unfinished",
                "latency_ms", "goodput_latency_ms", "default_latency_ms", "error_latency_ms", "deadline_ms",
                "late_replies", "answered_by_deadline", "offered_rps", "behind", "loadgen_cpu_cores",
                "server_cpu_cores", "send_lag_ms", "warnings")
        out["load"] = {k: r[k] for k in keep if k in r}
        out["queue_full"] = sum(v for k, v in r["errors"].items() if k.startswith("306 "))
        out["lost_in_flight"] = r["errors"].get("lost_in_flight", 0)
        growth = out["rss"].get("growth_mb")
        out["done_when_met"] = bool(out["queue_full"] == 0 and r.get("answered_by_deadline")
                                    and growth is not None and growth < SIGSTOP_RSS_BAR_MB)
    finally:
        out["frontend"] = fe.stop()
    return out


def scen_register(args, tmp, log):
    """(g) register ``n`` applications through the admin API while a client PINGs."""
    from clipper.management.admin_client import AdminClient

    fe = ScenarioFrontend(args, tmp, "register")
    out: dict = {"ready_info": fe.info, "apps_wanted": args.apps}
    probe = None
    try:
        probe = PingProbe(fe.port("query"))
        t0 = time.monotonic()
        time.sleep(2.0)
        t1 = time.monotonic()
        admin = AdminClient("127.0.0.1", fe.port("admin"))
        lat = []
        deadline = time.monotonic() + args.register_timeout_s
        failed: dict = {}
        for i in range(args.apps):
            if time.monotonic() > deadline:
                break
            a = time.monotonic()
            try:
                admin.register_application(f"abuse-app-{i:05d}", "float32", [784], 20.0, default_output=-1.0)
            except Exception as exc:
                failed[type(exc).__name__] = failed.get(type(exc).__name__, 0) + 1
            lat.append((time.monotonic() - a) * 1000)
        t2 = time.monotonic()
        out["registered"] = len(lat) - sum(failed.values())
        out["failed"] = failed
        out["register_s"] = round(t2 - t1, 2)
        out["register_latency_ms"] = {**pct(lat), "first": round(lat[0], 2) if lat else None,
                                      "last": round(lat[-1], 2) if lat else None,
                                      "first_100_mean": round(statistics.mean(lat[:100]), 2) if lat else None,
                                      "last_100_mean": round(statistics.mean(lat[-100:]), 2) if lat else None}
        out["rss"] = fe.rss_between(t1, t2)
        out["ping_solo_ms"] = probe.window(t0, t1)
        out["ping_during_ms"] = probe.window(t1, t2)
        out["ping_errors"] = probe.stop()["errors"]
        p99 = out["ping_during_ms"]["p99"]
        out["done_when_met"] = bool(out["registered"] == args.apps and p99 is not None and p99 < PING_BAR_MS)
        log(f"    registered {out['registered']} in {out['register_s']} s; PING p99 {out['ping_solo_ms']['p99']} -> "
            f"{p99} ms (max {out['ping_during_ms']['max']})")
    finally:
        if probe is not None:
            probe.stop()
        out["frontend"] = fe.stop()
    return out


def scen_sigterm(args, tmp, log):
    """(h) SIGTERM the frontend (its own pid) under an open loop; count requests left without a reply."""
    fe = ScenarioFrontend(args, tmp, "sigterm")
    out: dict = {"ready_info": fe.info, "rate_rps": args.sigterm_rate}
    events: dict = {}
    try:
        def on_start(t_start_ns: int) -> None:
            t_term = t_start_ns / 1e9 + args.warmup + 2.0

            def term():
                time.sleep(max(0.0, t_term - time.monotonic()))
                events["t_term"] = time.monotonic()
                os.kill(fe.pid, signal.SIGTERM)
                try:
                    fe.server.proc.wait(timeout=60)
                    events["exit_s"] = round(time.monotonic() - events["t_term"], 3)
                    events["exit_code"] = fe.server.proc.returncode
                except Exception:
                    events["exit_s"] = None

            threading.Thread(target=term, daemon=True).start()

        # A well-behaved client: a connection told SHUTTING_DOWN sends nothing more (stop_on_codes).
        spec = LoadSpec(port=fe.port("query"), app=args.app, mode="open", rate=args.sigterm_rate, arrivals="poisson",
                        connections=4, duration_s=5.0, warmup_s=args.warmup, drain_s=15.0, send_quantum_us=100,
                        stop_on_codes=(310,))
        r = run_load(spec, on_start=on_start)
        log(f"    {format_summary(r)}")
        for _ in range(100):
            if "exit_s" in events:
                break
            time.sleep(0.1)
        keep = ("sent", "throughput_rps", "defaults", "window_errors", "errors", "unfinished", "latency_ms",
                "skipped", "stopped_connections", "warnings")
        out["load"] = {k: r[k] for k in keep if k in r}
        out["events"] = events
        out["without_reply"] = r["errors"].get("lost_in_flight", 0) + r["unfinished"]
        t_term_ns = int(events["t_term"] * 1e9) if "t_term" in events else None
        lost = r.get("lost_sent_ns", [])
        # In flight at the SIGTERM and never answered: what a drain must not drop. Sent after it, a
        # request races the connection's close (the client cannot know yet): counted apart.
        out["lost_sent_before_sigterm"] = sum(1 for t in lost if t_term_ns is not None and t < t_term_ns)
        out["lost_sent_after_sigterm"] = len(lost) - out["lost_sent_before_sigterm"]
        out["shutting_down_errors"] = sum(v for k, v in r["errors"].items() if k.startswith("310 "))
        out["done_when_met"] = out["lost_sent_before_sigterm"] == 0 and r["unfinished"] == 0
    finally:
        out["frontend"] = fe.stop()
    return out


RUNNERS = {"frames": scen_frames, "nonreaders": scen_nonreaders, "slowloris": scen_slowloris, "metrics": scen_metrics,
           "bigframes": scen_bigframes, "sigstop": scen_sigstop, "register": scen_register, "sigterm": scen_sigterm}


def summary_line(name: str, r: dict) -> str:
    tag = f"({SCENARIOS[name]}) {name}"
    if "error" in r:
        return f"{tag}: FAILED: {r['error'].splitlines()[0]}"
    mark = "meets" if r.get("done_when_met") else "misses"
    if name == "sigstop":
        ld = r["load"]
        return (f"{tag}: {r['stop_s']:g} s SIGSTOP at {r['rate_rps']:,.0f} req/s: QUEUE_FULL {r['queue_full']}, "
                f"late replies {ld.get('late_replies')} (deadline {ld.get('deadline_ms')} ms), unanswered "
                f"{ld['unfinished'] + r['lost_in_flight']}, defaults {ld['defaults']}; RSS "
                f"+{r['rss'].get('growth_mb')} MB [{mark} the bar]")
    if name == "register":
        lat = r["register_latency_ms"]
        return (f"{tag}: {r['registered']}/{r['apps_wanted']} apps in {r['register_s']} s (first {lat['first']} ms, "
                f"last {lat['last']} ms); PING p99 {r['ping_solo_ms']['p99']} -> {r['ping_during_ms']['p99']} ms "
                f"(max {r['ping_during_ms']['max']}) [{mark} the bar]")
    if name == "sigterm":
        ev = r["events"]
        return (f"{tag}: SIGTERM at {r['rate_rps']:,.0f} req/s: {r['without_reply']} requests without a reply of "
                f"{r['load']['sent']} sent in the window ({r['lost_sent_before_sigterm']} of them in flight at the "
                f"SIGTERM, {r['lost_sent_after_sigterm']} sent after it); SHUTTING_DOWN {r['shutting_down_errors']}; "
                f"exit {ev.get('exit_code')} after {ev.get('exit_s')} s [{mark} the bar]")
    solo = r["solo"].get("throughput_rps") or 0
    under = r["under_abuse"].get("throughput_rps") or 0
    ratio = r.get("throughput_ratio")
    line = (f"{tag}: client {solo:,.0f} -> {under:,.0f} req/s ({'-' if ratio is None else f'{ratio:.2f}'}x solo); "
            f"RSS +{r['rss'].get('growth_mb')} MB; PING p99 {r['ping_solo_ms']['p99']} -> "
            f"{r['ping_under_abuse_ms']['p99']} ms")
    if name == "slowloris":
        a = r["abuse"]
        line += (f"; slow connections rest {a.get('rest', {}).get('alive_at_end')} open at the end "
                 f"({a.get('rest', {}).get('closed_by_server')} closed by the server and reopened), msgpack "
                 f"{a.get('msgpack', {}).get('alive_at_end')} ({a.get('msgpack', {}).get('closed_by_server')})"
                 f"; new REST clients answered {r.get('rest_probe_under_abuse', {}).get('ok')}/"
                 f"{r.get('rest_probe_under_abuse', {}).get('tried')}")
    if not r["frontend"]["alive_at_end"]:
        line += "; FRONTEND DIED"
    return line + f" [{mark} the bar]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", default="all",
                    help=f"comma-separated among {', '.join(SCENARIOS)} (or their letters a-h), or all")
    ap.add_argument("--config", type=Path, default=NOOP_TOML)
    ap.add_argument("--app", default="noop")
    ap.add_argument("--slo-ms", type=float, default=20.0, help="the application's SLO (the deployment's)")
    ap.add_argument("--client-level", type=parse_sweep, default=parse_sweep("2x16"),
                    help="the well-behaved client: CONNECTIONSxIN_FLIGHT (default 2x16)")
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds of the client, solo and under abuse")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--frames", type=int, default=48, help="(a) connections holding a near-max frame")
    ap.add_argument("--nonreaders", type=int, default=8, help="(b) clients that never read")
    ap.add_argument("--nonreader-kind", choices=("hello", "predict"), default="hello",
                    help="(b) what they send: HELLO (the largest reply per request byte) or PREDICT")
    ap.add_argument("--nonreader-fill-s", type=float, default=10.0,
                    help="(b) seconds the non-readers get to fill the server before the client is measured")
    ap.add_argument("--slowloris", type=int, default=4096, help="(c) connections per port (REST and msgpack)")
    ap.add_argument("--rest-probes", type=int, default=10, help="(c) new REST requests tried under the abuse")
    ap.add_argument("--slowloris-hold-s", type=float, default=12.0,
                    help="(c) seconds the slow connections are held (and reopened when closed) before the client "
                    "is measured: longer than the default header timeout (10 s)")
    ap.add_argument("--metrics-requests", type=int, default=20_000, help="(d) pipelined GET /metrics")
    ap.add_argument("--sigstop-rate", type=float, default=12_000.0, help="(f) open-loop rate, req/s")
    ap.add_argument("--stop-s", type=float, default=10.0, help="(f) seconds the replica stays stopped")
    ap.add_argument("--deadline-margin-ms", type=float, default=10.0,
                    help="(f) a reply counts as on time within SLO + this (from the scheduled send)")
    ap.add_argument("--apps", type=int, default=2000, help="(g) applications to register")
    ap.add_argument("--register-timeout-s", type=float, default=180.0, help="(g) stop registering after this")
    ap.add_argument("--sigterm-rate", type=float, default=10_000.0, help="(h) open-loop rate, req/s")
    ap.add_argument("--note", default="", help="a sentence stored in the report (e.g. which code it ran on)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "abuse.json")
    ap.add_argument("--ready-timeout", type=float, default=90.0)
    ap.add_argument("--clipper-cmd", default=f"{sys.executable} -m clipper")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    letters = {v: k for k, v in SCENARIOS.items()}
    wanted = list(SCENARIOS) if args.scenario == "all" else [
        letters.get(s.strip(), s.strip()) for s in args.scenario.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)} or a-h")

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    nofile = raise_nofile()  # before any frontend starts: it inherits the limit
    report: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "machine": machine_info(), "note": args.note, "nofile": nofile,
                    "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "scenarios": {}}
    report["config"]["client_level"] = "x".join(map(str, args.client_level[0]))
    args.client_level = args.client_level[0]
    need = 2 * args.slowloris + 256
    if "slowloris" in wanted and nofile["soft"] < need:
        report["nofile_warning"] = (f"RLIMIT_NOFILE is {nofile['soft']} (hard {nofile['hard']}); {need} needed for "
                                    f"{args.slowloris} slowloris connections per port: fewer will be opened")
        log(report["nofile_warning"])
    tmp = Path(tempfile.mkdtemp(prefix="clipper-abuse-"))
    try:
        for name in wanted:
            log(f"({SCENARIOS[name]}) {name}")
            t0 = time.monotonic()
            try:
                r = RUNNERS[name](args, tmp, log)
            except (TargetError, LoadgenError, OSError) as exc:
                r = {"error": str(exc)}
            r["elapsed_s"] = round(time.monotonic() - t0, 1)
            report["scenarios"][name] = r
            log("  " + summary_line(name, r))
    except KeyboardInterrupt:
        report["interrupted"] = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    report["summary"] = {name: summary_line(name, r) for name, r in report["scenarios"].items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    for line in report["summary"].values():
        print(line)
    print(f"report: {args.out}")
    return 1 if report.get("interrupted") or any("error" in r for r in report["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
