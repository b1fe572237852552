"""Python clients for Clipper's msgpack query port (see docs/protocol.md).

:class:`Client` is synchronous and thread-safe; :class:`AsyncClient` runs on
asyncio and pipelines concurrent calls on one connection. Both answer with a
:class:`Prediction` and raise :mod:`clipper.errors` classes.
"""

from ._async import AsyncClient
from ._common import Prediction
from ._sync import Client

__all__ = ["Client", "AsyncClient", "Prediction"]
