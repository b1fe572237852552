"""The original Clipper's ``clipper_admin`` package, over this Clipper.

Scripts and notebooks written for ucbrise/clipper run unchanged::

    from clipper_admin import ClipperConnection, DockerContainerManager
    from clipper_admin.deployers import python as python_deployer

    conn = ClipperConnection(DockerContainerManager())
    conn.start_clipper()
    conn.register_application(name="hello", input_type="doubles", default_output="-1.0", slo_micros=100000)
    python_deployer.deploy_python_closure(conn, name="sum", version=1, input_type="doubles",
                                          func=lambda xs: [str(sum(x)) for x in xs])
    conn.link_model_to_app(app_name="hello", model_name="sum")

The containers are local processes, not Docker containers: see docs/compat.md
for this and the other deliberate differences.
"""

from .clipper_admin import ClipperConnection
from .container_manager import (
    CLIPPER_INTERNAL_MANAGEMENT_PORT,
    CLIPPER_INTERNAL_QUERY_PORT,
    CLIPPER_INTERNAL_RPC_PORT,
    DockerContainerManager,
    KubernetesContainerManager,
    LocalContainerManager,
)
from .exceptions import ClipperException, UnconnectedException

__all__ = ["ClipperConnection", "DockerContainerManager", "KubernetesContainerManager", "LocalContainerManager",
           "ClipperException", "UnconnectedException", "CLIPPER_INTERNAL_QUERY_PORT",
           "CLIPPER_INTERNAL_MANAGEMENT_PORT", "CLIPPER_INTERNAL_RPC_PORT"]
__version__ = "0.4.1"
