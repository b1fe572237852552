"""The trust boundary: who may reach which port, and with what credential (docs/security.md).

Container RPC credentials (:mod:`.container_keys`), the admin token
(:mod:`.admin_token`), and the query ports' TLS and per-application API keys
(:mod:`.query_tls`, :mod:`.api_keys`).
"""

from .api_keys import API_KEY_PREFIX, MAX_API_KEY_CHARS, ApiKey, ApiKeyRegistry, key_digest
from .container_keys import ContainerCredentials, ContainerGrant, ContainerKeyring
from .net import is_loopback_host
from .query_tls import exposure_warning, is_loopback, query_tls_context, server_tls_context

__all__ = [
    "API_KEY_PREFIX",
    "MAX_API_KEY_CHARS",
    "ApiKey",
    "ApiKeyRegistry",
    "ContainerCredentials",
    "ContainerGrant",
    "ContainerKeyring",
    "key_digest",
    "exposure_warning",
    "is_loopback",
    "is_loopback_host",
    "query_tls_context",
    "server_tls_context",
]
