"""The msgpack wire protocol: framing and message codec (see docs/protocol.md)."""

from .wire import *  # noqa: F401,F403
from .wire import __all__  # noqa: F401
