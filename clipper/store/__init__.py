"""The state store: configuration and selection-policy state that outlives a query.

Embedded by default (:class:`SQLiteStore`, one file, or ``":memory:"``); the
:class:`StateStore` interface is what a shared backend (Redis, for several
frontends) implements.
"""

from .base import StateStore
from .sqlite import SQLiteStore
from .states import StateTable

__all__ = ["StateStore", "SQLiteStore", "StateTable"]
