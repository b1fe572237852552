"""``deploy_python_closure`` and ``create_endpoint``, as the original ``clipper_admin.deployers.python``.

The function is serialized with cloudpickle and run by this Clipper's container
SDK in a local process, with this interpreter's packages (``base_image``,
``registry`` and ``pkgs_to_install`` belong to the original's Docker images:
install packages into this environment instead). It gets a list of inputs
per batch -- numpy arrays for ``integers``/``floats``/``doubles``, ``str``
for ``strings``, ``bytes`` for ``bytes`` -- and returns one output per input
(the original wants strings; a string holding JSON is answered as that JSON).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, cast

from clipper import errors as E

from ..clipper_admin import ClipperConnection, input_type_spec
from ..exceptions import ClipperException

__all__ = ["deploy_python_closure", "create_endpoint"]

log = logging.getLogger("clipper_admin")


def deploy_python_closure(clipper_conn: ClipperConnection, name: str, version: str | int, input_type: str, func: Callable[[list[Any]], Any], base_image: str = "default",
                          labels: list[str] | None = None, registry: str | None = None, num_replicas: int = 1, batch_size: int = -1,
                          pkgs_to_install: list[str] | None = None) -> None:
    """Deploy ``func`` as model ``name``:``version`` (it waits until its replicas are connected)."""
    dtype, shape = input_type_spec(input_type)
    if pkgs_to_install:
        log.info("pkgs_to_install %s: the model runs in this Python environment; install them here",
                 list(pkgs_to_install))
    try:
        clipper_conn.admin.deploy_python_closure(
            name, str(version), func, dtype, shape, replicas=num_replicas,
            **cast("dict[str, Any]", {"max_batch": batch_size} if batch_size and batch_size > 0 else {}))
    except E.ClipperError as exc:
        raise ClipperException(exc.message, code=exc.code) from exc
    clipper_conn._labels[(name, str(version))] = list(labels or [])
    log.info("Successfully registered model %s:%s", name, version)


def create_endpoint(clipper_conn: ClipperConnection, name: str, input_type: str, func: Callable[[list[Any]], Any], default_output: str = "None", version: str | int = 1,
                    slo_micros: int = 3000000, labels: list[str] | None = None, registry: str | None = None, base_image: str = "default",
                    num_replicas: int = 1, batch_size: int = -1, pkgs_to_install: list[str] | None = None) -> None:
    """Register application ``name``, deploy ``func`` as model ``name`` and link the two."""
    clipper_conn.register_application(name, input_type, default_output, slo_micros)
    deploy_python_closure(clipper_conn, name, version, input_type, func, base_image, labels, registry,
                          num_replicas, batch_size, pkgs_to_install)
    clipper_conn.link_model_to_app(name, name)
