"""Bad input: every one is a JSON error naming the problem, never a 500, and changes nothing."""

from __future__ import annotations

import dataclasses
import itertools
import logging

import pytest
from conftest_data import registration
from sqlalchemy import text

from app.db import transaction

TAG = "mar11"

POST_ROUTES = [
    "/api/experiment/setup",
    "/api/experiment/register",
    "/api/experiment/complete",
    "/api/experiment/crash",
    "/api/experiment/history",
    "/api/experiment/best",
    "/api/experiment/near-misses",
    "/api/search/strategy",
    "/api/search/set-strategy",
    "/api/search/adapt",
    "/api/search/suggest",
    "/api/pool/register",
    "/api/pool/heartbeat",
    "/api/pool/acquire",
    "/api/pool/release",
    "/api/pool/deregister",
    "/api/report/summary",
    "/api/report/tsv",
    "/api/report/diff",
]


def snapshot(database_url) -> dict:
    """Every row of every table, to prove a rejected request changed nothing."""
    with transaction(database_url) as session:
        return {
            table: [tuple(row) for row in session.execute(text(f"SELECT * FROM {table} ORDER BY 1"))]
            for table in ("tags", "strategies", "experiments", "gpus")
        }


@pytest.fixture
def world(client, db):
    """A tag with a kept result, a running experiment, and a GPU leased to it."""
    assert client.post("/api/experiment/setup", json={"tag": TAG}).status_code == 200
    ids = {}
    for name in ("done", "running"):
        ids[name] = client.post(
            "/api/experiment/register",
            json=registration(TAG, description=name),
        ).get_json()["experiment_id"]
    assert (
        client.post("/api/experiment/complete", json={"experiment_id": ids["done"], "val_bpb": 1.0}).status_code == 200
    )
    client.post("/api/pool/register", json={"gpu_id": "g0", "gpu_index": 0, "gpu_name": "H100", "vram_mb": 80.0})
    assert client.post("/api/pool/acquire", json={"experiment_id": ids["running"]}).get_json()["acquired"] is True
    ids["before"] = snapshot(db)
    return ids


def rejected(client, db, world, method, path, status, *, contains=None, **kwargs):
    response = client.open(path, method=method, **kwargs)
    assert response.status_code == status, (path, response.status_code, response.get_data(as_text=True))
    assert response.is_json, response.get_data(as_text=True)
    body = response.get_json()
    assert isinstance(body["error"], str) and body["error"]
    if contains:
        assert contains in str(body), body
    assert snapshot(db) == world["before"], f"{path} changed the database"
    return body


def test_malformed_json_on_every_route(client, db, world):
    for path in POST_ROUTES:
        rejected(client, db, world, "POST", path, 400, contains="malformed JSON", data='{"tag": "mar11"')


def test_malformed_json_variants(client, db, world):
    for raw in ("{tag: mar11}", "{'tag': 'mar11'}", "\xff", '{"a":1}{"b":2}', '{"tag": "mar11",}'):
        rejected(client, db, world, "POST", "/api/experiment/setup", 400, contains="malformed JSON", data=raw)


def test_non_object_json(client, db, world):
    for raw in ("[1, 2]", '"mar11"', "3", "null", "true"):
        rejected(client, db, world, "POST", "/api/experiment/setup", 400, contains="must be an object", data=raw)


def test_deeply_nested_json(client, db, world):
    rejected(client, db, world, "POST", "/api/experiment/complete", 400, contains="malformed JSON", data="[" * 100_000)


MISSING = [
    ("/api/experiment/setup", {}, ["tag"]),
    ("/api/experiment/register", {"tag": TAG, "commit_sha": "abc1234"}, ["description", "hypothesis", "category"]),
    ("/api/experiment/complete", {"val_bpb": 0.9}, ["experiment_id"]),
    ("/api/experiment/crash", {"experiment_id": "x"}, ["error"]),
    ("/api/search/set-strategy", {"tag": TAG}, ["mode", "reason"]),
    ("/api/pool/register", {"gpu_id": "g9"}, ["gpu_index", "gpu_name", "vram_mb"]),
    ("/api/pool/release", {"gpu_id": "g0"}, ["experiment_id"]),
    ("/api/report/diff", {"experiment_a": "x"}, ["experiment_b"]),
]


