"""ZeroMQ message I/O for the per-batch path, on pyzmq's compiled socket methods.

pyzmq's convenience layer (``Socket.send_multipart``, ``recv_multipart``,
``getsockopt``) builds an ``IntFlag`` for every ``SNDMORE | flags`` and asks
``RCVMORE`` with a separate call per part; measured on this machine a
three-part send and receive cost 22 us that way against 12.6 us through the
compiled ``Socket.send``/``recv``/``get`` with plain integer flags, and
``EVENTS`` 4.8 against 2.4 us. Every batch pays each of them once, and a lone
client's query is a batch of one.

``recv_parts`` lets the caller choose per part whether it becomes ``bytes``
(a copy: no ``Frame`` object, whose creation and release each cost a
``getpid`` system call in pyzmq) or a :class:`zmq.Frame` (for a part that is
large, or whose metadata such as ``User-Id`` is read).
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.backend import Socket as _CSocket

__all__ = ["COPY_THRESHOLD", "EVENTS", "NOBLOCK", "POLLIN", "SNDMORE", "events", "recv_parts", "send_parts"]

EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
# Parts from this size on are sent without a copy (see send_parts): copying 256 KiB costs about
# what one wake of pyzmq's release thread does.
COPY_THRESHOLD = 256 * 1024
_send = _CSocket.send
_recv = _CSocket.recv
_get = _CSocket.get


def events(sock: zmq.Socket) -> int:
    """The socket's ``ZMQ_EVENTS`` as a plain int (``& POLLIN``: a message can be read now)."""
    return _get(sock, EVENTS)  # type: ignore[return-value]  # an int option


def send_parts(sock: zmq.Socket, parts: list, flags: int = 0) -> None:
    """Send ``parts`` as one multipart message (``flags``: 0 or NOBLOCK).

    A part of at least the socket's ``copy_threshold`` bytes (:data:`COPY_THRESHOLD` on the
    sockets of Clipper's RPC) goes without a copy: pyzmq keeps a reference until ZeroMQ has
    sent it and drops it on its garbage-collector thread, which wakes and takes the GIL once
    per message. Below that a part is copied into ZeroMQ's message: under load with the
    threshold at pyzmq's 64 KiB that thread took 11% of the frontend's samples and the send
    7%, where copying a batch of 32 no-op inputs (100 KB) takes a few microseconds (the
    frontend's CPU per query was 0.91x with copies, 4x32 in flight, medians of 4 runs).
    """
    more = flags | SNDMORE
    last = len(parts) - 1
    for i in range(last):
        _send(sock, parts[i], more, False)
    _send(sock, parts[last], flags, False)


def recv_parts(sock: zmq.Socket, flags: int, frames_at: int = 0) -> list:
    """Receive one multipart message; part ``i`` is a :class:`zmq.Frame` when bit ``i`` of
    ``frames_at`` is set, else ``bytes``. Raises :class:`zmq.Again` under NOBLOCK when no
    message waits."""
    as_frame = frames_at & 1
    part: Any = _recv(sock, flags, not as_frame)
    parts = [part]
    i = 1
    while part.more if as_frame else _get(sock, _RCVMORE):
        as_frame = (frames_at >> i) & 1
        part = _recv(sock, flags, not as_frame)
        parts.append(part)
        i += 1
    return parts
