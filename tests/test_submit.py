"""Submit's inputs: the train.py source from the request or from the agent's repo at a commit."""

from __future__ import annotations

import dataclasses
import subprocess

from app.db import transaction
from app.models import Experiment
from app.web import create_app

FIELDS = {"description": "d", "hypothesis": "h", "category": "other"}


def git(repo, *args) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path):
    path.mkdir()
    git(path, "init", "-q")
    git(path, "config", "user.email", "agent@example.com")
    git(path, "config", "user.name", "agent")
    (path / "train.py").write_text("print('version one')\n")
    git(path, "add", "train.py")
    git(path, "commit", "-qm", "one")
    first = git(path, "rev-parse", "HEAD")
    (path / "train.py").write_text("print('version two')\n")
    git(path, "commit", "-qam", "two")
    return first


def test_source_is_read_from_the_repo_at_the_commit(settings, db, tmp_path):
    first = make_repo(tmp_path / "agent")
    client = create_app(dataclasses.replace(settings, repo_dir=tmp_path / "agent")).test_client()
    client.post("/api/experiment/setup", json={"tag": "fromgit", "profile": "tiny"})
    response = client.post("/api/experiment/submit", json={"tag": "fromgit", "commit_sha": first[:7], **FIELDS})
    assert response.status_code == 200, response.get_json()
    with transaction(db) as session:
        stored = session.get(Experiment, response.get_json()["experiment_id"])
        assert stored.train_py == "print('version one')\n" and stored.status == "queued"


def test_unknown_commit_or_no_source_is_a_clear_400(client, settings, tmp_path):
    client.post("/api/experiment/setup", json={"tag": "nosource", "profile": "tiny"})
    missing = client.post("/api/experiment/submit", json={"tag": "nosource", "commit_sha": "abc1234", **FIELDS})
    assert missing.status_code == 400 and "REPO_DIR" in missing.get_json()["error"]
    make_repo(tmp_path / "agent")
    with_repo = create_app(dataclasses.replace(settings, repo_dir=tmp_path / "agent")).test_client()
    unknown = with_repo.post("/api/experiment/submit", json={"tag": "nosource", "commit_sha": "deadbee", **FIELDS})
    assert unknown.status_code == 400 and "deadbee" in unknown.get_json()["error"]
    with transaction(settings.database_url) as session:
        assert session.query(Experiment).count() == 0
