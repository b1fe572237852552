"""The admin API's bearer token: where it lives, how it changes, how a client finds it.

The frontend keeps the token in a file readable by its user only
(``admin-token`` in its secrets folder, or ``admin_token_file``), created at
the first start. It re-reads the file when the file changes, so an operator
can set the token by writing the file; ``POST /api/v1/admin-token/rotate``
(``clipper rotate-admin-token``) writes a fresh one.

A client on the same machine needs no step: at start the frontend publishes
``admin-<port>.json`` in a private runtime folder of its user
(``$CLIPPER_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/clipper``, else
``~/.cache/clipper/run``), naming the token file, and the admin client and
the CLI look there. A remote operator passes the token itself
(``CLIPPER_ADMIN_TOKEN``) or a file holding it (``CLIPPER_ADMIN_TOKEN_FILE``,
``--token-file``).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
from pathlib import Path

from ..errors import InvalidConfigError
from .files import loose_permissions, private_dir, read_private, write_private

log = logging.getLogger("clipper.admin")

__all__ = ["AdminToken", "runtime_dir", "publish", "unpublish", "discover", "resolve_client_token"]

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512
_TOKEN_RE = re.compile(rb"^[\x21-\x7e]+\Z")  # printable ASCII without spaces: it travels in a header


def _check_token(raw: bytes, where: str) -> bytes:
    token = raw.strip()
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS or not _TOKEN_RE.match(token):
        raise InvalidConfigError(f"the admin token in {where} is not {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} printable "
                                 "ASCII characters without spaces")
    return token


class AdminToken:
    """The token the admin API asks for, backed by a 0600 file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser().resolve()
        self._token = b""
        self._sig: object = None  # the file's stat signature when last read, or "refused"
        if not self.path.exists():
            if not self.path.parent.exists():  # a folder of its own: private; an existing one is left as it is
                private_dir(self.path.parent)
            write_private(self.path, secrets.token_urlsafe(32).encode() + b"\n")
            log.info("created the admin token in %s", self.path)
        self._load(force=True)

    def _signature(self):
        st = os.stat(self.path)
        if st.st_uid != os.getuid():
            raise InvalidConfigError(f"the admin token file {str(self.path)!r} belongs to uid {st.st_uid}, not to "
                                     f"this user: whoever owns it could choose the token")
        why = loose_permissions(self.path)
        if why:
            raise InvalidConfigError(f"the admin token file {why}")
        return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)

    def _load(self, force: bool = False) -> None:
        try:
            sig = self._signature()
        except OSError as exc:
            if force:
                raise InvalidConfigError(f"cannot read the admin token file {str(self.path)!r}: {exc}") from None
            return  # gone for a moment (an editor's rename): keep the token we know
        except InvalidConfigError as exc:
            if force:
                raise
            if self._sig != "refused":
                log.error("%s; the admin API keeps the previous token", exc.message)
            self._sig = "refused"
            return
        if not force and sig == self._sig:
            return
        try:
            token = _check_token(read_private(self.path, "admin token file", 4096), str(self.path))
        except InvalidConfigError as exc:
            if force:
                raise
            log.error("%s; the admin API keeps the previous token", exc.message)
            self._sig = sig
            return
        self._token, self._sig = token, sig

    def check(self, presented: bytes | None) -> bool:
        """Whether ``presented`` is the current token (compared in constant time)."""
        self._load()
        return presented is not None and hmac.compare_digest(presented, self._token)

    def rotate(self) -> str:
        """Write a fresh token to the file; the previous one stops working at once."""
        token = secrets.token_urlsafe(32).encode()
        write_private(self.path, token + b"\n")
        self._token, self._sig = token, self._signature()
        return token.decode()


# ---------------------------------------------------------------- discovery on this machine
def runtime_dir(create: bool = False) -> Path:
    """The private folder where running frontends say where their admin tokens are."""
    base = os.environ.get("CLIPPER_RUNTIME_DIR")
    if base:
        p = Path(base)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        p = Path(os.environ["XDG_RUNTIME_DIR"]) / "clipper"
    else:
        p = Path.home() / ".cache" / "clipper" / "run"
    return private_dir(p) if create else p


def publish(host: str, port: int, token_file: Path, cert_file: str | None) -> Path | None:
    """Tell clients on this machine where the admin token of the frontend on ``port`` is."""
    try:
        folder = runtime_dir(create=True)
        path = folder / f"admin-{int(port)}.json"
        write_private(path, json.dumps({"pid": os.getpid(), "host": host, "port": int(port),
                                        "token_file": str(token_file),
                                        "tls_cert_file": str(Path(cert_file).resolve()) if cert_file else None})
                      .encode())
        return path
    except (InvalidConfigError, OSError) as exc:  # discovery is a convenience: never a reason not to start
        log.warning("cannot publish the admin token's location for local clients: %s", exc)
        return None


def unpublish(path: Path | None) -> None:
    """Remove what :func:`publish` wrote, unless another frontend has taken the port since."""
    if path is None:
        return
    try:
        if json.loads(path.read_bytes()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass


def discover(port: int) -> dict | None:
    """What the frontend on ``port`` of this machine published, if this user can read it and the
    process that published it still listens on that port.

    A file left behind by a frontend that died is not believed: another user
    may hold the port by now, and the token must not go to them.
    """
    path = runtime_dir() / f"admin-{int(port)}.json"
    try:
        st = os.stat(path)
        if st.st_uid != os.getuid():
            return None
        info = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or type(info.get("pid")) is not int:
        return None
    return info if _listens(info["pid"], int(port)) else None


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` (of this user) holds a socket listening on TCP ``port`` (Linux /proc)."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                with open(table) as fh:
                    next(fh)
                    for line in fh:
                        f = line.split()
                        # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; field 9 is the inode
                        if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                            inodes.add(f[9])
            except FileNotFoundError:
                continue
        if not inodes:
            return False
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return True
    except (OSError, ValueError, IndexError, StopIteration):
        return False
    return False


def resolve_client_token(port: int, token: str | None = None, token_file: str | None = None,
                         local: bool = True) -> tuple[str | None, str, dict | None]:
    """The token a client sends: ``(token, where it came from, discovery info)``.

    In order: the ``token`` given, the ``token_file`` given, ``$CLIPPER_ADMIN_TOKEN``,
    ``$CLIPPER_ADMIN_TOKEN_FILE``, then (``local``: the frontend is on this
    machine) the file the frontend on ``port`` published.
    """
    info = discover(port) if local else None
    if token:
        return token.strip(), "the token given", info
    file = token_file or None
    source = "--token-file"
    if file is None and os.environ.get("CLIPPER_ADMIN_TOKEN"):
        return os.environ["CLIPPER_ADMIN_TOKEN"].strip(), "$CLIPPER_ADMIN_TOKEN", info
    if file is None and os.environ.get("CLIPPER_ADMIN_TOKEN_FILE"):
        file, source = os.environ["CLIPPER_ADMIN_TOKEN_FILE"], "$CLIPPER_ADMIN_TOKEN_FILE"
    if file is None and info is not None and isinstance(info.get("token_file"), str):
        file, source = info["token_file"], f"the token file of the frontend on port {port}"
    if file is None:
        return None, "nowhere (no token given, no CLIPPER_ADMIN_TOKEN, no local frontend on that port)", info
    try:
        return read_private(file, "admin token file", 4096).strip().decode("ascii", "replace"), \
            f"{source} ({file})", info
    except InvalidConfigError as exc:
        return None, exc.message, info
