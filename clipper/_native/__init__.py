"""Native (Cython) hot-path modules and the switch that picks them.

Each hot-path module ``NAME`` exists twice: compiled as ``_NAME`` (from
``_NAME.pyx``) and as a pure-Python twin ``NAME_py`` with the same API and
behaviour. ``clipper._native.NAME`` is always the chosen one: the compiled
module, or the twin when ``CLIPPER_NO_EXTENSIONS=1`` is set (for debugging,
and so the tests can run both). This module is the only place that decides.

Modules: ``framing`` (stream framing, batch assembly), ``cache`` (the
prediction cache), ``batcher`` (batch-size control), ``zmqio`` (ZeroMQ
message I/O on libzmq itself; chosen through ``clipper.rpc.zio``).
"""

from __future__ import annotations

import importlib
import os

NO_EXTENSIONS: bool = os.environ.get("CLIPPER_NO_EXTENSIONS", "") not in ("", "0")
IMPLEMENTATION = "python" if NO_EXTENSIONS else "cython"
MODULES = ("framing", "cache", "batcher", "zmqio")


def load(name: str):
    """Import the chosen implementation of hot-path module ``name``."""
    if name not in MODULES:
        raise ImportError(f"clipper._native has no module {name!r}; it has {list(MODULES)}")
    if NO_EXTENSIONS:
        return importlib.import_module(f"{__name__}.{name}_py")
    try:
        return importlib.import_module(f"{__name__}._{name}")
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError(
            f"clipper's native module _{name} is not built; run `pip install -e .` "
            "or set CLIPPER_NO_EXTENSIONS=1 to use the pure-Python twins"
        ) from exc


framing = load("framing")


def __getattr__(name: str):  # cache, batcher: imported when first used
    if name in MODULES:
        module = load(name)
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NO_EXTENSIONS", "IMPLEMENTATION", "MODULES", "load", *MODULES]
