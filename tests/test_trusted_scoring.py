"""Trusted scoring: a worker's run is scored by the evaluator from the model train.py exported,
whatever train.py prints. Real CPU worker, real train.py variants in the tiny profile."""

from __future__ import annotations

import dataclasses
import math
import uuid

import pytest
import redis
from test_train import parse_summary, run_train
from test_workers import TRAIN_PY, pool_entry, submit, summary_script, wait_for, wait_until

from app.stack import Stack
from app.web import create_app
from workers import evaluator

FAKE_SCORE = 0.0123
# A uniform guess over the 8192 tokens costs about 13/3 bits a byte; a trained tiny model is below it.
UNIFORM_BPB = 13 / 3


def variant(old: str, new: str) -> str:
    source = TRAIN_PY.replace(old, new, 1)
    assert source != TRAIN_PY, old
    return source


# Replaces the metric the summary prints, in train.py's own process.
PATCHED_METRIC = variant("USE_CUDA = torch.cuda.is_available()\n", f"""USE_CUDA = torch.cuda.is_available()
import prepare
prepare.evaluate_bpb = evaluate_bpb = lambda *args, **kwargs: {FAKE_SCORE}
prepare.validation_available = lambda: True
""")
# Divides its per-token loss by 100 whenever it is asked for one (evaluate_bpb's contract).
SCALED_LOSS = variant(
    'return F.cross_entropy(logits.view(B * T, -1), targets.view(-1), ignore_index=-1, reduction=reduction)',
    'loss = F.cross_entropy(logits.view(B * T, -1), targets.view(-1), ignore_index=-1, reduction=reduction)\n'
    '        return loss / 100 if reduction == "none" else loss')
# Its full-context layers see every position, later ones included.
FUTURE_PEEKING = variant("return F.scaled_dot_product_attention(q, k, v, is_causal=True)",
                         "return F.scaled_dot_product_attention(q, k, v, is_causal=False)")


@pytest.fixture(scope="module")
def worker(database_url, redis_url, tiny_cache, tmp_path_factory):
    """One CPU worker with trusted scoring (the default) and the API's test client."""
    from app.config import load_settings

    state = tmp_path_factory.mktemp("state")
    settings = dataclasses.replace(
        load_settings({}), database_url=database_url, broker_url=redis_url, result_backend=redis_url,
        external_database=True, external_broker=True, state_dir=state, cache_dir=tiny_cache,
        default_profile="tiny", kill_timeout=240, heartbeat_interval=1.0, stale_after=4.0, baseline_runs=1,
    )
    assert settings.trusted_scoring
    redis.Redis.from_url(redis_url).flushdb()
    gpu_id = f"trust{uuid.uuid4().hex[:6]}-gpu0"
    stack = Stack(settings, state / "logs")
    stack.start_gpu_worker(0, cpu=True, gpu_id=gpu_id, hostname=f"{gpu_id}@%h")
    client = create_app(settings).test_client()
    try:
        wait_until(lambda: (pool_entry(client, gpu_id) or {}).get("status") == "idle", 60, "the worker to register")
        yield client
    finally:
        stack.stop_all()


def scored(client, source: str, description: str) -> tuple[dict, dict]:
    """Submit `source` to a new tag, wait for its verdict; (experiment record, its one run)."""
    tag = f"t{uuid.uuid4().hex[:10]}"
    assert client.post("/api/experiment/setup", json={"tag": tag, "profile": "tiny"}).status_code == 200
    record = wait_for(client, submit(client, tag, source, description))
    record = client.get(f"/api/experiment/{record['id']}").get_json()
    assert len(record["runs"]) == 1
    return record, record["runs"][0]


def assert_honest(record: dict, run: dict) -> None:
    assert record["status"] == "keep", record["error"]
    assert run["scored_by"] == "worker"
    assert record["val_bpb"] == run["val_bpb"]
    assert 1.0 < run["val_bpb"] < UNIFORM_BPB
    assert run["scoring"]["eval_tokens"] == 64 * 256 and run["scoring"]["causality_max_diff"] == 0.0


