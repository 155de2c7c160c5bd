"""Small file helpers shared by the ``local://`` registry and config store."""

from __future__ import annotations

import contextlib
from pathlib import Path


def mkdir_private(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (existing ones untouched)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o700)
