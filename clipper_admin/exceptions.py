"""The original ``clipper_admin.exceptions``: every error an admin call raises is a ClipperException."""

from __future__ import annotations

__all__ = ["ClipperException", "UnconnectedException"]


class ClipperException(Exception):
    """An admin call failed. ``msg`` is the message (as the original's); ``code`` the stable code of
    Clipper's own error (:mod:`clipper.errors`) when the frontend sent one, else None."""

    def __init__(self, msg: str, code: int | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.code = code


class UnconnectedException(ClipperException):
    """An admin call made before ``start_clipper()`` or ``connect()``."""

    def __init__(self, msg: str = "No connection to Clipper cluster. Call ClipperConnection.connect to "
                                  "connect to an existing cluster or ClipperConnection.start_clipper to "
                                  "create a new one") -> None:
        super().__init__(msg)
