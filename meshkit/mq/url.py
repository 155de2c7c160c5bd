"""``MESHKIT_MQ`` URLs: ``kafka://host:port[,host:port...]`` → librdkafka settings."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from .._redact import redact_url
from .errors import ConfigError

ENV = "MESHKIT_MQ"
DEFAULT_PORT = 9092


def bootstrap_servers(url: str | None = None) -> str:
    """The ``bootstrap.servers`` list for ``url`` (default: ``MESHKIT_MQ``).

    Raises :class:`ConfigError` when no URL is given or set, or when it is not a
    ``kafka://`` URL with at least one ``host[:port]``.
    """
    if url is None or url == "":
        url = os.environ.get(ENV, "")
    if not url:
        raise ConfigError(
            f"expected a Kafka URL (kafka://host:9092) in {ENV} or as an argument, found none; "
            "for development start a broker with `meshkit mq broker`"
        )
    parts = urlsplit(url)
    shown = redact_url(url)
    if parts.scheme != "kafka":
        raise ConfigError(f"expected a kafka://host:port URL for {ENV}, found {shown!r}")
    if "@" in parts.netloc:
        raise ConfigError(
            f"expected kafka://host:port[,host:port…] without credentials, found "
            f"{shown!r}: Kafka SASL credentials belong in the librdkafka config "
            "(sasl.username / sasl.password in the worker's or publisher's config=), not in the URL"
        )
    hosts = []
    for item in parts.netloc.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, str(DEFAULT_PORT)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"expected host:port with a port 1-65535 in {shown!r}, found {item!r}"
            )
        hosts.append(f"{host}:{port}")
    if not hosts:
        raise ConfigError(f"expected at least one host:port in {shown!r}, found none")
    return ",".join(hosts)


def resolve_url(url: str | None = None) -> str:
    """``url`` or ``MESHKIT_MQ`` (validated), as given."""
    url = url or os.environ.get(ENV, "")
    bootstrap_servers(url)
    return url
