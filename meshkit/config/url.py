"""Build a config store from its URL (``MESHKIT_CONFIG``)."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

from .._redact import redact_url
from ..errors import ConfigError
from .kv import KV
from .store import ConfigStore

__all__ = ["DEFAULT_CONFIG_URL", "ENV_CONFIG", "SCHEMES", "kv_from_url", "store_from_url"]

ENV_CONFIG = "MESHKIT_CONFIG"
DEFAULT_CONFIG_URL = "local://"
SCHEMES = ("local", "etcd", "consul")


def kv_from_url(url: str | None = None, **options: Any) -> KV:
    """The key-value backend for ``url``; ``None``: ``$MESHKIT_CONFIG``, else ``local://``."""
    if url is None:
        url = os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG_URL
    if not isinstance(url, str):
        raise ConfigError(f"expected a config store URL string, found {redact_url(url)!r}")
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "local":
        from .local import LocalKV

        return LocalKV.from_url(url, **options)
    if scheme == "etcd":
        from .etcd import EtcdKV

        return EtcdKV.from_url(url, **options)
    if scheme == "consul":
        from .consul import ConsulKV

        return ConsulKV.from_url(url, **options)
    supported = ", ".join(f"{s}://" for s in SCHEMES)
    shown = redact_url(url)
    raise ConfigError(f"expected a config store URL with scheme {supported}; found {shown!r}")


def store_from_url(url: str | None = None, **options: Any) -> ConfigStore:
    """A :class:`ConfigStore` on the backend for ``url`` (see :func:`kv_from_url`)."""
    return ConfigStore(kv_from_url(url, **options))
