"""Files that hold secrets: a private folder (0700) and files only their owner reads (0600).

A secret is written to a temporary file opened with mode 0600 from the start
(never a moment world-readable, whatever the umask), then renamed over the
old one, so a reader sees the old secret or the new one and never half of it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import InvalidConfigError

__all__ = ["private_dir", "write_private", "read_private", "loose_permissions"]


def private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) if missing; make it 0700; return it.

    Refuses a folder owned by another user: whoever owns it could swap the
    secrets inside.
    """
    p = Path(path).expanduser()
    try:
        p.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = p.stat()
        if st.st_uid != os.getuid():
            raise InvalidConfigError(f"secrets folder {str(p)!r} belongs to uid {st.st_uid}, not to this user "
                                     f"(uid {os.getuid()}); refusing to keep credentials there")
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(p, 0o700)
    except OSError as exc:
        raise InvalidConfigError(f"cannot create the secrets folder {str(p)!r}: {exc}") from None
    return p


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable and writable by this user only (0600)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)  # an existing tmp file keeps its mode through O_CREAT
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise InvalidConfigError(f"cannot write {str(p)!r}: {exc}") from None


def loose_permissions(path: str | os.PathLike) -> str | None:
    """Why ``path`` is readable by others than its owner, or None if it is not."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    if mode & 0o077:
        return f"{str(path)!r} has mode {mode:04o}; others than its owner can read it (chmod 600 it)"
    return None


def read_private(path: str | os.PathLike, what: str, max_bytes: int = 65536) -> bytes:
    """Read a small secret file; a clear error when it is missing or too large."""
    p = Path(path).expanduser()
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise InvalidConfigError(f"cannot read {what} {str(p)!r}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise InvalidConfigError(f"{what} {str(p)!r} is larger than {max_bytes} bytes; is it the right file?")
    return data
