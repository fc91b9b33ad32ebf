"""The scheduled report of a tag, as files: summary.json, results.tsv and progress.png."""

from __future__ import annotations

import json
import os
from pathlib import Path

from app.config import Settings
from app.db import transaction
from app.plot import progress_png
from app.services import reports


def _write_atomically(path: Path, data: bytes) -> None:
    # Readers (a browser, an agent) never see a half-written file.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def write_tag_report(settings: Settings, tag: str) -> Path:
    with transaction(settings.database_url) as session:
        summary = reports.summary(session, tag=tag)
        tsv = reports.tsv(session, tag=tag)["tsv"]
        points = reports.progress_points(session, tag=tag)
    folder = settings.reports_dir / tag
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / "summary.json", json.dumps(summary, indent=2).encode())
    _write_atomically(folder / "results.tsv", (tsv + "\n").encode())
    _write_atomically(folder / "progress.png", progress_png(tag, points))
    return folder
