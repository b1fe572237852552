"""Credentials on the query ports: TLS and per-application API keys."""

from .api_keys import API_KEY_PREFIX, MAX_API_KEY_CHARS, ApiKey, ApiKeyRegistry, key_digest
from .query_tls import exposure_warning, is_loopback, query_tls_context, server_tls_context

__all__ = [
    "API_KEY_PREFIX",
    "MAX_API_KEY_CHARS",
    "ApiKey",
    "ApiKeyRegistry",
    "key_digest",
    "exposure_warning",
    "is_loopback",
    "query_tls_context",
    "server_tls_context",
]
