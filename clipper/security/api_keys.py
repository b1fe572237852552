"""Per-application API keys for the query ports (REST ``Authorization: Bearer``, msgpack HELLO ``api_key``).

A key grants queries and feedback for the applications it names, nothing
else (it never reaches the admin API). Keys are made here, shown once, and
kept only as a SHA-256 digest in the frontend's state store (namespace
``api-keys``), so they survive a restart and a copy of the state file does
not hand them out. Keys are 256-bit random (``secrets``), so one hash and a
dict lookup by digest check them: there is nothing to guess from the timing
of a lookup keyed by a hash of a high-entropy secret.

The live grant of a key is one ``set`` of application names
(:attr:`ApiKey.apps`); a msgpack connection that authenticated holds that
very set and checks each query with ``app in allowed``. Revoking a key
empties it, so revocation takes effect at once, also on connections that
authenticated before.

Applications are named, not tied: unregistering an application leaves the
keys that name it as they are (queries to it get ``UNKNOWN_APPLICATION``),
and an application registered again under that name is granted to them
again. Unregistering and registering again is how an application's settings
are changed, and keys handed to its users should survive that; to take an
application away from a key, revoke the key and make a new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Container, Iterable

from ..errors import InternalError, InvalidConfigError, UnknownApplicationError

log = logging.getLogger("clipper.security")

__all__ = ["ApiKey", "ApiKeyRegistry", "API_KEY_PREFIX", "MAX_API_KEY_CHARS", "API_KEYS_NAMESPACE", "key_digest"]

# Every key starts with this, so a key pasted into a log or a repository is recognizable (and scannable).
API_KEY_PREFIX = "clk_"
# The longest key a client may present (HELLO api_key, Authorization header); made keys have 47 characters.
MAX_API_KEY_CHARS = 256
API_KEYS_NAMESPACE = "api-keys"  # in the state store: key id -> JSON record (digest, never the key)


def key_digest(key: str) -> bytes:
    """The SHA-256 digest a key is stored and looked up by."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(eq=False)
class ApiKey:
    """One API key, without its secret.

    ``apps`` is the live grant: connections that authenticated with this key
    hold this very set, so changing it (revocation empties it) applies to
    them at once. Change it only through :class:`ApiKeyRegistry`.
    """

    id: str
    apps: set = field(default_factory=set)
    name: str = ""
    created: str = ""
    digest: bytes = b""
    revoked: bool = False

    def public(self) -> dict:
        """What the admin API shows of a key: everything but its secret and digest."""
        return {"id": self.id, "name": self.name, "apps": sorted(self.apps), "created": self.created}

    def _record(self) -> bytes:
        return json.dumps({"id": self.id, "name": self.name, "apps": sorted(self.apps), "created": self.created,
                           "sha256": self.digest.hex()}).encode()


