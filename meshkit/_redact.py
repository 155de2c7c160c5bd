"""Redact credentials from URLs before they reach an error message, a log line or ``/info``.

``redact_url("etcd://user:s3cret@h:2379?token=abc")`` → ``"etcd://***@h:2379?token=<redacted>"``
(the ``<redacted>`` marker is the one the Consul clients already use for their ACL token).
"""

from __future__ import annotations

import re

__all__ = ["SECRET_PARAMS", "redact_url"]

#: Query parameters whose values are secrets (compared case-insensitively).
SECRET_PARAMS = frozenset({"token", "password", "passwd", "secret", "api_key", "apikey", "key"})

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#]*)=(?P<value>[^&;#]*)")


def redact_url(url: object) -> str:
    """``url`` with its userinfo replaced by ``***@`` and secret query values by
    ``<redacted>``.

    Never raises: anything that is not a string is shown through ``str()`` and redacted
    the same way, so a malformed URL can still be quoted in the error that rejects it.
    """
    text = str(url)
    match = _SCHEME.match(text)
    start = match.end() if match else 0
    end = len(text)
    for stop in "/?#":
        found = text.find(stop, start)
        if found != -1:
            end = min(end, found)
    authority = text[start:end]
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    rest = _PARAM.sub(_mask_param, text[end:])
    return text[:start] + authority + rest


def _mask_param(match: re.Match[str]) -> str:
    if match["name"].strip().lower() in SECRET_PARAMS:
        return f"{match['sep']}{match['name']}=<redacted>"
    return match[0]
