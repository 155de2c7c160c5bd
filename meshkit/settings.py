"""Process settings from code, ``MESHKIT_*`` environment variables and defaults.

Precedence: explicit arguments > environment > defaults.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "MESHKIT_"


@dataclass(frozen=True, slots=True)
class Settings:
    """Where and how a service listens and shuts down."""

    host: str = "127.0.0.1"
    port: int = 0
    health_host: str = ""
    health_port: int = 0
    advertise_host: str = ""
    registry: str = ""
    mq: str = ""  # MESHKIT_MQ: kafka://host:port[,host:port]
    drain_timeout: float = 10.0
    max_concurrency: int = 1024
    concurrency: str = "fixed"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``MESHKIT_HOST``, ``MESHKIT_PORT``, … then apply non-``None`` overrides."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, raw, type(getattr(cls(), f.name)))
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the variable (and argument) of a bad value."""
        for name in ("port", "health_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ConfigError(
                    f"expected the {_LABELS[name]} between 0 and 65535 ({_where(name)}), "
                    f"found {value}"
                )
        # nan passes every comparison and inf overflows the drain's deadline: both refused.
        if not math.isfinite(self.drain_timeout) or self.drain_timeout < 0:
            raise ConfigError(
                f"expected the drain timeout to be a finite number of seconds ≥ 0 "
                f"({_where('drain_timeout')}), found {self.drain_timeout}"
            )
        if self.concurrency not in ("fixed", "adaptive"):
            raise ConfigError(
                f"expected MESHKIT_CONCURRENCY 'fixed' or 'adaptive', found {self.concurrency!r}"
            )
        if self.max_concurrency < 1:
            raise ConfigError(
                f"expected the concurrency limit ≥ 1 ({_where('max_concurrency')}), "
                f"found {self.max_concurrency}"
            )


_LABELS = {
    "port": "RPC port",
    "health_port": "health port",
    "drain_timeout": "drain timeout",
    "max_concurrency": "concurrency limit",
}
_CLI_OPTIONS = {"port": "--port", "health_port": "--health-port"}


def _where(name: str) -> str:
    """Where a setting comes from: ``MESHKIT_PORT, port= or --port``."""
    sources = [ENV_PREFIX + name.upper(), f"{name}="]
    if name in _CLI_OPTIONS:
        sources.append(_CLI_OPTIONS[name])
    return ", ".join(sources[:-1]) + " or " + sources[-1]


def _convert(name: str, raw: str, kind: type) -> Any:
    env_name = ENV_PREFIX + name.upper()
    try:
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        expected = "an integer" if kind is int else "a number"
        raise ConfigError(f"expected {env_name} to be {expected}, found {raw!r}") from None
    return raw


def parse_tags(text: str) -> dict[str, str]:
    """Parse instance tags written as ``zone=a,canary=true`` (``MESHKIT_TAGS``)."""
    tags: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected MESHKIT_TAGS items of the form key=value, found {item!r}")
        tags[key.strip()] = value.strip()
    return tags
