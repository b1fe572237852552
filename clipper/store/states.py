"""The selection-policy states of one application, one per user, over a :class:`StateStore`.

Reads come from a bounded in-memory LRU first (most queries of an active
user find their state there), then from the store: on the query path
(:meth:`StateTable.peek`, then :meth:`StateTable.fetch`) off the event loop,
the store's read handed to its own thread and the query resumed when the
state arrives, or after ``load_timeout_s`` without it (then the policy sees a
fresh state that is not kept: the next query of that user tries the store
again). Concurrent misses for one user share one read. Writes go to memory at
once and to the store in batches: :meth:`StateTable.take_dirty` hands the
changed states to the frontend's flush, which commits every application's in
one transaction. A state is saved with the name of the policy that made it;
after the application changes policy, old states are ignored (the new policy
starts fresh) and age out.

Several frontends on one store (Redis) may update the same user's state. A
store that ``merges`` (:class:`~clipper.store.redis.RedisStore`) is given,
for each changed state, the state as this frontend last read or wrote it
(``base``) besides the new one, and writes :func:`merge_states` of what it
holds now: numbers add what this frontend learned (new - base) to what the
others wrote meanwhile, so concurrent updates are all kept (the learned
weights, counts and reward sums of Clipper's policies are sums of per-feedback
steps). The merged state comes back into memory when nothing changed it
since.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

import msgpack

import logging
import math

from ..errors import InternalError
from .base import StateStore

__all__ = ["StateTable", "encode_state", "decode_state", "merge_states"]

log = logging.getLogger("clipper.store")


def encode_state(policy_name: str, state: dict) -> bytes:
    try:
        return msgpack.packb({"policy": policy_name, "state": state}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InternalError(f"policy {policy_name!r} made a state msgpack cannot store: {exc}") from None


def decode_state(raw: bytes) -> tuple[str | None, dict | None]:
    try:
        doc = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception:
        return None, None
    if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
        return None, None
    return doc.get("policy"), doc["state"]


def _number(v) -> bool:
    return (type(v) is float or type(v) is int) and math.isfinite(v)


def _merge(current, base, mine):
    if type(mine) is dict:
        out = dict(current) if type(current) is dict else {}
        b = base if type(base) is dict else {}
        for k, v in mine.items():
            out[k] = _merge(out.get(k), b.get(k), v)
        for k in b:  # dropped by this frontend since it read them: dropped
            if k not in mine:
                out.pop(k, None)
        return out
    if _number(mine) and (current is None or _number(current)) and (base is None or _number(base)):
        merged = (current or 0) + (mine - (base or 0))
        return merged if math.isfinite(merged) else mine
    return mine  # anything else: the last write wins


def merge_states(current: bytes | None, base: bytes | None, mine: bytes) -> bytes:
    """What a merging store writes for a user's policy state: ``mine`` with each number replaced by
    ``current + (mine - base)`` (a number ``base`` lacks counts as 0; a non-finite one, or any other
    value, is ``mine``'s). ``mine`` wins whole when ``current`` is unreadable or was made by another
    policy."""
    if current is None:
        return mine
    try:
        return _merged(current, base, mine)
    except Exception:  # (a state another frontend wrote that cannot be merged or encoded: mine wins)
        return mine


def _merged(current: bytes, base: bytes | None, mine: bytes) -> bytes:
    c_name, c_state = decode_state(current)
    m_name, m_state = decode_state(mine)
    if c_state is None or m_state is None or c_name != m_name:
        return mine
    b_name, b_state = decode_state(base) if base is not None else (None, None)
    if b_name != m_name:
        b_state = None
    return encode_state(m_name, _merge(c_state, b_state, m_state))  # type: ignore[arg-type]  # (nameless stays so)


class StateTable:
    """Per-user policy states of one application.

    ``max_in_memory`` bounds the LRU; ``max_states`` bounds what the store
    keeps for the application (the least recently saved go first).
    """

    def __init__(self, store: StateStore, app_name: str, policy_name: str, init: Callable[[], dict], *,
                 max_in_memory: int, max_states: int, on_dirty: Callable[[], None] | None = None,
                 loop=None, load_timeout_s: float = 1.0, mergeable: bool = True) -> None:
        self.store = store
        self.namespace = f"policy/{app_name}"
        self.policy_name = policy_name
        self.init = init
        self.max_in_memory = max(1, max_in_memory)
        self.max_states = max(1, max_states)
        self.on_dirty = on_dirty
        self.lru: OrderedDict[str, dict] = OrderedDict()
        self.dirty: dict[str, dict] = {}
        # For a merging store: each user's state as this frontend last read or wrote it (encoded; None:
        # the store had none), and the state objects handed to the store and not yet merged back.
        self.merging = bool(getattr(store, "merges", False)) and mergeable
        self.base: dict[str, bytes | None] = {}
        self._written: dict[str, tuple[dict, bytes]] = {}  # user -> (state object, its encoding) out
        self._saved_since_trim = 0
        self.unstorable = 0
        self.loop = loop  # where fetch's callbacks run (needed by fetch only)
        self.load_timeout_s = load_timeout_s
        self._loading: dict[str, tuple[list, Any, object]] = {}  # user -> (callbacks, timer, token): reads out
        self.load_failures = 0  # reads that failed or timed out (the query went on with a fresh state)
        # figures
        self.loads = 0
        self.fresh = 0
        self.updates = 0
        self.evicted_from_memory = 0
        self.trimmed = 0

    def reset(self, policy_name: str, init: Callable[[], dict], mergeable: bool | None = None) -> None:
        """The application's policy (or its model set) changed: forget what memory holds."""
        self.policy_name = policy_name
        self.init = init
        if mergeable is not None:
            self.merging = bool(getattr(self.store, "merges", False)) and mergeable
        self.lru.clear()
        self.dirty.clear()
        self.base.clear()
        self._written.clear()

    def get(self, user: str) -> dict:
        lru = self.lru
        state = lru.get(user)
        if state is not None:
            lru.move_to_end(user)
            return state
        state = self.dirty.get(user)
        if state is None:
            self.loads += 1
            state = self._stored(user, self.store.load(self.namespace, user))
        self._remember(user, state)
        return state

    def _stored(self, user: str, raw: bytes | None) -> dict:
        """The state of this policy that ``raw`` (what the store said for ``user``) holds, else a fresh
        one; ``raw`` is the base of what this frontend learns next."""
        state = None
        if raw is not None:
            name, state = decode_state(raw)
            if name != self.policy_name:
                state = None
        if state is None:
            self.fresh += 1
            state = self.init()
        self._read(user, raw)
        return state

    def peek(self, user: str) -> dict | None:
        """The state of ``user`` if memory holds it (None: it must be fetched from the store)."""
        state = self.lru.get(user)
        if state is not None:
            self.lru.move_to_end(user)
            return state
        state = self.dirty.get(user)
        if state is not None:
            self._remember(user, state)
        return state

    def fetch(self, user: str, callback: Callable[[dict, bool], None]) -> None:
        """Read the state of ``user`` from the store off the event loop; ``callback(state, known)``
        runs on the loop when it arrives (``known``), or with a fresh state that is not kept when the
        read fails or takes longer than ``load_timeout_s`` (not ``known``). Every callback runs exactly once."""
        entry = self._loading.get(user)
        if entry is not None:
            entry[0].append(callback)
            return
        loop = self.loop
        self.loads += 1
        token = object()  # this read's identity: a late answer to an earlier, timed-out read is not it
        timer = loop.call_later(self.load_timeout_s, self._loaded, user, token, None,
                                TimeoutError(f"no answer from the state store within {self.load_timeout_s:g} s"))
        self._loading[user] = ([callback], timer, token)

        def done(value, error):  # on the store's thread (or right here)
            try:
                loop.call_soon_threadsafe(self._loaded, user, token, value, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass

        try:
            self.store.load_later(self.namespace, user, done)
        except Exception as exc:
            self._loaded(user, token, None, exc)

    def _loaded(self, user: str, token, value, error) -> None:
        entry = self._loading.get(user)
        if entry is None or entry[2] is not token:
            return  # answered already (this is the late answer of a read that timed out)
        del self._loading[user]
        callbacks, timer, _ = entry
        timer.cancel()
        known = True
        state = self.peek(user)  # a state put while the read was out is newer than the stored one
        if state is None:
            if error is None:
                state = self._stored(user, value)
                self._remember(user, state)
            else:
                self.load_failures += 1
                log.warning("application %s, user %r: reading the policy state failed (%s); going on with a "
                            "fresh one", self.namespace, user, error)
                state = self.init()
                known = False
        for cb in callbacks:
            try:
                cb(state, known)
            except Exception:
                log.exception("a policy state's waiter failed")

    def put(self, user: str, state: dict) -> None:
        self.updates += 1
        self._remember(user, state)
        first = not self.dirty
        self.dirty[user] = state
        if first and self.on_dirty is not None:
            self.on_dirty()

    def _read(self, user: str, raw: bytes | None) -> None:
        """The store said ``raw`` for ``user``: the base of what this frontend learns next."""
        if self.merging and user not in self.base:
            self.base[user] = raw

    def _remember(self, user: str, state: dict) -> None:
        lru = self.lru
        lru[user] = state
        lru.move_to_end(user)
        while len(lru) > self.max_in_memory:
            gone, _ = lru.popitem(last=False)  # a dirty one stays in self.dirty until it is saved
            self.evicted_from_memory += 1
            if self.merging and gone not in self.dirty and gone not in self._written:
                self.base.pop(gone, None)

    def take_dirty(self) -> tuple[list[tuple[str, str, bytes]], dict]:
        """The changed states as store items, and what was taken (for :meth:`give_back`).

        A state msgpack cannot carry (a policy's bug) is logged and left out:
        it stays in memory but is never written.
        """
        if not self.dirty:
            return [], {}
        taken, self.dirty = self.dirty, {}
        items = []
        for user, state in taken.items():
            try:
                items.append((self.namespace, user, encode_state(self.policy_name, state)))
            except InternalError as exc:
                self.unstorable += 1
                log.error("application %s, user %r: %s", self.namespace, user, exc.message)
        self._saved_since_trim += len(items)
        return items, taken

    def take_dirty_merge(self) -> tuple[list[tuple[str, str, bytes | None, bytes]], dict]:
        """:meth:`take_dirty` for a merging store: ``(namespace, user, base, value)`` items. What is
        written becomes the base of the next write (this frontend's learning is counted up to it)."""
        items, taken = self.take_dirty()
        out = []
        base, written = self.base, self._written
        for ns, user, value in items:
            out.append((ns, user, base.get(user), value))
            base[user] = value
            written[user] = (taken[user], value)
        return out, taken

    def merged(self, user: str, value: bytes, merged: bytes) -> None:
        """The store wrote ``merged`` for the state this table wrote as ``value``: memory takes it,
        unless the state changed since (then the next write carries that change on)."""
        entry = self._written.get(user)
        if entry is None or entry[1] is not value:
            return  # a later write of this user is out (or the table was reset): its answer settles it
        del self._written[user]
        state = entry[0]
        held = user in self.lru or user in self.dirty
        name, new = decode_state(merged)
        if new is None or name != self.policy_name:
            if not held:
                self.base.pop(user, None)
            return
        if self.lru.get(user) is state and user not in self.dirty:
            if merged != value:
                self.lru[user] = new
            self.base[user] = merged
        elif not held:
            self.base.pop(user, None)
        # else: changed since it was written; its base stays what was written (the next write carries on)

    def give_back(self, taken: dict, merge_items: list | None = None) -> None:
        """Saving what :meth:`take_dirty` (or :meth:`take_dirty_merge`, whose ``merge_items`` say the
        bases to restore) returned failed: keep those states for the next try (unless they changed
        again since)."""
        for user, state in taken.items():
            self.dirty.setdefault(user, state)
        for _, user, base, _ in merge_items or ():
            self.base[user] = base
            self._written.pop(user, None)

    def trim_if_due(self) -> None:
        """After saves: keep the store within ``max_states`` (checked every tenth of it)."""
        if self._saved_since_trim >= max(16, self.max_states // 10):
            self._saved_since_trim = 0
            trim_later = getattr(self.store, "trim_later", None)
            if trim_later is not None:  # off the caller's thread when the store has a writer
                trim_later(self.namespace, self.max_states, self._trimmed)
            else:
                self.trimmed += self.store.trim(self.namespace, self.max_states)

    def _trimmed(self, n: int) -> None:
        self.trimmed += n

    def drop(self) -> None:
        """The application is gone: delete its states everywhere."""
        self.lru.clear()
        self.dirty.clear()
        self.store.delete_namespace(self.namespace)

    def stats(self) -> dict:
        return {"in_memory": len(self.lru), "unsaved": len(self.dirty), "loads": self.loads, "fresh": self.fresh,
                "updates": self.updates, "evicted_from_memory": self.evicted_from_memory, "trimmed": self.trimmed,
                "unstorable": self.unstorable, "reading": len(self._loading), "load_failures": self.load_failures}
