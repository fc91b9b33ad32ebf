"""Letting another system account reach a path: the embedded Postgres's user its data and binaries,
the sandbox user the Python interpreter that runs train.py."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

log = logging.getLogger(__name__)


def add_search_permission(path: Path, *, so_that: str) -> None:
    """Add o+x to `path` and to every folder above it that lacks it (a folder without it stops
    every other account at its door); `so_that` says in the log who needs it."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("adding o+x to %s so that %s", folder, so_that)
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
