"""Installing meshkit's tracer provider: only when tracing is configured and the app has none.

``MESHKIT_TRACES`` names an OTLP/HTTP endpoint (``http://127.0.0.1:4318`` — the bundled
collector's default — or any OTLP backend; ``/v1/traces`` is appended when the URL has no
path). When it is set and no tracer provider was installed by the application,
:func:`setup_tracing` installs the OpenTelemetry SDK's provider with meshkit's sampler
(:mod:`.sampling`) and export queue (:mod:`.export`). An application that configured
OpenTelemetry itself keeps its provider: meshkit's spans go there.

Other variables: ``MESHKIT_TRACES_SAMPLE`` (head sampling ratio from 0 to 1, default 1),
``MESHKIT_TRACES_TAIL`` (``1``/``0``: keep error and slow spans of unsampled traces,
default 1), ``MESHKIT_TRACES_SLOW_MS`` (what counts as slow for that, default 1000),
``MESHKIT_TRACES_QUEUE`` (spans waiting for export before drops, default 8192).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry import trace

from ..errors import ConfigError

if TYPE_CHECKING:  # the SDK is imported only when a provider is built
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from prometheus_client import CollectorRegistry

__all__ = [
    "TraceSettings",
    "flush",
    "identity",
    "installed_provider",
    "set_identity",
    "setup_tracing",
]

ENDPOINT_ENV = "MESHKIT_TRACES"

_lock = threading.Lock()
_installed: TracerProvider | None = None
_identity: dict[str, str] = {}
_instances: dict[str, str] = {}


def set_identity(*, service: str | None = None, instance: str | None = None) -> None:
    """Name this process's service and instance (the Service calls it when it starts).

    The first service named is the process's (the ``service.name`` resource attribute of
    the provider installed later); each service's instance id is the ``meshkit.instance``
    attribute of its server spans (a process may run several services).
    """
    if service:
        _identity.setdefault("service", service)
    if instance:
        _identity.setdefault("instance", instance)
        if service:
            _instances[service] = instance


def instance_of(service: str) -> str | None:
    """The instance id of ``service`` in this process, when it was set."""
    return _instances.get(service)


def identity() -> Mapping[str, str]:
    """The service and instance set by :func:`set_identity` (possibly empty)."""
    return _identity


@dataclass(frozen=True, slots=True)
class TraceSettings:
    """What the ``MESHKIT_TRACES*`` variables say."""

    endpoint: str = ""
    sample: float = 1.0
    tail: bool = True
    slow_ms: float = 1000.0
    queue: int = 8192

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TraceSettings:
        """Read and check the variables; raises :class:`ConfigError` naming the bad one."""
        env = os.environ if env is None else env
        endpoint = env.get(ENDPOINT_ENV, "").strip()
        if endpoint:
            endpoint = otlp_traces_url(endpoint)
        return cls(
            endpoint=endpoint,
            sample=_number(env, "MESHKIT_TRACES_SAMPLE", 1.0, 0.0, 1.0),
            tail=_flag(env, "MESHKIT_TRACES_TAIL", True),
            slow_ms=_number(env, "MESHKIT_TRACES_SLOW_MS", 1000.0, 0.0, None),
            queue=int(_number(env, "MESHKIT_TRACES_QUEUE", 8192, 1, None)),
        )


def otlp_traces_url(endpoint: str) -> str:
    """``http://h:4318`` → ``http://h:4318/v1/traces``; other paths are kept as given."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"expected {ENDPOINT_ENV} to be an OTLP/HTTP URL like http://127.0.0.1:4318, "
            f"found {endpoint!r}"
        )
    if parts.path in ("", "/"):
        return endpoint.rstrip("/") + "/v1/traces"
    return endpoint


def _number(
    env: Mapping[str, str], name: str, default: float, lo: float, hi: float | None
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value >= lo and (hi is None or value <= hi)):
        bound = f"between {lo:g} and {hi:g}" if hi is not None else f"≥ {lo:g}"
        raise ConfigError(f"expected {name} to be a number {bound}, found {raw!r}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"expected {name} to be 1 or 0, found {raw!r}")


def _service_name() -> str:
    return (
        _identity.get("service")
        or os.environ.get("OTEL_SERVICE_NAME")
        or Path(sys.argv[0]).stem
        or "meshkit"
    )


def build_provider(
    settings: TraceSettings,
    *,
    exporter: SpanExporter | None = None,
    service: str | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> TracerProvider:
    """An SDK provider with meshkit's sampler and export queue (not installed globally)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    from .export import ExportQueue
    from .sampling import make_sampler

    if exporter is None:
        if not settings.endpoint:
            raise ConfigError(f"no trace endpoint: set {ENDPOINT_ENV} or pass an exporter")
        from .otlp_encode import OtlpHttpExporter

        exporter = OtlpHttpExporter(settings.endpoint, timeout=5.0)
    attributes: dict[str, str | int] = {
        "service.name": service or _service_name(),
        "host.name": socket.gethostname(),
        "process.pid": os.getpid(),
    }
    if "instance" in _identity:
        attributes["service.instance.id"] = _identity["instance"]
    provider = TracerProvider(
        resource=Resource.create(attributes),
        sampler=make_sampler(settings.sample, tail=settings.tail),
    )
    provider.add_span_processor(
        ExportQueue(
            exporter,
            max_queue=settings.queue,
            slow_after=settings.slow_ms / 1000 if settings.tail else None,
            keep_errors=settings.tail,
            metrics_registry=metrics_registry,
        )
    )
    return provider


def installed_provider() -> TracerProvider | None:
    """The provider :func:`setup_tracing` installed, if any."""
    return _installed


def setup_tracing(
    endpoint: str | None = None,
    *,
    service: str | None = None,
    exporter: SpanExporter | None = None,
    env: Mapping[str, str] | None = None,
) -> TracerProvider | None:
    """Install meshkit's tracer provider when tracing is configured and none is installed.

    ``endpoint`` (else ``MESHKIT_TRACES``) or ``exporter`` configures it; with neither,
    nothing is installed. Returns the provider installed now, or ``None`` when the
    application already has one (it is left alone) or tracing is not configured.
    Safe to call more than once.
    """
    global _installed
    settings = TraceSettings.from_env(env)
    if endpoint:
        settings = dataclasses.replace(settings, endpoint=otlp_traces_url(endpoint))
    if not settings.endpoint and exporter is None:
        return None
    with _lock:
        if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
            return None
        provider = build_provider(settings, exporter=exporter, service=service)
        trace.set_tracer_provider(provider)
        _installed = provider
        return provider


def flush(timeout: float = 5.0) -> bool:
    """Export the spans waiting in meshkit's provider now (``True`` when there is none)."""
    provider = _installed
    if provider is None:
        return True
    return provider.force_flush(int(timeout * 1000))
