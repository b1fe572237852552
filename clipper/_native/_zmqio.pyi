"""ZeroMQ message I/O on libzmq itself (Cython; pure twin in zmqio_py.py). Chosen by ``clipper.rpc.zio``.

:func:`events`, :func:`send_parts` and :func:`recv_parts` take pyzmq sockets and
call the libzmq functions :func:`bind_library` was given (those of the libzmq
pyzmq loaded), on the socket's own handle; a closed socket raises
``zmq.ZMQError(ENOTSOCK)``.
"""

from typing import Any

import zmq

ready: bool
"""True once :func:`bind_library` found libzmq's functions."""
FUNCTIONS: tuple[str, ...]
"""The libzmq functions :func:`bind_library` needs."""

def bind_library(addresses: dict[str, int], threshold: int) -> None:
    """Use the libzmq functions at ``addresses``; parts of ``threshold`` bytes or more go
    through pyzmq's zero-copy send."""

class Msg:
    """One received message part, owned: a writable buffer over its bytes (as pyzmq's ``Frame``)."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    @property
    def bytes(self) -> bytes: ...
    @property
    def buffer(self) -> memoryview: ...
    @property
    def more(self) -> bool: ...
    def get(self, name: str) -> str:
        """A metadata property (``"User-Id"``, ``"Peer-Address"``, ...); ZMQError when absent."""

def events(sock: zmq.Socket) -> int:
    """The socket's ``ZMQ_EVENTS``."""

def send_parts(sock: zmq.Socket, parts: list[Any], flags: int = 0) -> None:
    """Send ``parts`` as one multipart message (``flags``: 0 or NOBLOCK)."""

def recv_parts(sock: zmq.Socket, flags: int, frames_at: int = 0, max_parts: int = -1) -> list[Any]:
    """Receive one multipart message: part ``i`` a :class:`Msg` when bit ``i`` of ``frames_at`` is set,
    else ``bytes``; ``zmq.Again`` under NOBLOCK when none waits. With ``max_parts`` >= 0 the parts past
    that many are dropped uncopied and one ``None`` ends the list in their place."""