def test_missing_fields_are_named(client, db, world):
    for path, body, missing in MISSING:
        answer = rejected(client, db, world, "POST", path, 400, json=body)
        named = {f["field"] for f in answer["fields"]}
        assert set(missing) <= named, (path, named)
        for field in missing:
            assert field in answer["error"]


def test_an_empty_body_is_missing_fields(client, db, world):
    answer = rejected(client, db, world, "POST", "/api/experiment/complete", 400, data="")
    assert {"experiment_id", "val_bpb"} <= {f["field"] for f in answer["fields"]}


WRONG_TYPES = [
    ("/api/experiment/complete", {"val_bpb": "0.99"}, "val_bpb"),
    ("/api/experiment/complete", {"val_bpb": 0.9, "peak_vram_mb": "45060"}, "peak_vram_mb"),
    ("/api/experiment/complete", {"val_bpb": 0.9, "num_steps": 9.5}, "num_steps"),
    ("/api/experiment/complete", {"val_bpb": 0.9, "num_steps": True}, "num_steps"),
    ("/api/experiment/complete", {"val_bpb": [0.9]}, "val_bpb"),
    ("/api/experiment/complete", {"val_bpb": None}, "val_bpb"),
    ("/api/experiment/setup", {"tag": 311}, "tag"),
    (
        "/api/experiment/register",
        registration(TAG, commit_sha=1234567),
        "commit_sha",
    ),
    (
        "/api/experiment/register",
        registration(TAG, description=5),
        "description",
    ),
    ("/api/experiment/crash", {"error": {"message": "x"}}, "error"),
    ("/api/experiment/history", {"tag": TAG, "limit": "5"}, "limit"),
    ("/api/pool/register", {"gpu_id": "g9", "gpu_index": "0", "gpu_name": "H100", "vram_mb": 80.0}, "gpu_index"),
    ("/api/pool/heartbeat", {"gpu_id": "g0", "telemetry": [1, 2]}, "telemetry"),
    (
        "/api/search/set-strategy",
        {"tag": TAG, "mode": "explore", "reason": "r", "explore_ratio": "0.5"},
        "explore_ratio",
    ),
]


def test_wrongly_typed_fields_are_named(client, db, world):
    for path, body, field in WRONG_TYPES:
        if path in ("/api/experiment/complete", "/api/experiment/crash"):
            body = {"experiment_id": world["running"], **body}
        answer = rejected(client, db, world, "POST", path, 400, json=body)
        assert field in answer["error"], (path, answer)
        assert any(f["field"] == field for f in answer["fields"])


OUT_OF_RANGE = [
    ("val_bpb", -0.5),
    ("peak_vram_mb", -1.0),
    ("training_seconds", -300.0),
    ("num_steps", -1),
    ("depth", -8),
    ("mfu_percent", -0.1),
    ("num_steps", 2**40),
    ("depth", 10**30),
]


def test_out_of_range_metrics(client, db, world):
    for metric, value in OUT_OF_RANGE:
        body = {"experiment_id": world["running"], "val_bpb": 0.9, metric: value}
        answer = rejected(client, db, world, "POST", "/api/experiment/complete", 400, json=body)
        assert metric in answer["error"]


def test_out_of_range_gpu_index(client, db, world):
    body = {"gpu_id": "g9", "gpu_index": 2**31, "gpu_name": "H100", "vram_mb": 80.0}
    assert "gpu_index" in rejected(client, db, world, "POST", "/api/pool/register", 400, json=body)["error"]
    body = {"gpu_id": "g9", "gpu_index": -1, "gpu_name": "H100", "vram_mb": 80.0}
    assert "gpu_index" in rejected(client, db, world, "POST", "/api/pool/register", 400, json=body)["error"]


