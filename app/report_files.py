"""The scheduled report of a tag, as files: summary.json, results.tsv, progress.png, and
report.html, the morning report: one self-contained page (styles inline, the chart embedded as
a PNG data URI, no scripts) that opens from disk or an e-mail without a network."""

from __future__ import annotations

import base64
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape

from app.config import Settings
from app.db import transaction
from app.plot import progress_png
from app.services import reports

TEMPLATES = Path(__file__).resolve().parent / "templates"


def _write_atomically(path: Path, data: bytes) -> None:
    # Readers (a browser, an agent) never see a half-written file.
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def diff_lines(diff: str | None) -> list[tuple[str, str]]:
    """A unified diff as (kind, line) pairs, kind one of meta, hunk, add, del, ctx: for colouring."""
    lines = []
    for line in (diff or "").splitlines():
        if line.startswith(("+++", "---")):
            kind = "meta"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "ctx"
        lines.append((kind, line))
    return lines


def render_report(*, summary: dict, changes: list[dict], gpus: list[dict], png: bytes) -> str:
    environment = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    environment.filters["diff_lines"] = diff_lines
    gpu_hours = sum(g["gpu_hours"] for g in gpus)
    return environment.get_template("report.html").render(
        summary=summary, changes=changes, gpus=gpus, gpu_hours=gpu_hours,
        # Timed training over the time GPUs were held: what the rest (start-up, compile, scoring) cost.
        training_share=summary["total_training_minutes"] / 60 / gpu_hours if gpu_hours else None,
        chart=base64.b64encode(png).decode("ascii"),
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def write_tag_report(settings: Settings, tag: str) -> Path:
    with transaction(settings.database_url) as session:
        summary = reports.summary(session, tag=tag)
        tsv = reports.tsv(session, tag=tag)["tsv"]
        points = reports.progress_points(session, tag=tag)
        changes = reports.kept_changes(session, tag=tag)
        gpus = reports.gpu_use(session, tag=tag)
    folder = settings.reports_dir / tag
    folder.mkdir(parents=True, exist_ok=True)
    png = progress_png(tag, points)
    _write_atomically(folder / "summary.json", json.dumps(summary, indent=2).encode())
    _write_atomically(folder / "results.tsv", (tsv + "\n").encode())
    _write_atomically(folder / "progress.png", png)
    html = render_report(summary=summary, changes=changes, gpus=gpus, png=png)
    _write_atomically(folder / "report.html", html.encode())
    return folder