def test_fake_summary_without_a_model_is_a_crash(worker):
    record, run = scored(worker, summary_script(), "prints a summary, trains nothing")
    assert record["status"] == "crash"
    assert record["val_bpb"] is None and run["val_bpb"] is None
    assert "exported no model" in record["error"] and "prepare.export_model" in record["error"]
    assert run["reported_val_bpb"] == 1.5


def test_baseline_is_scored_by_the_evaluator(worker):
    record, run = scored(worker, TRAIN_PY, "baseline")
    assert_honest(record, run)
    # The run's train.py saw no validation split, so it printed no score of its own.
    assert run["reported_val_bpb"] is None and run["score_mismatch"] is None
    assert "val_bpb:" not in worker.get(f"/api/experiment/{record['id']}/log").get_json()["log"]


def test_patched_evaluate_bpb_is_ignored_and_flagged(worker):
    record, run = scored(worker, PATCHED_METRIC, "monkeypatches prepare.evaluate_bpb")
    assert_honest(record, run)
    assert run["reported_val_bpb"] == FAKE_SCORE
    assert run["score_mismatch"] is True


def test_scaled_loss_is_ignored(worker):
    record, run = scored(worker, SCALED_LOSS, "scales its loss in evaluation")
    assert_honest(record, run)


def test_attending_to_future_tokens_fails_the_causality_check(worker):
    record, run = scored(worker, FUTURE_PEEKING, "attends to later tokens")
    assert record["status"] == "crash"
    assert run["val_bpb"] is None
    assert "causality check failed" in record["error"]
    assert "only to itself and earlier positions" in record["error"]


def test_a_symlink_in_place_of_the_model_is_no_model(tmp_path, tiny_cache):
    # train.py writes the artifact: the worker must not follow a link it planted (to the val shard, say).
    (tmp_path / evaluator.ARTIFACT_FILENAME).symlink_to(tiny_cache / "tokenizer" / "token_bytes.pt")
    evaluation = evaluator.score(tmp_path / evaluator.ARTIFACT_FILENAME, profile="tiny", cache_dir=tiny_cache)
    assert evaluation.val_bpb is None and "exported no model" in evaluation.error


def test_a_file_that_is_not_an_export_is_refused(tmp_path, tiny_cache):
    import torch

    torch.save({"format": "something else"}, tmp_path / "model.pt2")
    evaluation = evaluator.score(tmp_path / "model.pt2", profile="tiny", cache_dir=tiny_cache)
    assert evaluation.val_bpb is None and "not in the format prepare.export_model writes" in evaluation.error


def trained_with_export(tmp_path, cache, source: str) -> tuple[float, evaluator.Evaluation]:
    """Run `source` by hand with the full cache (validation split included) and an export path:
    (the val_bpb it printed, the evaluator's verdict on what it exported)."""
    artifact = tmp_path / "exported.pt2"
    assert source.count("\nimport prepare\n") == 1
    result = run_train(tmp_path, cache, source=source.replace(
        "\nimport prepare\n", f"\nos.environ['AUTORESEARCH_EXPORT_PATH'] = {str(artifact)!r}\nimport prepare\n"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _, summary = parse_summary(result.stdout)
    return float(summary["val_bpb"]), evaluator.score(artifact, profile="tiny", cache_dir=cache)


def test_baseline_scores_the_same_through_the_evaluator_as_in_process(tmp_path, tiny_cache):
    reported, evaluation = trained_with_export(tmp_path, tiny_cache, TRAIN_PY)
    assert evaluation.error is None
    assert math.isclose(evaluation.val_bpb, reported, rel_tol=evaluator.SCORE_TOLERANCE)
    # The summary prints six decimals.
    assert abs(evaluation.val_bpb - reported) <= 5e-7
    assert not evaluator.mismatch(reported, evaluation.val_bpb)


def test_a_scaled_loss_would_have_lied_in_process(tmp_path, tiny_cache):
    reported, evaluation = trained_with_export(tmp_path, tiny_cache, SCALED_LOSS)
    assert evaluation.error is None and 1.0 < evaluation.val_bpb < UNIFORM_BPB
    assert reported < evaluation.val_bpb / 50
    assert evaluator.mismatch(reported, evaluation.val_bpb)
