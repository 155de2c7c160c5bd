"""Build a registry from its URL (``MESHKIT_REGISTRY``)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from .._redact import redact_url
from ..errors import ConfigError
from .base import Registry
from .local import LocalRegistry

__all__ = ["DEFAULT_REGISTRY_URL", "ENV_REGISTRY", "SCHEMES", "registry_from_url"]

ENV_REGISTRY = "MESHKIT_REGISTRY"
DEFAULT_REGISTRY_URL = "local://"
#: Every scheme a registry URL may have.
SCHEMES = ("local", "etcd", "consul")


def registry_from_url(url: str | None = None, **options: Any) -> Registry:
    """The registry for ``url``; ``None`` means ``$MESHKIT_REGISTRY``, else ``local://``.

    ``options`` go to the backend (for ``local://``: ``ttl``, ``poll_interval``; see
    :class:`~meshkit.registry.etcd.EtcdRegistry` and
    :class:`~meshkit.registry.consul.ConsulRegistry` for theirs).
    """
    if url is None:
        url = os.environ.get(ENV_REGISTRY) or DEFAULT_REGISTRY_URL
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "local":
        return LocalRegistry.from_url(url, **options)
    if scheme == "consul":
        from .consul import ConsulRegistry

        return ConsulRegistry.from_url(url, **options)
    if scheme == "etcd":
        try:
            from .etcd import EtcdRegistry
        except ImportError as exc:
            raise ConfigError(
                f"the etcd registry needs the etcd client: pip install 'meshkit[etcd]' ({exc})"
            ) from None
        return EtcdRegistry.from_url(url, **options)
    supported = ", ".join(f"{s}://" for s in SCHEMES)
    raise ConfigError(f"expected a registry URL with scheme {supported}; found {redact_url(url)!r}")
