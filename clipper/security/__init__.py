"""The trust boundary: who may reach which port, and with what credential (docs/security.md)."""

from .container_keys import ContainerCredentials, ContainerGrant, ContainerKeyring
from .net import is_loopback_host

__all__ = ["ContainerCredentials", "ContainerGrant", "ContainerKeyring", "is_loopback_host"]
