"""Service registration and discovery.

``registry_from_url()`` picks a backend from a URL (``MESHKIT_REGISTRY``; ``local://`` by
default). :class:`RegistryResolver` adapts a registry to the RPC client's resolver seam; it
is imported lazily so that importing this package never imports :mod:`meshkit.rpc`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import (
    Instance,
    Registry,
    RegistryStatus,
    new_instance_id,
    validate_instance_id,
    validate_service_name,
)
from .local import LocalRegistry, default_directory
from .url import registry_from_url

if TYPE_CHECKING:
    from .resolver import RegistryResolver

__all__ = [
    "Instance",
    "LocalRegistry",
    "Registry",
    "RegistryResolver",
    "RegistryStatus",
    "default_directory",
    "new_instance_id",
    "registry_from_url",
    "validate_instance_id",
    "validate_service_name",
]


def __getattr__(name: str) -> Any:
    if name == "RegistryResolver":
        from .resolver import RegistryResolver

        return RegistryResolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
