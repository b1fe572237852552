"""A state store on a Redis server: what several frontends share (``--state redis://HOST:PORT/DB``).

Layout, under a key prefix (``clipper`` by default), per namespace ``NS``:
``PREFIX:v:NS`` is a hash of key -> value and ``PREFIX:r:NS`` a sorted set of
key -> save sequence number (the recency order), numbered from the counter
``PREFIX:seq`` by the same Lua script that writes the values, so a save is
atomic and "most recently saved" holds across every frontend writing to the
server. A trim is one script too.

Nothing here blocks the frontend's event loop on the network. The client
(redis-py's asyncio client, with the hiredis parser when installed) lives on
a thread of its own with its own event loop; writes (:meth:`save_many`,
:meth:`delete`, :meth:`delete_namespace`, :meth:`trim_later`) are handed to it
in order and applied in batches, one transaction each, and a batch that fails
(Redis down) is retried, in order, until it goes through; reads on the query
path (:meth:`load_later`) run there too and call back. Until a write is
applied an overlay answers reads of what it wrote, so a value read back is
always the last one written. The synchronous reads (:meth:`load`,
:meth:`count`, :meth:`keys`) wait for the server, up to ``timeout_s``: they
are for the frontend's start and for management, not for queries.

Unapplied writes are bounded in bytes (``max_pending_bytes``): past it a new
write is refused with ``STATE_UNAVAILABLE`` (the query processor keeps the
policy states it could not hand over and tries again; a management change
fails with that error) rather than let a Redis outage grow the frontend
without bound. A batch the server itself refuses (not an outage: a key of
another type, say) is logged and dropped, so the writes behind it go on.
Reads waiting together go to the server in one round trip, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from typing import Callable, Iterable, TypeGuard

from ..errors import InvalidConfigError, StateUnavailableError
from .base import StateStore, settle_overlay

__all__ = ["RedisStore", "is_redis_url"]

log = logging.getLogger("clipper.store")

# KEYS[1]: the counter; then (hash, sorted set) per item. ARGV: (field, value) per item.
_SAVE = """
local n = (#KEYS - 1) / 2
local top = redis.call('INCRBY', KEYS[1], n)
for i = 1, n do
  redis.call('HSET', KEYS[2 * i], ARGV[2 * i - 1], ARGV[2 * i])
  redis.call('ZADD', KEYS[2 * i + 1], top - n + i, ARGV[2 * i - 1])
end
return n
"""
# KEYS: hash, sorted set. ARGV[1]: how many of the most recent to keep. Returns how many went.
_TRIM = """
local keep = tonumber(ARGV[1])
local n = redis.call('ZCARD', KEYS[2])
if n <= keep then return 0 end
local gone = redis.call('ZRANGE', KEYS[2], 0, n - keep - 1)
for i = 1, #gone, 256 do
  redis.call('HDEL', KEYS[1], unpack(gone, i, math.min(i + 255, #gone)))
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, n - keep - 1)
return #gone
"""
_BATCH = 256  # writes per transaction
FEED_CHECK_S = 30.0  # an idle change feed checks its connection this often
_RETRY_MAX_S = 2.0


def is_redis_url(path: str | None) -> TypeGuard[str]:
    return isinstance(path, str) and path.split("://", 1)[0] in ("redis", "rediss", "unix")


class _Deleted:
    """The overlay's mark of a value deleted but not yet applied (one object per delete)."""

    __slots__ = ()


class RedisStore(StateStore):
    """A :class:`StateStore` on a Redis server (``redis://``, ``rediss://`` or ``unix://`` URL)."""

    merges = True  # several frontends write the same policy states: see merge_many

    def __init__(self, url: str, *, prefix: str = "clipper", timeout_s: float = 2.0,
                 max_pending_bytes: int = 64 * 1024 * 1024) -> None:
        try:
            import redis.asyncio as aioredis
            from redis.exceptions import RedisError
        except ImportError:
            raise InvalidConfigError("a Redis state store needs the redis package: pip install "
                                     "'clipper-serving[redis]'") from None
        if not is_redis_url(url):
            raise InvalidConfigError(f"state store {url!r} is not a redis://, rediss:// or unix:// URL")
        self.url = url
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes
        self._errors = (RedisError, OSError, asyncio.TimeoutError)
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import ResponseError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self._response_error = ResponseError
        self._transient = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
        self._overlay: dict = {}  # (ns, key) -> value or _Deleted, handed to the writer, not yet applied
        self._lock = threading.Lock()  # the overlay and the figures, between callers and the store's thread
        self._jobs: deque = deque()  # writes in order, on the store's loop only
        self.pending_bytes = 0
        self.dropped_writes = 0
        self.write_errors = 0
        self.failed_writes = 0  # batches the server refused for good (not an outage): dropped, logged
        self.commits = 0
        self._dropping: dict[str, int] = {}  # namespace -> removals queued, not yet applied
        self._reads: list = []  # load_later's reads waiting for the next read round trip
        self._listeners: list = []  # the clients of subscribe's change feeds
        self._reading = False  # a read round trip is out
        self.merge_conflicts = 0  # merges retried because another frontend wrote in between
        self.available = True  # the last command reached the server
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="clipper-redis", daemon=True)
        self._thread.start()
        try:
            self._client = aioredis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            self._call(self._start())
        except BaseException as exc:
            client = getattr(self, "_client", None)
            if client is not None:
                try:
                    asyncio.run_coroutine_threadsafe(client.aclose(), self._loop).result(1.0)
                except Exception:
                    pass
            self._stop_thread()
            if isinstance(exc, StateUnavailableError):
                raise InvalidConfigError(f"state store {self._where()}: {exc.message}") from None
            if isinstance(exc, (ValueError, TypeError)):
                raise InvalidConfigError(f"state store {self._where()}: {exc}") from None
            raise

    def _where(self) -> str:
        return self.url.split("@", 1)[-1] if "@" in self.url else self.url  # no password in messages

    def __repr__(self) -> str:
        return f"<RedisStore {self._where()} prefix {self.prefix}>"

    def _h(self, ns: str) -> str:
        return f"{self.prefix}:v:{ns}"

    def _z(self, ns: str) -> str:
        return f"{self.prefix}:r:{ns}"

    # ------------------------------------------------------------ on the store's thread
    async def _start(self) -> None:
        await self._client.ping()
        self._save = self._client.register_script(_SAVE)
        self._trim = self._client.register_script(_TRIM)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def _enqueue(self, job) -> None:
        self._jobs.append(job)
        self._idle.clear()
        self._wake.set()

    async def _write_loop(self) -> None:
        jobs = self._jobs
        while True:
            if not jobs:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            if jobs[0][0] == "merge":  # a merge is its own optimistic transaction
                batch = [jobs[0]]
            else:
                batch = []
                for job in jobs:
                    if job[0] == "merge" or len(batch) == _BATCH:
                        break
                    batch.append(job)
            attempt = 0
            while True:
                try:
                    results = await (self._apply_merge(batch[0][1]) if batch[0][0] == "merge" else self._apply(batch))
                    break
                except Exception as exc:  # (anything but an outage, a bug included, drops the batch)
                    self.write_errors += 1
                    if not isinstance(exc, self._errors) or not self._is_transient(exc):
                        # The server refused the batch itself (a key of another type, a script error): it
                        # would be refused again. Dropped, so the writes behind it go on. (Transactions
                        # and scripts do not roll back: some of it may have been applied.)
                        self.failed_writes += 1
                        log.error("state store %s: the server refused %d writes (%s: %s); they are dropped",
                                  self._where(), len(batch), type(exc).__name__, exc)
                        results = None
                        break
                    self.available = False
                    attempt += 1
                    if self._closing and attempt >= 3:
                        log.error("state store %s: giving up on %d writes at close: %s", self._where(), len(batch),
                                  exc)
                        results = None
                        break
                    if attempt == 1 or attempt % 20 == 0:
                        log.error("state store %s: writing failed (%s); retrying", self._where(), exc)
                    await asyncio.sleep(min(_RETRY_MAX_S, 0.05 * 2 ** min(attempt, 6)))
            self.available = results is not None
            self.commits += results is not None
            for _ in batch:
                jobs.popleft()
            self._applied(batch, results)

    _TRANSIENT_REPLIES = ("LOADING", "BUSY", "READONLY", "OOM", "TRYAGAIN", "MASTERDOWN", "CLUSTERDOWN",
                          "NOREPLICAS")

    def _is_transient(self, exc: BaseException) -> bool:
        """An outage (retried until it ends), not a refusal of the writes themselves (dropped)."""
        if isinstance(exc, self._transient):
            return True
        if isinstance(exc, self._response_error):
            return str(exc).split(" ", 1)[0] in self._TRANSIENT_REPLIES
        return False

    async def _apply(self, batch: list) -> list:
        pipe = self._client.pipeline(transaction=True)
        for kind, arg in batch:
            if kind == "save":
                keys = [f"{self.prefix}:seq"]
                args: list = []
                for ns, key, value in arg:
                    keys += (self._h(ns), self._z(ns))
                    args += (key, value)
                await self._save(keys=keys, args=args, client=pipe)
            elif kind == "delete":
                ns, key, _ = arg
                pipe.hdel(self._h(ns), key)
                pipe.zrem(self._z(ns), key)
            elif kind == "drop":
                pipe.delete(self._h(arg[0]), self._z(arg[0]))
            elif kind == "publish":  # in the same transaction as the writes before it: seen after them
                pipe.publish(f"{self.prefix}:{arg[0]}", arg[1])
            else:  # trim
                ns, keep, _ = arg
                await self._trim(keys=[self._h(ns), self._z(ns)], args=[keep], client=pipe)
        return await pipe.execute()

    async def _apply_merge(self, arg) -> list:
        """Write merged policy states: WATCH their hashes, read what they hold, write
        ``merge_states(current, base, value)`` for each in one MULTI/EXEC; another frontend's write in
        between aborts it (WatchError) and it is read and merged again."""
        from redis.exceptions import WatchError

        from .states import merge_states

        items, _, token = arg
        by_ns: dict[str, list] = {}
        for ns, key, base, value in items:
            by_ns.setdefault(ns, []).append((key, base, value))
        hashes = [self._h(ns) for ns in by_ns]
        # The transaction also sets a key naming this merge: an attempt whose EXEC was applied but whose
        # answer was lost (redis-py reports a connection cut while watching as a WatchError) is found
        # done, not merged twice.
        done_key = f"{self.prefix}:merged:{token}"
        conflicts = 0
        async with self._client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(*hashes)
                    if await pipe.exists(done_key):  # an earlier attempt went through: what is stored now
                        merged: list = []
                        for ns, entries in by_ns.items():
                            currents = await pipe.hmget(self._h(ns), [k for k, _, _ in entries])
                            merged.extend((ns, key, value, cur if cur is not None else value)
                                          for (key, _, value), cur in zip(entries, currents))
                        await pipe.reset()
                        return merged
                    merged = []
                    for ns, entries in by_ns.items():
                        currents = await pipe.hmget(self._h(ns), [k for k, _, _ in entries])
                        for (key, base, value), current in zip(entries, currents):
                            # (current: bytes or None, the responses are not decoded)
                            merged.append((ns, key, value, merge_states(current, base, value)))  # type: ignore[arg-type]
                    pipe.multi()
                    keys = [f"{self.prefix}:seq"]
                    args: list = []
                    for ns, key, _, m in merged:
                        keys += (self._h(ns), self._z(ns))
                        args += (key, m)
                    await self._save(keys=keys, args=args, client=pipe)
                    pipe.set(done_key, b"1", ex=3600)
                    await pipe.execute()
                    return merged
                except WatchError:
                    self.merge_conflicts += 1
                    conflicts += 1
                    await pipe.reset()
                    if conflicts % 8 == 0:  # many frontends writing at once: let them through first
                        await asyncio.sleep(min(0.1, 0.002 * conflicts))

    def _applied(self, batch: list, results) -> None:
        done_items: list = []
        after, freed = [], 0
        i = 0
        for kind, arg in batch:
            if kind == "merge":
                items, on_merged, _ = arg
                done_items.extend(((ns, key), value) for ns, key, _, value in items)
                freed += sum(len(v) + len(k) for _, k, _, v in items)
                if on_merged is not None and results is not None:
                    after.append((on_merged, results))
                continue
            if kind == "save":
                done_items.extend(((ns, key), value) for ns, key, value in arg)
                freed += sum(len(v) + len(k) for _, k, v in arg)
                i += 1
            elif kind == "delete":
                ns, key, mark = arg
                done_items.append(((ns, key), mark))
                i += 2
            elif kind == "publish":
                i += 1
            elif kind == "drop":
                ns, marks = arg
                done_items.extend(marks.items())
                with self._lock:
                    left = self._dropping.get(ns, 0) - 1
                    if left > 0:
                        self._dropping[ns] = left
                    else:
                        self._dropping.pop(ns, None)
                i += 1
            else:
                ns, keep, on_done = arg
                if on_done is not None:
                    after.append((on_done, int(results[i]) if results is not None else 0))
                i += 1
        with self._lock:
            self.pending_bytes -= freed
        settle_overlay(self._lock, self._overlay, done_items, after)

    def _call(self, coro, timeout: float | None = None):
        """Run ``coro`` on the store's loop and wait for it (start, management, tests: not queries)."""
        if not self._thread.is_alive():
            coro.close()
            raise StateUnavailableError(f"state store {self._where()} is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        wait = self.timeout_s * 2 if timeout is None else timeout
        try:
            return fut.result(wait)
        except TimeoutError:  # (first: on 3.11 this is asyncio's TimeoutError too) the call must not run later
            if not fut.done():
                fut.cancel()
                self.available = False
                raise StateUnavailableError(f"the Redis server at {self._where()} did not answer within "
                                            f"{wait:g} s") from None
            self.available = False
            raise StateUnavailableError(f"the Redis server at {self._where()} did not answer in time") from None
        except self._errors as exc:
            self.available = False
            raise StateUnavailableError(f"the Redis server at {self._where()} did not answer: "
                                        f"{type(exc).__name__}: {exc}") from None

    def _submit(self, job) -> None:
        if self._closing:
            raise StateUnavailableError(f"state store {self._where()} is closed")
        self._loop.call_soon_threadsafe(self._enqueue, job)

    # ------------------------------------------------------------ StateStore
    def _pending(self, namespace: str, key: str):
        """What the writes not yet applied say of ``(namespace, key)``: (True, value or None) or (False, None)."""
        pending = self._overlay.get((namespace, key))
        if pending is not None:
            return True, None if type(pending) is _Deleted else pending
        if namespace in self._dropping:  # the namespace is being removed: nothing in it but what came after
            return True, None
        return False, None

    def load(self, namespace: str, key: str) -> bytes | None:
        known, value = self._pending(namespace, key)
        if known:
            return value
        return self._call(self._client.hget(self._h(namespace), key))

    def load_later(self, namespace: str, key: str, done: Callable) -> None:
        """Reads waiting together go in one round trip (an HMGET per namespace), one round trip out at a
        time: a burst of users not in memory costs a few round trips and one connection."""
        known, value = self._pending(namespace, key)
        if known:
            done(value, None)
            return
        if self._closing:
            done(None, StateUnavailableError(f"state store {self._where()} is closed"))
            return
        with self._lock:
            self._reads.append((namespace, key, done))
            first = len(self._reads) == 1
        if first:
            self._loop.call_soon_threadsafe(self._start_reads)

    def _start_reads(self) -> None:
        if not self._reading and self._reads:
            self._reading = True
            self._loop.create_task(self._read_round())

    async def _read_round(self) -> None:
        with self._lock:
            reads, self._reads = self._reads, []
        by_ns: dict[str, list] = {}
        for ns, key, done in reads:
            by_ns.setdefault(ns, []).append((key, done))
        try:
            pipe = self._client.pipeline(transaction=False)
            for ns, entries in by_ns.items():
                pipe.hmget(self._h(ns), [k for k, _ in entries])
            results = await pipe.execute()
            self.available = True
            error = None
        except self._errors as exc:
            self.available = False
            results, error = None, exc
        for n, (ns, entries) in enumerate(by_ns.items()):
            values = results[n] if results is not None else [None] * len(entries)
            for (key, done), value in zip(entries, values):
                err = error
                known, pending = self._pending(ns, key)  # a write handed over meanwhile is newer
                if known:
                    value, err = pending, None
                try:
                    done(value, err)
                except Exception:
                    log.exception("a state store read's callback failed")
        self._reading = False
        if self._reads:
            self._start_reads()

    def _hand_over(self, job, writes: list) -> None:
        """Queue a write job of ``writes`` ((namespace, key, value) each): within max_pending_bytes, else
        STATE_UNAVAILABLE; reads see the values at once (the overlay)."""
        if self._closing:
            raise StateUnavailableError(f"state store {self._where()} is closed")
        nbytes = sum(len(v) + len(k) for _, k, v in writes)
        with self._lock:
            if self.pending_bytes + nbytes > self.max_pending_bytes:
                self.dropped_writes += 1
                raise StateUnavailableError(
                    f"state store {self._where()}: {self.pending_bytes} bytes of writes wait for the server "
                    f"(max_pending_bytes {self.max_pending_bytes}); {len(writes)} more are refused")
            self.pending_bytes += nbytes
            for ns, key, value in writes:
                self._overlay[(ns, key)] = value
        self._submit(job)

    def save_many(self, items: Iterable[tuple[str, str, bytes]]) -> None:
        items = [(ns, key, bytes(value)) for ns, key, value in items]
        if items:
            self._hand_over(("save", items), items)

    def merge_many(self, items: Iterable[tuple[str, str, bytes | None, bytes]],
                   on_merged: Callable[[list], None] | None = None) -> None:
        """Write policy states that other frontends may be writing too: for each ``(namespace, key,
        base, value)`` the store writes :func:`~clipper.store.states.merge_states` of what it holds,
        ``base`` (the state as this frontend read or last wrote it) and ``value``, atomically (an
        optimistic transaction, retried on conflict). ``on_merged([(ns, key, value, merged), ...])``
        runs on the store's thread once written. Reads meanwhile see ``value``."""
        items = [(ns, key, base, bytes(value)) for ns, key, base, value in items]
        if items:
            self._hand_over(("merge", (items, on_merged, os.urandom(12).hex())),
                            [(ns, key, value) for ns, key, _, value in items])

    def delete(self, namespace: str, key: str) -> None:  # type: ignore[override]  # (see the docstring)
        """Queue the delete; returns None (whether the value existed is not known without a read)."""
        mark = _Deleted()
        with self._lock:
            self._overlay[(namespace, key)] = mark
        self._submit(("delete", (namespace, key, mark)))

    def delete_namespace(self, namespace: str) -> None:  # type: ignore[override]  # (see the docstring)
        """Queue the removal of the namespace; returns None (its size is not known without a read).
        Until it is applied, reads of the namespace find nothing but what is written after it."""
        with self._lock:
            marks = {}
            for k in [k for k in self._overlay if k[0] == namespace]:
                marks[k] = self._overlay[k] = _Deleted()
            self._dropping[namespace] = self._dropping.get(namespace, 0) + 1
        self._submit(("drop", (namespace, marks)))

    def count(self, namespace: str) -> int:
        self.flush(self.timeout_s * 2)
        return int(self._call(self._client.hlen(self._h(namespace))))

    def trim(self, namespace: str, keep: int) -> int:
        if keep < 0:
            raise ValueError(f"keep is {keep}; expected >= 0")
        self.flush(self.timeout_s * 2)
        return int(self._call(self._trim(keys=[self._h(namespace), self._z(namespace)], args=[keep])))

    def trim_later(self, namespace: str, keep: int, on_done: Callable[[int], None] | None = None) -> None:
        """:meth:`trim` in order with the writes (``on_done(count)`` runs on the store's thread)."""
        self._submit(("trim", (namespace, keep, on_done)))

    def keys(self, namespace: str, limit: int = 1000) -> list[str]:
        self.flush(self.timeout_s * 2)
        raw = self._call(self._client.zrevrange(self._z(namespace), 0, max(0, limit) - 1)) if limit > 0 else []
        return [k.decode() if isinstance(k, bytes) else k for k in raw]

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every write handed over so far is applied (True), or ``timeout`` passed."""
        if not self._thread.is_alive():
            return True

        async def idle():
            await self._idle.wait()

        fut = asyncio.run_coroutine_threadsafe(idle(), self._loop)
        try:
            fut.result(timeout)
            return True
        except TimeoutError:
            fut.cancel()
            return False

    def publish(self, channel: str, message: bytes) -> None:
        """Tell the other frontends on this server something changed: published once the writes handed
        over before it are applied (in their transaction), so a subscriber that reads then sees them."""
        self._submit(("publish", (channel, bytes(message))))

    def subscribe(self, channel: str, on_message: Callable[[bytes | None], None]) -> None:
        """Call ``on_message(data)`` (on the store's thread) for each message published on ``channel``,
        and ``on_message(None)`` each time the subscription is (re)made: a message may have been missed
        while it was down, so the subscriber should catch up. Reconnects with backoff until close."""
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._listen(channel, on_message)))

    async def _listen(self, channel: str, on_message) -> None:
        import redis.asyncio as aioredis

        # A connection of its own, with no read timeout: it waits for messages without waking up.
        extra = {"socket_keepalive": True} if not self.url.startswith("unix:") else {}
        client = aioredis.Redis.from_url(self.url, socket_connect_timeout=self.timeout_s, **extra)
        self._listeners.append(client)
        attempt = 0
        while not self._closing:
            ps = client.pubsub(ignore_subscribe_messages=True)
            try:
                await ps.subscribe(f"{self.prefix}:{channel}")
                attempt = 0
                self._deliver(on_message, None)
                pinged = False
                while True:
                    # Wakes every FEED_CHECK_S when nothing comes, to check the connection is alive: a
                    # half-open one (a network partition) would otherwise wait for hours, hearing nothing.
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=FEED_CHECK_S)
                    if msg is None:
                        if pinged:  # not even the answer to the last PING came back
                            raise ConnectionError(f"no answer to a PING within {FEED_CHECK_S:g} s")
                        await asyncio.wait_for(ps.ping(), self.timeout_s)
                        pinged = True
                        continue
                    pinged = False
                    if msg.get("type") == "message":
                        self._deliver(on_message, msg.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # (a bug must not end the feed either: logged, and it reconnects)
                attempt += 1
                if attempt == 1:
                    if isinstance(exc, self._errors):
                        log.warning("state store %s: the change feed was cut (%s); reconnecting", self._where(), exc)
                    else:
                        log.exception("state store %s: the change feed failed; reconnecting", self._where())
                await asyncio.sleep(min(_RETRY_MAX_S, 0.05 * 2 ** min(attempt, 6)))
            finally:
                try:
                    await ps.aclose()
                except Exception:
                    pass

    @staticmethod
    def _deliver(on_message, data) -> None:
        try:
            on_message(data)
        except Exception:
            log.exception("a change feed's subscriber failed")

    def ping(self):
        """A PING on the store's thread, bounded by ``timeout_s``: a concurrent.futures.Future of True, or
        of the error (the caller's loop awaits it with ``asyncio.wrap_future``; nothing blocks)."""
        async def ping():
            try:
                await asyncio.wait_for(self._client.ping(), self.timeout_s)
            except self._errors:
                self.available = False
                raise
            self.available = True
            return True

        return asyncio.run_coroutine_threadsafe(ping(), self._loop)

    def stats(self) -> dict:
        return {"available": self.available, "pending_bytes": self.pending_bytes, "write_errors": self.write_errors,
                "dropped_writes": self.dropped_writes, "commits": self.commits, "merge_conflicts": self.merge_conflicts}

    def close(self, timeout: float = 3.0) -> None:
        """Apply what is queued (up to ``timeout``; a server that is down gets three more tries), then stop."""
        if self._closing or not self._thread.is_alive():
            return
        self._closing = True
        if not self.flush(timeout):
            log.error("state store %s: %d bytes of writes not applied at close", self._where(), self.pending_bytes)

        async def shut():
            self._writer.cancel()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()
            for client in [self._client, *self._listeners]:
                try:
                    await client.aclose()
                except Exception:
                    pass

        try:
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(1.0)
        except Exception:
            pass
        self._stop_thread()

    def _stop_thread(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)
        if not self._thread.is_alive():
            self._loop.close()
