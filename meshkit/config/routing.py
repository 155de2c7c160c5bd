"""Smart-client routing rules from live config.

This module bridges config and RPC on purpose (the stores know nothing of RPC; this is
the one place that composes them, like :class:`~meshkit.Service` does)::

    class Settings(BaseModel):
        routing: RoutingRules = {"rules": []}     # validated as a RoutingTable

    svc = Service("gateway", gw.Gateway, config=Settings)
    table = live_routing(svc.config, "routing")   # follows the key
    echo = svc.client(echo_thrift.Echo, "echo", routing=table)

A routing change is validated with the rest of the version (:meth:`RoutingTable.from_dict`
must accept it, or the whole version is rejected and the old rules stay), then installed
with :meth:`RoutingTable.update` — one reference swap: calls in flight keep the table
they started with.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import AfterValidator

from ..errors import InvalidArgument
from ..rpc.route import RoutingTable
from .manager import ConfigChange, ServiceConfig

__all__ = ["RoutingRules", "live_routing"]


def _check(value: dict[str, Any]) -> dict[str, Any]:
    try:
        RoutingTable.from_dict(value)
    except InvalidArgument as exc:
        raise ValueError(exc.message) from None
    return value


#: A pydantic field type for routing rules (the dict form of :class:`RoutingTable`).
RoutingRules = Annotated[dict[str, Any], AfterValidator(_check)]


def _lookup(value: Any, key: str) -> Mapping[str, Any]:
    node = value
    for part in key.split("."):
        node = getattr(node, part)
    return node or {}


def live_routing(config: ServiceConfig[Any], key: str) -> RoutingTable:
    """A :class:`RoutingTable` built from ``config``'s dotted ``key``, kept up to date."""
    table = RoutingTable.from_dict(_lookup(config.value, key))

    @config.on_change(key=key)
    def _update(change: ConfigChange[Any]) -> None:
        table.update(RoutingTable.from_dict(_lookup(change.new, key)))

    return table
