"""The MQ side of a :class:`~meshkit.Service`: its subscriptions, workers and publisher.

``Service.subscribe``/``Service.publish`` delegate here; the service starts the workers
after its health endpoint is up and drains them (together with RPC calls in flight)
when it stops, before the publisher flushes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from .._redact import redact_url
from .codec import Codec
from .producer import Delivery, Headers, Publisher
from .retry import RetryPolicy
from .subscription import Handler, Subscription
from .url import resolve_url
from .worker import Worker


class MqRuntime:
    """Subscriptions grouped by consumer group (one :class:`Worker` each) and one
    :class:`Publisher`, all on the ``url`` broker."""

    def __init__(
        self,
        service: str,
        url: str | None,
        *,
        metrics_registry: CollectorRegistry | None = None,
        drain_timeout: float = 10.0,
    ) -> None:
        self.service = service
        self._url = url
        self.metrics_registry = metrics_registry
        self.drain_timeout = drain_timeout
        self._subs: dict[str, list[Subscription]] = {}
        self._options: dict[str, dict[str, Any]] = {}
        self.workers: list[Worker] = []
        self.publisher: Publisher | None = None

    @property
    def url(self) -> str:
        """The broker URL (argument or ``MESHKIT_MQ``); raises ConfigError when unset."""
        return resolve_url(self._url)

    def subscribe(
        self,
        topic: str,
        *,
        group: str | None = None,
        model: Any = None,
        codec: Codec | None = None,
        retry: RetryPolicy | None = None,
        **worker_options: Any,
    ) -> Callable[[Handler], Handler]:
        group = group or self.service

        def decorate(handler: Handler) -> Handler:
            sub = Subscription(
                topic, handler, model=model, codec=codec, retry=retry or RetryPolicy()
            )
            self._subs.setdefault(group, []).append(sub)
            options = self._options.setdefault(group, {})
            for name, value in worker_options.items():
                if name in options and options[name] != value:
                    raise ValueError(
                        f"group {group!r}: {name}={value!r} conflicts with {options[name]!r} "
                        "given by another subscription of the same group"
                    )
                options[name] = value
            return handler

        return decorate

    @property
    def has_subscriptions(self) -> bool:
        return bool(self._subs)

    def get_publisher(self) -> Publisher:
        if self.publisher is None:
            self.publisher = Publisher(self.url, metrics_registry=self.metrics_registry)
        return self.publisher

    async def publish(
        self,
        topic: str,
        value: Any,
        *,
        key: str | bytes | int | None = None,
        headers: Headers = None,
        codec: Codec | None = None,
    ) -> Delivery:
        return await self.get_publisher().publish(
            topic, value, key=key, headers=headers, codec=codec
        )

    async def start(self) -> None:
        """Start one worker per group (they share the service's publisher)."""
        if not self._subs or self.workers:
            return
        publisher = self.get_publisher()
        for group, subs in self._subs.items():
            options = {"drain_timeout": self.drain_timeout, **self._options.get(group, {})}
            worker = Worker(
                group,
                subs,
                url=self.url,
                publisher=publisher,
                metrics_registry=self.metrics_registry,
                **options,
            )
            self.workers.append(worker)
            await worker.start()

    async def drain(self, timeout: float) -> bool:
        """Stop every worker (finishing fetched messages within ``timeout``)."""
        results = await asyncio.gather(*(w.stop(timeout) for w in self.workers))
        return all(results)

    async def close(self, timeout: float = 10.0) -> None:
        """Flush and close the publisher (after the workers and RPC calls are done)."""
        if self.publisher is not None:
            await self.publisher.close(timeout)

    def info(self) -> Mapping[str, Any]:
        return {
            "url": self._url_or_none(),
            "workers": [w.info() for w in self.workers],
            "subscriptions": {g: [s.topic for s in subs] for g, subs in self._subs.items()},
            "publisher": None
            if self.publisher is None
            else {"started": self.publisher.started, "pending": self.publisher.pending},
        }

    def _url_or_none(self) -> str | None:
        try:
            return redact_url(self.url)
        except Exception:
            return None
