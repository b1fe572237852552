"""The embedded state store: one SQLite file (or memory).

WAL journal with ``synchronous=NORMAL``: a commit survives the frontend
process crashing (what is written is in the log), and only an operating
system crash can lose the last commits. Each value row carries a sequence
number from a counter kept in the same file, so "most recently saved"
survives restarts and needs no clock.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Iterable

from ..errors import InvalidConfigError
from .base import StateStore

__all__ = ["SQLiteStore"]

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

    def __init__(self, path: str | os.PathLike = ":memory:") -> None:
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

    def load(self, namespace: str, key: str) -> bytes | None:
        row = self.db.execute("SELECT value FROM kv WHERE ns = ? AND key = ?", (namespace, key)).fetchone()
        return None if row is None else bytes(row[0])

    def save_many(self, items: Iterable[tuple[str, str, bytes]]) -> None:
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
        return self.db.execute("DELETE FROM kv WHERE ns = ? AND key = ?", (namespace, key)).rowcount > 0

    def delete_namespace(self, namespace: str) -> int:
        return self.db.execute("DELETE FROM kv WHERE ns = ?", (namespace,)).rowcount

    def count(self, namespace: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM kv WHERE ns = ?", (namespace,)).fetchone()[0]

    def trim(self, namespace: str, keep: int) -> int:
        if keep < 0:
            raise ValueError(f"keep is {keep}; expected >= 0")
        row = self.db.execute("SELECT seq FROM kv WHERE ns = ? ORDER BY seq DESC LIMIT 1 OFFSET ?",
                              (namespace, keep)).fetchone()
        if row is None:
            return 0
        return self.db.execute("DELETE FROM kv WHERE ns = ? AND seq <= ?", (namespace, row[0])).rowcount

    def keys(self, namespace: str, limit: int = 1000) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT key FROM kv WHERE ns = ? ORDER BY seq DESC LIMIT ?",
                                              (namespace, limit))]

    def close(self) -> None:
        try:
            self.db.close()
        except sqlite3.Error:
            pass

    def __repr__(self) -> str:
        return f"<SQLiteStore {self.path}>"
