"""Reading an experiment's train.py from the agent's git repository at a commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from app.errors import InvalidInput


def train_py_at(repo_dir: Path | None, commit_sha: str) -> str:
    if repo_dir is None:
        raise InvalidInput("send the train.py source as train_py, or set REPO_DIR so it can be read at commit_sha",
                           fields={"train_py": None})
    result = subprocess.run(
        ["git", "-C", str(repo_dir), "show", f"{commit_sha}:train.py"],
        capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        raise InvalidInput(f"cannot read train.py at {commit_sha} in {repo_dir}: {result.stderr.strip()}",
                           fields={"commit_sha": commit_sha})
    return result.stdout
