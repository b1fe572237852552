"""The embedded state store: one SQLite file (or memory).

WAL journal with ``synchronous=NORMAL``: a commit survives the frontend
process crashing (what is written is in the log), and only an operating
system crash can lose the last commits. Each value row carries a sequence
number from a counter kept in the same file, so "most recently saved"
survives restarts and needs no clock.

``background=True`` (the frontend's choice for a file) moves every write off
the caller's thread: a writer thread with its own connection commits what
:meth:`SQLiteStore.save_many` and :meth:`delete` hand it, coalescing what
piles up into one transaction, and retries a commit that fails (a full disk)
without losing it. Reads stay on the caller's connection (WAL readers never
wait for the writer) and see writes not yet committed through an overlay, so
a value read back is always the last one written. ``count``, ``keys`` and
``delete_namespace`` wait for the writer first (rare, management-time calls).
:meth:`SQLiteStore.load_later` reads on the writer thread too, after the
writes handed to it before (the query path's reads of policy states).
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from ..errors import InvalidConfigError
from .base import StateStore, settle_overlay

__all__ = ["SQLiteStore"]

log = logging.getLogger("clipper.store")


class _Deleted:
    """The overlay's mark of a value deleted but not yet committed (one object per delete)."""

    __slots__ = ()


_UPSERT = ("INSERT INTO kv (ns, key, value, seq) VALUES (?, ?, ?, ?) "
           "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, seq = excluded.seq")
