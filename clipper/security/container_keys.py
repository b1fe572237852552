"""Who may serve a model: container credentials and the ZAP authenticator that checks them.

The container RPC believes nothing a peer says about itself. A model
container proves who it is with a credential the frontend issued for one
model (optionally one version):

* **CURVE** (ZeroMQ's CurveZMQ: authenticated and encrypted) for containers
  that reach the frontend over TCP: the frontend has a long-lived server key
  pair kept in its secrets folder, and each credential is a client key pair
  whose public half the frontend knows. A container started by hand on
  another host gets one from ``clipper container-credentials NAME
  [VERSION]``; the local manager issues one to each child it starts.
* **PLAIN** over a Unix socket in a private folder, for the children the
  local manager starts on this machine (``local_rpc_transport = "ipc"``):
  the kernel keeps the bytes private (only this user can open the socket),
  and a per-process password, handed to the child at its start, says which
  credential it holds. No per-message cryptography on the hot path.

ZeroMQ asks the ZAP handler (pyzmq's :class:`~zmq.auth.thread.ThreadAuthenticator`,
on its own thread) at every handshake; a peer without a valid credential
completes no handshake and can send nothing. Each message that arrives
carries the credential's id as its ZeroMQ ``User-Id``, so the RPC server
checks every hello (and every later message) against the grant: a container
holding model A's key cannot register as model B. Revoking a credential
removes it from the table (no new handshake) and drops the replicas that
hold it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from ..errors import InvalidConfigError
from .files import loose_permissions, private_dir, read_private, write_private

if TYPE_CHECKING:
    from ..store.base import StateStore

log = logging.getLogger("clipper.rpc.auth")

__all__ = ["ContainerGrant", "ContainerKeyring", "ContainerCredentials", "CREDENTIALS_KIND"]

CREDENTIALS_KIND = "clipper-container-credentials"
CREDENTIALS_FORMAT = 1
STORE_NAMESPACE = "container-credentials"
SERVER_KEY_NAME = "rpc-server"  # <secrets>/rpc-server.key and rpc-server.key_secret (ZeroMQ certificate files)
MAX_LABEL_LEN = 256
ZAP_DOMAIN = "clipper"  # the ZAP domain of the container RPC's sockets


def _z85_key(value, what: str) -> bytes:
    """A CURVE key in Z85 text (40 characters, 32 bytes decoded), as bytes."""
    if isinstance(value, str):
        value = value.encode("ascii", "replace")
    if not isinstance(value, bytes) or len(value) != 40:
        raise InvalidConfigError(f"{what} is not a CURVE key (40 characters of Z85 text)")
    try:
        if len(z85.decode(value)) != 32:
            raise ValueError
    except (ValueError, KeyError, IndexError, TypeError):
        raise InvalidConfigError(f"{what} is not valid Z85 text") from None
    return value


@dataclass
class ContainerGrant:
    """One credential: who may register as which model.

    ``public_key`` (CURVE) or ``password`` (PLAIN, local children only) is what
    the peer proves it holds; ``id`` is what ZeroMQ stamps on its messages.
    """

    id: str
    model: str
    version: str | None  # None: any version of the model
    # "operator" (issued through the admin API), "manager" (a child of this frontend's local manager) or
    # "peer" (a child of another frontend's manager in this --workers group, learned from the shared store)
    origin: str
    created: float
    public_key: bytes | None = None  # Z85
    password: str | None = field(default=None, repr=False)
    pid: int | None = None  # manager grants: the process started with it (known, not claimed)
    label: str = ""

    def allows(self, model: str, version: str) -> bool:
        return model == self.model and (self.version is None or version == self.version)

    def names(self) -> str:
        return self.model if self.version is None else f"{self.model}:{self.version}"

    def describe(self) -> dict:
        """What the admin API shows: never a secret."""
        out = {"id": self.id, "model": self.model, "version": self.version, "origin": self.origin,
               "created": self.created, "label": self.label,
               "mechanism": "curve" if self.public_key is not None else "plain"}
        if self.public_key is not None:
            out["public_key"] = self.public_key.decode()
        if self.pid is not None:
            out["pid"] = self.pid
        return out

    def to_store(self) -> bytes:
        d = {"model": self.model, "version": self.version, "created": self.created, "label": self.label}
        if self.origin != "operator":
            d["origin"] = self.origin
        if self.public_key is not None:
            d["public_key"] = self.public_key.decode()
        else:  # PLAIN (a leader's local child): only a digest of the password leaves this process
            assert self.password is not None  # (a grant with neither is not stored: ContainerKeyring._stored)
            d["password_sha256"] = _digest(self.password)
        return json.dumps(d).encode()


def _digest(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()


class _Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler on its own thread, asking the keyring.

    It reads the keyring's tables with one ``dict.get`` per check (atomic
    under the GIL, so a revocation on the loop's thread between two reads
    cannot raise here); only the event loop's thread changes them. The two
    checks are ours rather than pyzmq's: one lookup, a constant-time
    comparison, no secret in any log line, and no exception that could end
    the thread (which would fail every later handshake).
    """

    def __init__(self, ctx: zmq.Context, keyring: "ContainerKeyring") -> None:
        super().__init__(ctx, log=logging.getLogger("clipper.rpc.zap"))
        self.keyring = keyring

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        try:
            ok = self.keyring._by_key.get(z85.encode(client_key)) is not None
        except Exception:
            ok = False
        if not ok:
            self.keyring.denied += 1
        return ok, b"OK" if ok else b"Unknown key"

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        try:
            known = self.keyring.passwords.get(username)
            if known is not None:
                ok = hmac.compare_digest(known.encode(), password.encode())
            else:  # a peer's child (a --workers group): the shared store holds a digest of its password
                digest = self.keyring.digests.get(username)
                ok = digest is not None and hmac.compare_digest(digest, _digest(password))
        except Exception:
            ok = False
        if not ok:
            self.keyring.denied += 1
        return ok, b"OK" if ok else b"Unknown credentials"

    def curve_user_id(self, client_public_key: bytes) -> str:
        grant = self.keyring._by_key.get(z85.encode(client_public_key))
        return grant.id if grant is not None else ""  # revoked since its check: the RPC server refuses ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        try:
            await super().handle_zap_message(msg)
        except Exception:  # never let one request end the thread
            self.log.exception("the ZAP handler failed on a request; refusing it")
            if len(msg) >= 2:
                try:
                    self._send_zap_reply(msg[1], b"500", b"Internal error")
                except Exception:
                    pass

    def stop(self) -> None:
        if self.thread is not None and not self.thread.is_alive():  # nobody left to read TERMINATE
            self.thread = None  # type: ignore[assignment]  # (as ThreadAuthenticator.stop leaves it)
            if self.pipe is not None:
                self.pipe.close(linger=0)
                self.pipe = None  # type: ignore[assignment]
        super().stop()