def test_nan_and_infinity_literals(client, db, world):
    for literal, field in itertools.product(("NaN", "Infinity", "-Infinity"), ("val_bpb", "peak_vram_mb")):
        eid = world["running"]
        if field == "val_bpb":
            raw = f'{{"experiment_id": "{eid}", "val_bpb": {literal}}}'
        else:
            raw = f'{{"experiment_id": "{eid}", "val_bpb": 0.9, "{field}": {literal}}}'
        answer = rejected(client, db, world, "POST", "/api/experiment/complete", 400, data=raw)
        assert literal in answer["error"]


def test_a_number_too_large_for_a_float_is_infinite_and_rejected(client, db, world):
    raw = f'{{"experiment_id": "{world["running"]}", "val_bpb": 1e400}}'
    answer = rejected(client, db, world, "POST", "/api/experiment/complete", 400, data=raw)
    assert "val_bpb" in answer["error"]


NUL_BODIES = [
    (
        "/api/experiment/register",
        registration(TAG, description="a\u0000b"),
    ),
    ("/api/experiment/history", {"tag": "mar\u000011"}),
    ("/api/pool/heartbeat", {"gpu_id": "g0", "telemetry": {"note": "x\u0000"}}),
]


def test_nul_characters_are_rejected(client, db, world):
    for path, body in NUL_BODIES:
        rejected(client, db, world, "POST", path, 400, contains="NUL", json=body)


UNSAFE_TAGS = [
    "a..b",
    "x.lock",
    "has space",
    "-lead",
    "a/b",
    "",
    "a" * 65,
    ".hidden",
    "end.",
    "a~b",
    "a^b",
    "a:b",
    "a?b",
    "a*b",
    "a[b",
    "a\\b",
    "a@{b",
    "\u00fc",
    "newline-at-the-end\n",  # matched whole: a `$` would let it through
]


def test_tag_names_unsafe_as_a_branch_component(client, db, world):
    for tag in UNSAFE_TAGS:
        answer = rejected(client, db, world, "POST", "/api/experiment/setup", 400, json={"tag": tag})
        assert "tag" in answer["error"], tag


def test_safe_tag_names_are_accepted(client):
    for tag in ("mar11", "run_2.v3-a", "A" * 64):
        assert client.post("/api/experiment/setup", json={"tag": tag}).status_code == 200


def test_duplicate_setup_is_409(client, db, world):
    answer = rejected(client, db, world, "POST", "/api/experiment/setup", 409, json={"tag": TAG})
    assert answer["error"] == "Tag 'mar11' already exists"
    assert answer["existing"]["name"] == TAG


UNKNOWN_TAG = [
    (
        "/api/experiment/register",
        registration("nope"),
    ),
    ("/api/experiment/history", {"tag": "nope"}),
    ("/api/experiment/best", {"tag": "nope"}),
    ("/api/experiment/near-misses", {"tag": "nope"}),
    ("/api/search/strategy", {"tag": "nope"}),
    ("/api/search/set-strategy", {"tag": "nope", "mode": "explore", "reason": "r"}),
    ("/api/search/adapt", {"tag": "nope"}),
    ("/api/search/suggest", {"tag": "nope"}),
    ("/api/report/summary", {"tag": "nope"}),
    ("/api/report/tsv", {"tag": "nope"}),
]


def test_unknown_tag_is_404(client, db, world):
    for path, body in UNKNOWN_TAG:
        rejected(client, db, world, "POST", path, 404, contains="nope", json=body)


UNKNOWN_EXPERIMENT = [
    ("/api/experiment/complete", {"experiment_id": "exp-nope", "val_bpb": 0.5}),
    ("/api/experiment/crash", {"experiment_id": "exp-nope", "error": "boom"}),
    ("/api/pool/acquire", {"experiment_id": "exp-nope"}),
    ("/api/report/diff", {"experiment_a": "exp-nope", "experiment_b": "exp-nope2"}),
]