class ApiKeyRegistry:
    """The API keys of one frontend, kept in its state store.

    Args:
        store: a :class:`clipper.store.base.StateStore`; the keys saved there
            before are loaded now.
        max_keys: how many keys may exist at once (creating more is refused).
        max_apps_per_key: how many applications one key may name.
        max_name_chars: the length of a key's free-text ``name``.
    """

    def __init__(self, store, *, max_keys: int = 10_000, max_apps_per_key: int = 1024,
                 max_name_chars: int = 200) -> None:
        self.store = store
        self.max_keys = max_keys
        self.max_apps_per_key = max_apps_per_key
        self.max_name_chars = max_name_chars
        self._by_digest: dict[bytes, ApiKey] = {}
        self._by_id: dict[str, ApiKey] = {}
        self._load()

    def __len__(self) -> int:
        return len(self._by_id)

    # ------------------------------------------------------------ checking
    def verify(self, key) -> ApiKey | None:
        """The key ``key`` (the secret a client presented) stands for, or None (unknown, revoked, not a str)."""
        if type(key) is not str or not key or len(key) > MAX_API_KEY_CHARS:
            return None
        return self._by_digest.get(key_digest(key))

    # ------------------------------------------------------------ managing
    def create(self, apps: Iterable, name: str | None = None, *,
               known_apps: Container[str] | None = None) -> tuple[ApiKey, str]:
        """Make a key granting ``apps``; returns it and its secret (shown only this once).

        Raises :class:`InvalidConfigError` for a bad ``apps`` list or name, or
        past ``max_keys``; :class:`UnknownApplicationError` when ``known_apps``
        is given and an application is not in it.
        """
        if isinstance(apps, (str, bytes)) or not isinstance(apps, (list, tuple, set, frozenset)):
            raise InvalidConfigError(f"apps must be a list of application names, got {type(apps).__name__}")
        names = []
        for app in apps:
            if type(app) is not str or not app:
                raise InvalidConfigError(f"application name {app!r} in apps is not a non-empty string")
            if app not in names:
                names.append(app)
        if not names:
            raise InvalidConfigError("an API key must name at least one application (apps is empty)")
        if len(names) > self.max_apps_per_key:
            raise InvalidConfigError(f"apps names {len(names)} applications; an API key may name at most "
                                     f"{self.max_apps_per_key}")
        if known_apps is not None:
            unknown = [a for a in names if a not in known_apps]
            if unknown:
                raise UnknownApplicationError(f"no application named {unknown[0]!r} is registered"
                                              + (f" (nor {unknown[1:]!r})" if len(unknown) > 1 else ""))
        if name is None:
            name = ""
        if type(name) is not str or len(name) > self.max_name_chars:
            raise InvalidConfigError(f"the key's name must be a string of at most {self.max_name_chars} characters")
        if len(self._by_id) >= self.max_keys:
            raise InvalidConfigError(f"{len(self._by_id)} API keys exist; max_keys is {self.max_keys}: revoke some")
        secret = API_KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "ak_" + secrets.token_hex(8)
        while key_id in self._by_id:  # 64 random bits: practically never
            key_id = "ak_" + secrets.token_hex(8)
        key = ApiKey(key_id, set(names), name, _now_iso(), key_digest(secret))
        # Saved first: a key the store could not keep is never handed out (it would vanish at the next restart).
        self.store.save_many([(API_KEYS_NAMESPACE, key_id, key._record())])
        self._add(key)
        return key, secret

    def revoke(self, key_id) -> ApiKey:
        """Revoke a key at once, on every connection that holds it, and forget it in the store.

        Raises :class:`InvalidConfigError` for an unknown id.
        """
        key = self._by_id.get(key_id) if type(key_id) is str else None
        if key is None:
            raise InvalidConfigError(f"no API key has id {key_id!r}")
        # In memory first: the key stops working now, whatever the store says next.
        del self._by_id[key.id]
        self._by_digest.pop(key.digest, None)
        key.revoked = True
        key.apps.clear()
        try:
            self.store.delete(API_KEYS_NAMESPACE, key.id)
        except Exception as exc:
            log.exception("API key %s is revoked in this process but could not be removed from %s", key.id, self.store)
            raise InternalError(f"API key {key.id} is revoked in this process, but the state store could not forget "
                                f"it ({type(exc).__name__}: {exc}); it would come back after a restart: revoke it "
                                f"again") from None
        return key

    def get(self, key_id: str) -> ApiKey | None:
        return self._by_id.get(key_id)

    def list(self) -> list[dict]:
        """Every key (oldest first), without secrets."""
        return [k.public() for k in sorted(self._by_id.values(), key=lambda k: (k.created, k.id))]

    # ------------------------------------------------------------ internals
    def _add(self, key: ApiKey) -> None:
        self._by_id[key.id] = key
        self._by_digest[key.digest] = key

    def _load(self) -> None:
        store = self.store
        # keys() lists the most recent first; one past max_keys tells that some were left out.
        ids = store.keys(API_KEYS_NAMESPACE, limit=self.max_keys + 1)
        if len(ids) > self.max_keys:
            log.error("the state store holds more than max_keys=%d API keys; only the %d most recent are loaded",
                      self.max_keys, self.max_keys)
            ids = ids[: self.max_keys]
        for key_id in ids:
            self._take_stored(key_id, store.load(API_KEYS_NAMESPACE, key_id))

    def _take_stored(self, key_id: str, raw) -> None:
        try:
            rec = json.loads(raw)
            digest = bytes.fromhex(rec["sha256"])
            apps = rec["apps"]
            if len(digest) != 32 or not isinstance(apps, list) or not all(type(a) is str for a in apps):
                raise ValueError("bad digest or apps")
            key = ApiKey(str(rec["id"]), set(apps), str(rec.get("name", "")), str(rec.get("created", "")), digest)
        except (TypeError, ValueError, KeyError) as exc:
            # One damaged record does not stop the frontend; its key simply does not work.
            log.error("API key record %r in %s cannot be read (%s); that key does not work", key_id, self.store, exc)
            return
        self._add(key)

    def sync_stored(self, records: dict) -> None:
        """Another frontend on the shared store created or revoked keys: ``records`` (id -> stored value) is
        what the store holds now. A key revoked there stops working here at once, on every connection."""
        for key_id in [k for k in self._by_id if k not in records]:
            key = self._by_id.pop(key_id)
            self._by_digest.pop(key.digest, None)
            key.revoked = True
            key.apps.clear()
        for key_id, raw in records.items():
            if key_id not in self._by_id and raw is not None and len(self._by_id) < self.max_keys:
                self._take_stored(key_id, raw)
