"""The interface every state store implements."""

from __future__ import annotations

import logging
from typing import Callable, Iterable

__all__ = ["StateStore", "settle_overlay"]

log = logging.getLogger("clipper.store")


def settle_overlay(lock, overlay: dict, done_items, after=()) -> None:
    """A store's writer applied ``done_items`` ((key, value written) pairs): each leaves the overlay that
    answered reads meanwhile, unless written again since (the overlay holds another object); then the
    writes' callbacks ``after`` ((callback, argument) pairs) run."""
    with lock:
        for k, value in done_items:
            if overlay.get(k) is value:
                del overlay[k]
    for callback, arg in after:
        try:
            callback(arg)
        except Exception:
            log.exception("a state store callback failed")


class StateStore:
    """Values (bytes) under ``(namespace, key)``, with a recency order per namespace.

    Namespaces group what belongs together (``policy/<application>`` holds the
    policy states of one application, keyed by user) so it can be counted,
    trimmed and deleted at once. Calls are synchronous and short; the frontend
    batches writes (:meth:`save_many`) so one commit carries many updates.
    """

    def load(self, namespace: str, key: str) -> bytes | None:
        """The value under ``(namespace, key)``, or None."""
        raise NotImplementedError

    def load_later(self, namespace: str, key: str, done: Callable[[bytes | None, BaseException | None], None]) -> None:
        """Read ``(namespace, key)`` off the caller's thread; ``done(value, None)`` or ``done(None, error)``
        is called once, from the store's own thread (or, for a store without one, at once). The query
        path reads policy states this way, so a store read never holds up the event loop."""
        try:
            value = self.load(namespace, key)
        except Exception as exc:
            done(None, exc)
            return
        done(value, None)

    def save_many(self, items: Iterable[tuple[str, str, bytes]]) -> None:
        """Store every ``(namespace, key, value)`` atomically, each as the most recent of its namespace."""
        raise NotImplementedError

    def delete(self, namespace: str, key: str) -> bool:
        raise NotImplementedError

    def delete_namespace(self, namespace: str) -> int:
        """Remove a whole namespace; returns how many values it held."""
        raise NotImplementedError

    def count(self, namespace: str) -> int:
        raise NotImplementedError

    def trim(self, namespace: str, keep: int) -> int:
        """Keep only the ``keep`` most recently saved values of ``namespace``; returns how many went."""
        raise NotImplementedError

    def keys(self, namespace: str, limit: int = 1000) -> list[str]:
        """Up to ``limit`` keys of ``namespace``, most recently saved first."""
        raise NotImplementedError

    def close(self) -> None:
        pass
