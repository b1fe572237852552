"""Clipper: a low-latency online prediction serving system.

The public names: the clients (:class:`Client`, :class:`AsyncClient`), the
error tree (:mod:`clipper.errors`), and for embedding a frontend in a Python
program, :class:`Frontend` with :class:`FrontendConfig`, :class:`Application`
and :class:`ModelVersion`.
"""

__version__ = "0.1.0"

from . import errors  # noqa: E402
from .config import FrontendConfig, Limits  # noqa: E402
from .management.registry import Application, ModelVersion  # noqa: E402


def __getattr__(name):  # lazy: the client does not need the server's imports, nor the reverse
    if name == "Frontend":
        from .frontend import Frontend

        return Frontend
    if name in ("Client", "AsyncClient", "Prediction"):
        from . import client

        return getattr(client, name)
    raise AttributeError(f"module 'clipper' has no attribute {name!r}")


__all__ = ["__version__", "errors", "Frontend", "FrontendConfig", "Limits", "Application", "ModelVersion",
           "Client", "AsyncClient", "Prediction"]
