"""Build a registry from its URL (``MESHKIT_REGISTRY``)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from ..errors import ConfigError
from .base import Registry
from .local import LocalRegistry

__all__ = ["DEFAULT_REGISTRY_URL", "ENV_REGISTRY", "SCHEMES", "registry_from_url"]

ENV_REGISTRY = "MESHKIT_REGISTRY"
DEFAULT_REGISTRY_URL = "local://"
#: Every scheme a registry URL may have (etcd and consul are not implemented yet).
SCHEMES = ("local", "etcd", "consul")


def registry_from_url(url: str | None = None, **options: Any) -> Registry:
    """The registry for ``url``; ``None`` means ``$MESHKIT_REGISTRY``, else ``local://``.

    ``options`` go to the backend (for ``local://``: ``ttl``, ``poll_interval``).
    """
    if url is None:
        url = os.environ.get(ENV_REGISTRY) or DEFAULT_REGISTRY_URL
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "local":
        return LocalRegistry.from_url(url, **options)
    if scheme in ("etcd", "consul"):
        raise ConfigError(
            f"the {scheme} registry backend is not implemented yet; use local:// "
            f"(found registry URL {url!r})"
        )
    supported = ", ".join(f"{s}://" for s in SCHEMES)
    raise ConfigError(f"expected a registry URL with scheme {supported}; found {url!r}")
