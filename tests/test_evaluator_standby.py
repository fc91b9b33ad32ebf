"""The trusted evaluator started from a standby interpreter (workers/standby.py, issue 14), with
real processes: it scores an export as the fresh process does, a standby that cannot take it
leaves the fresh path, a planted file is still no model, and a real Celery worker scores its
runs in one."""

from __future__ import annotations

import os

import pytest
from test_runner import pid_alive
from test_trusted_scoring import assert_honest, scored, trained_with_export, worker  # noqa: F401 (its fixture)
from test_workers import TRAIN_PY, summary_script

from workers import evaluator
from workers.runner import start_evaluator_standby


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_cache):
    """The baseline's export after one real tiny run, and the fresh evaluator's verdict on it."""
    folder = tmp_path_factory.mktemp("export")
    _, fresh = trained_with_export(folder, tiny_cache, TRAIN_PY)
    assert fresh.error is None
    return folder / "exported.pt2", fresh


def test_the_evaluator_in_a_standby_scores_as_a_fresh_one(exported, tiny_cache):
    artifact, fresh = exported
    standby = start_evaluator_standby("")
    warm = evaluator.score(artifact, profile="tiny", cache_dir=tiny_cache, standby=standby)
    assert warm.error is None
    assert warm.val_bpb == fresh.val_bpb
    assert warm.details.keys() == fresh.details.keys()
    assert (fresh.details["standby"], warm.details["standby"]) == (False, True)
    assert standby.proc.returncode == 0


def test_a_standby_that_cannot_take_it_leaves_the_fresh_path(exported, tiny_cache):
    artifact, fresh = exported
    dead = start_evaluator_standby("")
    dead.proc.kill()
    misfit = start_evaluator_standby("7")  # another GPU than the evaluation's
    for standby in (dead, misfit):
        evaluation = evaluator.score(artifact, profile="tiny", cache_dir=tiny_cache, standby=standby)
        assert evaluation.val_bpb == fresh.val_bpb and evaluation.details["standby"] is False
        assert not pid_alive(standby.proc.pid)


@pytest.mark.parametrize("plant", ["symlink", "fifo", "directory"])
def test_a_planted_file_is_still_no_model(tmp_path, tiny_cache, plant):
    artifact = tmp_path / evaluator.ARTIFACT_FILENAME
    if plant == "symlink":  # to the validation shard's neighbour, as train.py could plant it
        artifact.symlink_to(tiny_cache / "tokenizer" / "token_bytes.pt")
    elif plant == "fifo":
        os.mkfifo(artifact)
    else:
        artifact.mkdir()
    standby = start_evaluator_standby("")
    evaluation = evaluator.score(artifact, profile="tiny", cache_dir=tiny_cache, standby=standby)
    assert evaluation.val_bpb is None and "exported no model" in evaluation.error
    assert not pid_alive(standby.proc.pid)  # unused, it is discarded


def test_a_workers_evaluation_starts_from_its_standby(request):
    client = request.getfixturevalue("worker")
    # The first run exports nothing: its evaluation uses up the standby the pool child started
    # with, and the second run's evaluation starts from the one started after it.
    record, _ = scored(client, summary_script(), "prints a summary, trains nothing")
    assert record["status"] == "crash"
    record, run = scored(client, TRAIN_PY, "baseline")
    assert_honest(record, run)
    assert run["scoring"]["standby"] is True


def test_the_evaluator_finds_the_packages_the_worker_finds(monkeypatch):
    """Where the worker's packages come from PYTHONPATH (no venv), the evaluator must see them too."""
    from app.config import PROJECT_ROOT
    from workers import evaluator

    monkeypatch.setenv("PYTHONPATH", "/opt/site-packages")
    assert evaluator.standing_env("0")["PYTHONPATH"] == f"{PROJECT_ROOT}{os.pathsep}/opt/site-packages"