_SET_SEQ = "INSERT INTO meta (name, value) VALUES ('seq', ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    ns    TEXT    NOT NULL,
    key   TEXT    NOT NULL,
    value BLOB    NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_recency ON kv (ns, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SQLiteStore(StateStore):
    """A :class:`StateStore` in one SQLite database file (``":memory:"``: not durable)."""

    def __init__(self, path: str | os.PathLike = ":memory:", *, background: bool = False) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            parent = Path(self.path).expanduser().resolve().parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise InvalidConfigError(f"state store {self.path!r}: cannot create its folder: {exc}") from None
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
        except sqlite3.Error as exc:
            raise InvalidConfigError(f"state store {self.path!r} cannot be opened: {exc}") from None
        self._seq = row[0] if row else 0
        self._overlay: dict = {}  # (ns, key) -> value or _Deleted, handed to the writer, not yet committed
        self._lock = threading.Lock()  # the overlay, between the caller's thread and the writer
        self._jobs: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self.write_errors = 0
        self.commits = 0
        if background and self.path != ":memory:":
            self.db.execute("PRAGMA busy_timeout = 5000")
            self._jobs = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._write_loop, name="clipper-store-writer", daemon=True)
            self._thread.start()

    def load(self, namespace: str, key: str) -> bytes | None:
        pending = self._overlay.get((namespace, key))
        if pending is not None:
            return None if type(pending) is _Deleted else pending
        row = self.db.execute("SELECT value FROM kv WHERE ns = ? AND key = ?", (namespace, key)).fetchone()
        return None if row is None else bytes(row[0])

    def load_later(self, namespace: str, key: str, done) -> None:
        """:meth:`load` on the writer thread, in order with the writes handed to it (at once without one)."""
        if self._jobs is None:
            return super().load_later(namespace, key, done)
        pending = self._overlay.get((namespace, key))
        if pending is not None:
            done(None if type(pending) is _Deleted else pending, None)
            return
        if self._thread is None:
            done(None, RuntimeError(f"state store {self.path!r} is closed"))
            return
        self._jobs.put(("load", (namespace, key, done)))

    def save_many(self, items: Iterable[tuple[str, str, bytes]]) -> None:
        if self._jobs is not None:
            items = list(items)
            if items:
                with self._lock:
                    for ns, key, value in items:
                        self._overlay[(ns, key)] = value
                self._jobs.put(("save", items))
            return
        rows = []
        seq = self._seq
        for ns, key, value in items:
            seq += 1
            rows.append((ns, key, value, seq))
        if not rows:
            return
        db = self.db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT INTO kv (ns, key, value, seq) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (ns, key) DO UPDATE SET value = excluded.value, seq = excluded.seq", rows)
            db.execute("INSERT INTO meta (name, value) VALUES ('seq', ?) "
                       "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (seq,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._seq = seq

    def delete(self, namespace: str, key: str) -> bool:
        if self._jobs is not None:
            existed = self.load(namespace, key) is not None
            mark = _Deleted()
            with self._lock:
                self._overlay[(namespace, key)] = mark
            self._jobs.put(("delete", (namespace, key, mark)))
            return existed
        return self.db.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (namespace, key)).rowcount > 0

    def delete_namespace(self, namespace: str) -> int:
        if self._jobs is not None:
            self.flush()
        return self.db.execute("DELETE FROM kv WHERE ns = ?", (namespace,)).rowcount

    def count(self, namespace: str) -> int:
        self.flush()
        return self.db.execute("SELECT COUNT(*) FROM kv WHERE ns = ?", (namespace,)).fetchone()[0]

    def trim(self, namespace: str, keep: int) -> int:
        if keep < 0:
            raise ValueError(f"keep is {keep}; expected >= 0")
        self.flush()
        return self._trim(self.db, namespace, keep)

    def trim_later(self, namespace: str, keep: int, on_done: Callable[[int], None] | None = None) -> None:
        """:meth:`trim` on the writer (``on_done(count)`` runs there); at once without one."""
        if self._jobs is None:
            n = self.trim(namespace, keep)
            if on_done is not None:
                on_done(n)
            return
        self._jobs.put(("trim", (namespace, keep, on_done)))

    @staticmethod
    def _trim(db, namespace: str, keep: int) -> int:
        row = db.execute("SELECT seq FROM kv WHERE ns = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                              (namespace, keep)).fetchone()
        if row is None:
            return 0
        return db.execute("DELETE FROM kv WHERE ns = ? AND seq <= ?", (namespace, row[0])).rowcount

    def keys(self, namespace: str, limit: int = 1000) -> list[str]:
        self.flush()
        return [r[0] for r in self.db.execute("SELECT key FROM kv WHERE ns = ? ORDER BY seq DESC LIMIT ?",
                                              (namespace, limit))]

    # ------------------------------------------------------------ the writer thread
    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything handed to the writer is committed (True), or ``timeout`` passed."""
        if self._jobs is None or self._thread is None:
            return True
        done = threading.Event()
        self._jobs.put(("flush", done))
        return done.wait(timeout)

    def _write_loop(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout = 5000")
        jobs = self._jobs
        assert jobs is not None  # (made with the thread)
        stopping = False
        while not stopping:
            batch = [jobs.get()]
            while len(batch) < 512:  # what piled up goes in the same transaction
                try:
                    batch.append(jobs.get_nowait())
                except queue.Empty:
                    break
            work = [j for j in batch if j[0] in ("save", "delete", "trim")]
            reads = [j[1] for j in batch if j[0] == "load"]
            stopping = any(j[0] == "stop" for j in batch)
            attempt = 0
            while work:
                try:
                    self._commit(db, work)
                    break
                except sqlite3.Error as exc:
                    self.write_errors += 1
                    attempt += 1
                    if stopping and attempt >= 3:
                        log.error("state store %s: giving up on %d writes at close: %s", self.path, len(work), exc)
                        break
                    log.error("state store %s: a commit failed (%s); retrying", self.path, exc)
                    time.sleep(min(2.0, 0.1 * attempt))
            for ns, key, done in reads:  # after the writes that came before them
                try:
                    row = db.execute("SELECT value FROM kv WHERE ns = ? AND key = ?", (ns, key)).fetchone()
                    value, error = (None if row is None else bytes(row[0])), None
                except sqlite3.Error as exc:
                    value, error = None, exc
                try:
                    done(value, error)
                except Exception:
                    log.exception("a state store read's callback failed")
            for kind, arg in batch:
                if kind == "flush" or kind == "stop":
                    arg.set()
        db.close()

    def _commit(self, db, work: list) -> None:
        seq = self._seq
        done_items: list = []
        after: list = []
        db.execute("BEGIN")
        try:
            for kind, arg in work:
                if kind == "save":
                    rows = []
                    for ns, key, value in arg:
                        seq += 1
                        rows.append((ns, key, value, seq))
                    db.executemany(_UPSERT, rows)
                    done_items.extend(((ns, key), value) for ns, key, value in arg)
                elif kind == "delete":
                    ns, key, mark = arg
                    db.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (ns, key))
                    done_items.append(((ns, key), mark))
                else:  # trim
                    ns, keep, on_done = arg
                    n = self._trim(db, ns, keep)
                    if on_done is not None:
                        after.append((on_done, n))
            db.execute(_SET_SEQ, (seq,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._seq = seq
        self.commits += 1
        settle_overlay(self._lock, self._overlay, done_items, after)

    def close(self) -> None:
        if self._thread is not None:
            assert self._jobs is not None  # (made with the thread)
            done = threading.Event()
            self._jobs.put(("stop", done))
            done.wait(30.0)
            self._thread.join(5.0)
            self._thread = None
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"
