"""Centralized configuration: typed settings, live watches, validation before apply,
history, rollback and gray releases.

* :class:`ServiceConfig` (``svc.config``): a service's settings, layered, validated and
  kept up to date; see :mod:`meshkit.config.manager`.
* :class:`ConfigStore`: versions, history, rollback, gray releases and instance status
  on a key-value backend (:mod:`meshkit.config.store`), built by :func:`store_from_url`
  from ``local://``, ``etcd://`` or ``consul://`` (``MESHKIT_CONFIG``).
"""

from .kv import KV, Compacted, Entry, Event, Listing
from .manager import ConfigChange, ConfigRejected, FreeForm, ServiceConfig
from .store import (
    SHARED,
    ConfigStore,
    GrayRelease,
    InstanceStatus,
    NamespaceState,
    Selector,
    Version,
)
from .url import ENV_CONFIG, kv_from_url, store_from_url

__all__ = [
    "ENV_CONFIG",
    "KV",
    "SHARED",
    "Compacted",
    "ConfigChange",
    "ConfigRejected",
    "ConfigStore",
    "Entry",
    "Event",
    "FreeForm",
    "GrayRelease",
    "InstanceStatus",
    "Listing",
    "NamespaceState",
    "Selector",
    "ServiceConfig",
    "Version",
    "kv_from_url",
    "store_from_url",
]