def test_unknown_experiment_is_404(client, db, world):
    for path, body in UNKNOWN_EXPERIMENT:
        rejected(client, db, world, "POST", path, 404, json=body)


def test_unknown_experiment_names_it(client, db, world):
    answer = rejected(
        client, db, world, "POST", "/api/experiment/complete", 404, json={"experiment_id": "exp-nope", "val_bpb": 0.5}
    )
    assert answer["error"] == "Experiment exp-nope not found"


def test_unknown_category_is_400(client, db, world):
    answer = rejected(
        client,
        db,
        world,
        "POST",
        "/api/experiment/register",
        400,
        json=registration(TAG, category="vibes"),
    )
    assert "category" in answer["error"]


def test_commit_sha_must_be_hex(client, db, world):
    answer = rejected(
        client,
        db,
        world,
        "POST",
        "/api/experiment/register",
        400,
        json=registration(TAG, commit_sha="not-a-sha"),
    )
    assert "commit_sha" in answer["error"]


def test_finishing_a_finished_experiment_is_409(client, db, world):
    for path in ("/api/experiment/complete", "/api/experiment/crash"):
        body = {"experiment_id": world["done"], "val_bpb": 0.5, "error": "boom"}
        answer = rejected(client, db, world, "POST", path, 409, contains="already finished", json=body)
        assert answer["fields"] == {"experiment_id": world["done"]}


def test_completing_a_crashed_experiment_is_409(client, db):
    client.post("/api/experiment/setup", json={"tag": TAG})
    eid = client.post("/api/experiment/register", json=registration(TAG)).get_json()["experiment_id"]
    client.post("/api/experiment/crash", json={"experiment_id": eid, "error": "boom"})
    before = snapshot(db)
    response = client.post("/api/experiment/complete", json={"experiment_id": eid, "val_bpb": 0.1})
    assert response.status_code == 409
    assert "crash" in response.get_json()["error"]
    assert snapshot(db) == before


def test_release_by_a_non_holder_is_409(client, db, world):
    answer = rejected(
        client, db, world, "POST", "/api/pool/release", 409, json={"gpu_id": "g0", "experiment_id": world["done"]}
    )
    assert answer["leased_to"] == world["running"]


def test_unknown_path_and_wrong_method_are_json(client, db, world):
    rejected(client, db, world, "POST", "/api/nothing/here", 404, json={})
    rejected(client, db, world, "GET", "/api/search/adapt", 405)
    rejected(client, db, world, "POST", "/api/pool/list", 405, json={})


# --- body size ------------------------------------------------------------------------------


def small_client(settings, limit):
    from app.web import create_app

    return create_app(dataclasses.replace(settings, max_body_bytes=limit)).test_client()


def test_oversized_body_is_413(settings, client, db, world):
    small = small_client(settings, 1024)
    body = registration(TAG, description="x" * 2000)
    response = small.post("/api/experiment/register", json=body)
    assert response.status_code == 413
    assert response.get_json()["error"] == "request body too large (limit 1024 bytes)"
    assert snapshot(db) == world["before"]
    # Under the limit the same app answers normally.
    body["description"] = "short"
    assert small.post("/api/experiment/register", json=body).status_code == 200


# --- bearer token ---------------------------------------------------------------------------


def test_bearer_token_required_when_api_token_is_set(settings, db):
    from app.web import create_app

    client = create_app(dataclasses.replace(settings, api_token="s3cret")).test_client()
    before = snapshot(db)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = client.post("/api/experiment/setup", json={"tag": TAG}, headers=headers)
        assert response.status_code == 401
        assert "bearer token" in response.get_json()["error"]
    assert client.get("/api/pool/list").status_code == 401
    assert snapshot(db) == before
    assert client.get("/health").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    good = {"Authorization": "Bearer s3cret"}
    assert client.post("/api/experiment/setup", json={"tag": TAG}, headers=good).status_code == 200
    assert client.get("/api/pool/list", headers=good).status_code == 200