class ContainerKeyring:
    """The credentials of the container RPC: the server key pair and every grant.

    ``mode`` is the frontend's ``rpc_security``: ``"curve"`` authenticates
    every container; ``"none"`` (loopback benchmarking only) checks nothing at
    the socket and believes the credential id a container names in its hello.
    """

    def __init__(self, mode: str, public_key: bytes, secret_key: bytes, folder: Path | None) -> None:
        if mode not in ("curve", "none"):
            raise InvalidConfigError(f"rpc_security {mode!r} is not one of 'curve', 'none'")
        self.mode = mode
        self.public_key = public_key
        self.secret_key = secret_key
        self.folder = folder
        self.grants: dict[str, ContainerGrant] = {}
        self._by_key: dict[bytes, ContainerGrant] = {}
        self.passwords: dict[str, str] = {}  # PLAIN: grant id -> password (the authenticator reads it)
        self.digests: dict[str, str] = {}  # PLAIN grants of peers: grant id -> SHA-256 of the password
        self._share_local = False  # a --workers group: manager grants go to the shared store too
        self._leader = False
        self._on_shared = None
        self.denied = 0  # handshakes the ZAP handler refused
        self.on_revoke = None  # (grant, reason) -> None: drop the replicas holding it
        self._auths: list[_Authenticator] = []
        self._store: StateStore | None = None

    @classmethod
    def open(cls, mode: str, folder: str | os.PathLike | None) -> "ContainerKeyring":
        """Load the server key pair from ``folder`` (created at the first start), or make a
        throwaway one when ``folder`` is None."""
        if folder is None:
            pub, sec = zmq.curve_keypair()
            return cls(mode, pub, sec, None)
        d = private_dir(folder)
        public_file = d / f"{SERVER_KEY_NAME}.key"
        secret_file = d / f"{SERVER_KEY_NAME}.key_secret"
        if not secret_file.exists():
            zmq.auth.create_certificates(str(d), SERVER_KEY_NAME)  # in a 0700 folder: private from the start
            for f in (public_file, secret_file):
                os.chmod(f, 0o600)
            log.info("created the container RPC server key pair in %s", d)
        why = loose_permissions(secret_file)
        if why:
            raise InvalidConfigError(f"the container RPC's secret key {why}")
        try:
            pub, sec = zmq.auth.load_certificate(str(secret_file))  # type: ignore[assignment]  # (sec checked below)
        except (OSError, ValueError) as exc:
            raise InvalidConfigError(f"cannot load the container RPC key {str(secret_file)!r}: {exc}") from None
        if sec is None:
            raise InvalidConfigError(f"{str(secret_file)!r} holds no secret key")
        return cls(mode, pub, sec, d)

    # ------------------------------------------------------------ the ZAP handler
    def start_authenticator(self, ctx: zmq.Context) -> None:
        """Answer ZeroMQ's handshakes for sockets of ``ctx`` (one handler per context)."""
        if self.mode == "none":
            return
        auth = _Authenticator(ctx, self)
        auth.start()  # both checks are _Authenticator's own: nothing to configure
        self._auths.append(auth)

    def stop(self) -> None:
        for auth in self._auths:
            auth.stop()
        self._auths.clear()

    # ------------------------------------------------------------ grants
    def issue(self, model: str, version: str | None = None, *, origin: str = "operator", label: str = "",
              mechanism: str = "curve") -> tuple[ContainerGrant, dict]:
        """A new credential for ``model`` (and ``version``, if given).

        Returns the grant and its secret half (``{"secret_key", "public_key"}``
        for CURVE, ``{"password"}`` for PLAIN), which the frontend does not keep
        for operator credentials: it is shown once.
        """
        if not isinstance(label, str) or len(label) > MAX_LABEL_LEN:
            raise InvalidConfigError(f"a credential label is a string of at most {MAX_LABEL_LEN} characters")
        gid = secrets.token_hex(8)
        grant = ContainerGrant(gid, model, version, origin, round(time.time(), 3), label=label)
        if mechanism == "curve":
            pub, sec = zmq.curve_keypair()
            grant.public_key = pub
            secret = {"public_key": pub.decode(), "secret_key": sec.decode()}
            self._by_key[pub] = grant
        elif mechanism == "plain":
            grant.password = secrets.token_urlsafe(32)
            secret = {"password": grant.password}
            self.passwords[gid] = grant.password
        elif mechanism == "none" and self.mode == "none":
            secret = {"mechanism": "none"}  # a name the hello gives, believed on loopback only
        else:
            raise InvalidConfigError(f"credential mechanism {mechanism!r} is not 'curve' or 'plain'")
        self.grants[gid] = grant
        if self._stored(grant):
            assert self._store is not None
            self._store.save_many([(STORE_NAMESPACE, gid, grant.to_store())])
            if origin != "operator" and self._on_shared is not None:
                self._on_shared()  # the peers catch up now (operator ones: the admin API announces)
        return grant, secret

    def _stored(self, grant: ContainerGrant) -> bool:
        # (rpc_security "none": a grant with neither key nor password is not stored; the members believe its id.)
        return self._store is not None and (grant.origin == "operator"
                                            or (grant.origin == "manager" and self._share_local
                                                and (grant.public_key is not None or grant.password is not None)))

    def share_local(self, on_change, *, leader: bool) -> None:
        """This frontend is one of a ``--workers`` group: its local manager's credentials (the leader's) are
        kept in the shared store too, so every member accepts the leader's children; ``on_change`` tells the
        members. Call before :meth:`attach_store`."""
        self._share_local = True
        self._leader = leader
        self._on_shared = on_change

    def get(self, grant_id) -> ContainerGrant | None:
        return self.grants.get(grant_id) if type(grant_id) is str else None

    def revoke(self, grant_id: str, reason: str = "its credentials were revoked", *,
               in_store: bool = True) -> ContainerGrant:
        """Forget a credential: no new handshake with it, and its replicas are dropped (``in_store``
        False: another frontend revoked it and removed it from the shared store already)."""
        grant = self.grants.pop(grant_id, None) if type(grant_id) is str else None
        if grant is None:
            raise InvalidConfigError(f"no container credentials with id {grant_id!r}")
        if grant.public_key is not None:
            self._by_key.pop(grant.public_key, None)
        self.passwords.pop(grant.id, None)
        self.digests.pop(grant.id, None)
        if self._stored(grant) and in_store:
            assert self._store is not None
            self._store.delete(STORE_NAMESPACE, grant.id)
            if grant.origin != "operator" and self._on_shared is not None:
                self._on_shared()
        if self.on_revoke is not None:
            self.on_revoke(grant, reason)
        return grant

    def revoke_model(self, model: str, version: str | None = None, reason: str = "its model was deleted") -> int:
        """Revoke the operator credentials of a deleted model (every one) or version (those naming it)."""
        gone = [g.id for g in self.grants.values() if g.origin == "operator" and g.model == model
                and (version is None or g.version == version)]
        for gid in gone:
            self.revoke(gid, reason)
        return len(gone)

    def operator_grants(self) -> list[dict]:
        return [g.describe() for g in self.grants.values() if g.origin == "operator"]

    # ------------------------------------------------------------ persistence (operator credentials)
    def attach_store(self, store) -> int:
        """Keep operator credentials in ``store`` and load those it holds; returns how many."""
        self._store = store
        n = 0
        for gid in store.keys(STORE_NAMESPACE, limit=1_000_000):
            raw = store.load(STORE_NAMESPACE, gid)
            if self._leader and raw is not None and b'"origin"' in raw:
                # A group's leader starts: stored local credentials are its predecessor's children's, which
                # died with it.
                store.delete(STORE_NAMESPACE, gid)
                continue
            n += self._take_stored(gid, raw)
        return n

    def _take_stored(self, gid: str, raw) -> bool:
        try:
            d = json.loads(raw)
            origin = "operator" if d.get("origin") is None else "peer"
            if "public_key" in d or origin == "operator":
                pub, digest = _z85_key(d["public_key"], "a stored public key"), None
            else:
                pub, digest = None, d["password_sha256"]
                if not isinstance(digest, str) or len(digest) != 64:
                    raise ValueError("password_sha256 is not a SHA-256 digest")
            grant = ContainerGrant(gid, str(d["model"]), None if d.get("version") is None else str(d["version"]),
                                   origin, float(d.get("created", 0)), public_key=pub,
                                   label=str(d.get("label", "")))
        except (ValueError, KeyError, TypeError, InvalidConfigError) as exc:
            log.error("ignoring stored container credentials %r: %s", gid, exc)
            return False
        self.grants[gid] = grant
        if pub is not None:
            self._by_key[pub] = grant
        else:
            assert digest is not None
            self.digests[gid] = digest
        return True

    def sync_stored(self, records: dict) -> None:
        """Another frontend on the shared store issued or revoked operator credentials: ``records`` (id ->
        stored value) is what the store holds now. Revoked ones drop their replicas here too."""
        for gid in [g.id for g in self.grants.values() if g.origin in ("operator", "peer") and g.id not in records]:
            self.revoke(gid, "its credentials were revoked (by another frontend)", in_store=False)
        for gid, raw in records.items():
            if gid not in self.grants and raw is not None:
                self._take_stored(gid, raw)


