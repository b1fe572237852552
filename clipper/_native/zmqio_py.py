"""ZeroMQ message I/O for the per-batch path through pyzmq (the pure twin of ``_zmqio.pyx``).

The same functions as the native module, on pyzmq's compiled ``Socket``
methods with plain integer flags (its convenience layer builds an ``IntFlag``
per call). Received parts that are not ``bytes`` are pyzmq ``Frame`` objects,
which have what :class:`clipper._native._zmqio.Msg` has (a buffer, ``len``,
``bytes``, ``buffer``, ``more``, ``get``). Used where the native module cannot
be bound to libzmq, and with ``CLIPPER_NO_EXTENSIONS=1``.
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.backend import Socket as _CSocket

__all__ = ["FUNCTIONS", "bind_library", "events", "ready", "recv_parts", "send_parts"]

ready = True
FUNCTIONS: tuple[str, ...] = ()

_EVENTS = int(zmq.EVENTS)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_send = _CSocket.send
_recv = _CSocket.recv
_get = _CSocket.get


def bind_library(addresses: dict, threshold: int) -> None:
    """Nothing to bind: pyzmq is called (the socket's ``copy_threshold`` decides copies)."""


def events(sock: zmq.Socket) -> int:
    """The socket's ``ZMQ_EVENTS`` as a plain int (``& POLLIN``: a message can be read now)."""
    return _get(sock, _EVENTS)  # type: ignore[return-value]  # an int option


def send_parts(sock: zmq.Socket, parts: list, flags: int = 0) -> None:
    """Send ``parts`` as one multipart message (``flags``: 0 or NOBLOCK); pyzmq copies a part
    below the socket's ``copy_threshold`` and sends a larger one without a copy."""
    if not parts:
        raise ValueError("a message has at least one part")
    for i, part in enumerate(parts):  # all or nothing: a part found unsendable halfway would leave the others queued
        if type(part) is not bytes:
            try:
                memoryview(part)
            except TypeError:
                raise TypeError(f"part {i} of a message is a {type(part).__name__}, not a bytes-like object") from None
    more = flags | _SNDMORE
    last = len(parts) - 1
    for i in range(last):
        _send(sock, parts[i], more, False)
    _send(sock, parts[last], flags, False)


def recv_parts(sock: zmq.Socket, flags: int, frames_at: int = 0, max_parts: int = -1) -> list:
    """Receive one multipart message; part ``i`` is a :class:`zmq.Frame` when bit ``i`` of
    ``frames_at`` is set, else ``bytes``. Raises :class:`zmq.Again` under NOBLOCK when no
    message waits. With ``max_parts`` >= 0, the parts past that many are received and dropped
    uncopied, and ``None`` ends the list in their place (one for all of them)."""
    if max_parts == 0:
        part: Any = _recv(sock, flags, False)
        parts: list = [None]
    else:
        as_frame = frames_at & 1
        part = _recv(sock, flags, not as_frame)
        parts = [part]
    i = 1
    while part.more if type(part) is not bytes else _get(sock, _RCVMORE):
        if 0 <= max_parts <= i:
            part = _recv(sock, flags, False)  # a Frame, dropped: no copy
            if i == max_parts:
                parts.append(None)
        else:
            as_frame = (frames_at >> i) & 1
            part = _recv(sock, flags, not as_frame)
            parts.append(part)
        i += 1
    return parts
