"""The HTTP API: verified identity, tenant isolation, runs, approvals, workflows."""

from engine.api.app import ROUTERS, create_app
from engine.api.backends import ApiBackend, EmbeddedApiBackend, KafkaApiBackend
from engine.api.context import ApiContext
from engine.api.identity import KeyStore, OidcSettings, OidcVerifier, Principal, Role

__all__ = [
    "ROUTERS",
    "ApiBackend",
    "ApiContext",
    "EmbeddedApiBackend",
    "KafkaApiBackend",
    "KeyStore",
    "OidcSettings",
    "OidcVerifier",
    "Principal",
    "Role",
    "create_app",
]