@dataclass
class ContainerCredentials:
    """What a container holds: its credential and the frontend's public key.

    The file ``clipper container-credentials`` writes (JSON, 0600)::

        {"kind": "clipper-container-credentials", "format": 1, "id": ..., "model": ..., "version": ... | null,
         "frontend": "tcp://HOST:7000", "mechanism": "curve",
         "server_public_key": Z85, "public_key": Z85, "secret_key": Z85}

    (``"mechanism": "plain"`` with ``"password"`` instead of the keys for the
    local manager's children on a Unix socket; ``"none"`` with neither under
    ``rpc_security = "none"``).
    """

    id: str
    model: str
    version: str | None
    mechanism: str
    frontend: str | None = None
    server_public_key: bytes | None = None
    public_key: bytes | None = None
    secret_key: bytes | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)

    @classmethod
    def document(cls, grant: ContainerGrant, secret: dict, server_public_key: bytes | None,
                 frontend: str | None) -> dict:
        doc = {"kind": CREDENTIALS_KIND, "format": CREDENTIALS_FORMAT, "id": grant.id, "model": grant.model,
               "version": grant.version, "frontend": frontend}
        if "password" in secret:
            doc.update(mechanism="plain", password=secret["password"])
        elif secret.get("mechanism") == "none":
            doc.update(mechanism="none")
        else:
            assert server_public_key is not None  # (a CURVE document names the server's key)
            doc.update(mechanism="curve", server_public_key=server_public_key.decode(),
                       public_key=secret["public_key"], secret_key=secret["secret_key"])
        return doc

    @classmethod
    def from_document(cls, doc, where: str = "credentials") -> "ContainerCredentials":
        if not isinstance(doc, dict) or doc.get("kind") != CREDENTIALS_KIND:
            raise InvalidConfigError(f"{where} are not Clipper container credentials (no \"kind\": "
                                     f"\"{CREDENTIALS_KIND}\")")
        if doc.get("format") != CREDENTIALS_FORMAT:
            raise InvalidConfigError(f"{where} have format {doc.get('format')!r}; this container reads "
                                     f"format {CREDENTIALS_FORMAT}")
        gid, model, version = doc.get("id"), doc.get("model"), doc.get("version")
        frontend = doc.get("frontend")
        if not isinstance(gid, str) or not 0 < len(gid) <= 64:
            raise InvalidConfigError(f"{where}: id {gid!r} is not a credential id")
        if not isinstance(model, str) or not model:
            raise InvalidConfigError(f"{where}: model {model!r} is not a model name")
        if version is not None and not isinstance(version, str):
            raise InvalidConfigError(f"{where}: version {version!r} is not a string or null")
        if frontend is not None and (not isinstance(frontend, str) or len(frontend) > 1024):
            raise InvalidConfigError(f"{where}: frontend {frontend!r} is not an address like tcp://HOST:7000")
        mech = doc.get("mechanism")
        if mech == "curve":
            return cls(gid, model, version, mech, frontend,
                       _z85_key(doc.get("server_public_key"), f"{where}: server_public_key"),
                       _z85_key(doc.get("public_key"), f"{where}: public_key"),
                       _z85_key(doc.get("secret_key"), f"{where}: secret_key"))
        if mech == "plain":
            pw = doc.get("password")
            if not isinstance(pw, str) or not 16 <= len(pw) <= 256:
                raise InvalidConfigError(f"{where}: password is not a credential password")
            return cls(gid, model, version, mech, frontend, password=pw)
        if mech == "none":
            return cls(gid, model, version, mech, frontend)
        raise InvalidConfigError(f"{where}: mechanism {mech!r} is not 'curve', 'plain' or 'none'")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ContainerCredentials":
        """Read a credentials file (warns when others than its owner can read it)."""
        raw = read_private(path, "container credentials file")
        why = loose_permissions(path)
        if why:
            log.warning("container credentials %s", why)
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise InvalidConfigError(f"container credentials file {str(path)!r} is not JSON: {exc}") from None
        return cls.from_document(doc, f"container credentials {str(path)!r}")

    @classmethod
    def loads(cls, text: str, where: str = "CLIPPER_CREDENTIALS") -> "ContainerCredentials":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise InvalidConfigError(f"{where} is not JSON: {exc}") from None
        return cls.from_document(doc, where)

    def apply(self, sock: zmq.Socket) -> None:
        """Set the socket's security options (before it connects)."""
        if self.mechanism == "curve":
            sock.curve_serverkey = self.server_public_key
            sock.curve_publickey = self.public_key
            sock.curve_secretkey = self.secret_key
        elif self.mechanism == "plain":
            sock.plain_username = self.id.encode()
            assert self.password is not None  # (a PLAIN credential has one)
            sock.plain_password = self.password.encode()
        # "none": nothing to prove at the socket (rpc_security = "none", loopback only)


def save_credentials(path: str | os.PathLike, doc: dict) -> None:
    """Write a credentials document to ``path``, readable by this user only."""
    write_private(path, (json.dumps(doc, indent=2) + "\n").encode())