def test_no_token_needed_when_api_token_is_unset(client):
    assert client.post("/api/experiment/setup", json={"tag": TAG}).status_code == 200


# --- bytes that are not text ------------------------------------------------------------------
# (Percent-escapes that are not UTF-8 cannot be sent through the test client, which replaces
# them; tests/test_api_service.py sends them byte for byte to the served API.)


def test_a_non_ascii_authorization_header_is_400_not_500(settings, db):
    from app.web import create_app

    client = create_app(dataclasses.replace(settings, api_token="s3cret")).test_client()
    for value in ("Bearer s3cr\u00e9t", "Bearer \u00ff"):
        response = client.get("/api/pool/list", headers={"Authorization": value})
        assert response.status_code == 400 and "Authorization" in response.get_json()["error"]
    assert client.get("/api/pool/list", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_nul_in_the_path_is_400(client, db, world):
    for path in ("/api/experiment/%00", "/api/experiment/exp-%00/log"):
        assert "NUL" in rejected(client, db, world, "GET", path, 400)["error"]


def test_a_query_string_that_is_not_utf8_is_400(client, db, world):
    # The test client passes a raw query string through unchanged.
    assert "UTF-8" in rejected(client, db, world, "GET", "/api/report/plot", 400, query_string="tag=%ff")["error"]


# --- database outage ------------------------------------------------------------------------

OUTAGE_REQUESTS = [
    ("GET", "/api/experiment/exp-1", None),
    ("GET", "/api/experiment/exp-1/log", None),
    ("GET", "/api/pool/list", None),
    ("GET", "/api/report/tags", None),
    ("GET", "/api/report/plot?tag=mar11", None),
    ("POST", "/api/experiment/setup", {"tag": TAG}),
    ("POST", "/api/experiment/register", registration(TAG)),
    ("POST", "/api/experiment/complete", {"experiment_id": "exp-1", "val_bpb": 1.0}),
    ("POST", "/api/experiment/submit", registration(TAG, train_py="print(1)")),
    ("POST", "/api/experiment/wait", {"experiment_id": "exp-1", "timeout_s": 1}),
    ("POST", "/api/experiment/cancel", {"experiment_id": "exp-1"}),
    ("POST", "/api/search/suggest", {"tag": TAG}),
    ("POST", "/api/pool/heartbeat", {"gpu_id": "gpu0"}),
    ("POST", "/api/report/summary", {"tag": TAG}),
]


def test_a_database_outage_is_503_json_with_one_log_line(settings, db, caplog):
    from app.embedded import free_port
    from app.web import create_app

    dead = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/autoresearch"
    client = create_app(dataclasses.replace(settings, database_url=dead)).test_client()
    with transaction(db) as session:  # this process starts with the database reachable
        session.execute(text("SELECT 1"))
    caplog.set_level(logging.INFO)
    for _ in range(3):
        for method, path, body in OUTAGE_REQUESTS:
            response = client.open(path, method=method, json=body)
            assert response.status_code == 503, (path, response.get_data(as_text=True))
            assert response.get_json() == {"error": "the database is unreachable; retry shortly"}
            assert response.headers["Retry-After"] == "5"
    assert client.get("/health").status_code == 503
    outage_lines = [r.getMessage() for r in caplog.records if "database unreachable" in r.getMessage()]
    assert len(outage_lines) == 1 and "Connection refused" in outage_lines[0], outage_lines
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"

    with transaction(db) as session:  # a server answers again
        session.execute(text("SELECT 1"))
    assert len([r for r in caplog.records if "reachable again" in r.getMessage()]) == 1


def test_a_failing_statement_is_not_an_outage(db):
    """Only a server that cannot serve is an outage (503); a query failing on a working one is not."""
    from sqlalchemy.exc import DBAPIError

    from app.db import is_outage

    try:
        with transaction(db) as session:
            session.execute(text("SELECT 1/0"))
    except DBAPIError as exc:
        assert not is_outage(exc)
    else:
        raise AssertionError("division by zero passed")
