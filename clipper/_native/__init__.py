"""Native (Cython) hot-path modules and the switch that picks them.

Set ``CLIPPER_NO_EXTENSIONS=1`` to load the pure-Python twins instead (for
debugging, and so the tests can run both). This module is the only place that
decides: the compiled modules carry a leading underscore (``_framing``),
so ``clipper._native.framing`` is always the chosen implementation.
"""

from __future__ import annotations

import os

NO_EXTENSIONS: bool = os.environ.get("CLIPPER_NO_EXTENSIONS", "") not in ("", "0")

if NO_EXTENSIONS:
    from . import framing_py as framing
else:
    try:
        from . import _framing as framing  # type: ignore[no-redef]
    except ImportError as exc:  # pragma: no cover - a broken install
        raise ImportError(
            "clipper's native modules are not built; run `pip install -e .` "
            "or set CLIPPER_NO_EXTENSIONS=1 to use the pure-Python twins"
        ) from exc

IMPLEMENTATION = "python" if NO_EXTENSIONS else "cython"

__all__ = ["NO_EXTENSIONS", "IMPLEMENTATION", "framing"]
