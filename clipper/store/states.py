"""The selection-policy states of one application, one per user, over a :class:`StateStore`.

Reads come from a bounded in-memory LRU first (most queries of an active
user find their state there), then from the store. Writes go to memory at
once and to the store in batches: :meth:`StateTable.take_dirty` hands the
changed states to the frontend's flush, which commits every application's in
one transaction. A state is saved with the name of the policy that made it;
after the application changes policy, old states are ignored (the new policy
starts fresh) and age out.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import msgpack

import logging

from ..errors import InternalError
from .base import StateStore

__all__ = ["StateTable", "encode_state", "decode_state"]

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


class StateTable:
    """Per-user policy states of one application.

    ``max_in_memory`` bounds the LRU; ``max_states`` bounds what the store
    keeps for the application (the least recently saved go first).
    """

    def __init__(self, store: StateStore, app_name: str, policy_name: str, init: Callable[[], dict], *,
                 max_in_memory: int, max_states: int, on_dirty: Callable[[], None] | None = None) -> None:
        self.store = store
        self.namespace = f"policy/{app_name}"
        self.policy_name = policy_name
        self.init = init
        self.max_in_memory = max(1, max_in_memory)
        self.max_states = max(1, max_states)
        self.on_dirty = on_dirty
        self.lru: OrderedDict[str, dict] = OrderedDict()
        self.dirty: dict[str, dict] = {}
        self._saved_since_trim = 0
        self.unstorable = 0
        # figures
        self.loads = 0
        self.fresh = 0
        self.updates = 0
        self.evicted_from_memory = 0
        self.trimmed = 0

    def reset(self, policy_name: str, init: Callable[[], dict]) -> None:
        """The application's policy (or its model set) changed: forget what memory holds."""
        self.policy_name = policy_name
        self.init = init
        self.lru.clear()
        self.dirty.clear()

    def get(self, user: str) -> dict:
        lru = self.lru
        state = lru.get(user)
        if state is not None:
            lru.move_to_end(user)
            return state
        state = self.dirty.get(user)
        if state is None:
            raw = self.store.load(self.namespace, user)
            self.loads += 1
            if raw is not None:
                name, state = decode_state(raw)
                if name != self.policy_name:
                    state = None
            if state is None:
                self.fresh += 1
                state = self.init()
        self._remember(user, state)
        return state

    def put(self, user: str, state: dict) -> None:
        self.updates += 1
        self._remember(user, state)
        first = not self.dirty
        self.dirty[user] = state
        if first and self.on_dirty is not None:
            self.on_dirty()

    def _remember(self, user: str, state: dict) -> None:
        lru = self.lru
        lru[user] = state
        lru.move_to_end(user)
        while len(lru) > self.max_in_memory:
            lru.popitem(last=False)  # a dirty one stays in self.dirty until it is saved
            self.evicted_from_memory += 1

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

    def give_back(self, taken: dict) -> None:
        """Saving what :meth:`take_dirty` returned failed: keep those states for the next try
        (unless they changed again since)."""
        for user, state in taken.items():
            self.dirty.setdefault(user, state)

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
                "unstorable": self.unstorable}
