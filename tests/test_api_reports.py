"""/api/report/*, /openapi.json and /health."""

from __future__ import annotations

import dataclasses
import re

import pytest

from app.db import transaction
from app.services import experiments as experiments_svc

TAG = "mar11"


def setup(client, tag=TAG):
    assert client.post("/api/experiment/setup", json={"tag": tag}).status_code == 200


def register(client, tag=TAG, commit_sha="abc1234def5678", description="baseline", category="architecture"):
    response = client.post(
        "/api/experiment/register",
        json={
            "tag": tag,
            "commit_sha": commit_sha,
            "description": description,
            "hypothesis": "h",
            "category": category,
            "diff_summary": "x",
        },
    )
    assert response.status_code == 200, response.get_json()
    return response.get_json()["experiment_id"]


def complete(client, eid, val_bpb, **metrics):
    response = client.post("/api/experiment/complete", json={"experiment_id": eid, "val_bpb": val_bpb, **metrics})
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def crash(client, eid):
    assert client.post("/api/experiment/crash", json={"experiment_id": eid, "error": "OOM"}).status_code == 200


# --- tsv ------------------------------------------------------------------------------------


def test_tsv_is_autoresearch_results_tsv(client):
    setup(client)
    complete(client, register(client, commit_sha="a1b2c3d4e5f6"), 0.997900, peak_vram_mb=45060.2)
    crash(client, register(client, commit_sha="b2c3d4e5f6a7", description="double the width"))
    complete(
        client,
        register(client, commit_sha="c3d4e5f6a7b8", description="swap GELU for SiLU"),
        0.99,
        peak_vram_mb=44000.0,
    )
    complete(client, register(client, commit_sha="d4e5f6a7b8c9", description="lr 0.05"), 1.0123456, peak_vram_mb=512)
    register(client, description="still running")  # unfinished: not in results.tsv

    body = client.post("/api/report/tsv", json={"tag": TAG}).get_json()
    assert body["count"] == 4
    assert body["tsv"] == "\n".join(
        [
            "commit\tval_bpb\tmemory_gb\tstatus\tdescription",
            "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline",
            "b2c3d4e\t0.000000\t0.0\tcrash\tdouble the width",
            "c3d4e5f\t0.990000\t43.0\tkeep\tswap GELU for SiLU",
            "d4e5f6a\t1.012346\t0.5\tdiscard\tlr 0.05",
        ]
    )
    for row in body["tsv"].split("\n")[1:]:
        commit, bpb, memory, status, _ = row.split("\t")
        assert re.fullmatch(r"[0-9a-f]{7}", commit)
        assert re.fullmatch(r"\d+\.\d{6}", bpb)
        assert re.fullmatch(r"\d+\.\d", memory)
        assert status in {"keep", "discard", "crash"}


def test_tsv_keeps_columns_when_a_description_has_tabs_or_newlines(client):
    setup(client)
    complete(client, register(client, description="a\tb\nc"), 1.0)
    row = client.post("/api/report/tsv", json={"tag": TAG}).get_json()["tsv"].split("\n")[1]
    assert row.split("\t") == ["abc1234", "1.000000", "0.0", "keep", "a b c"]


def test_tsv_of_an_empty_tag_is_the_header(client):
    setup(client)
    assert client.post("/api/report/tsv", json={"tag": TAG}).get_json() == {
        "tsv": "commit\tval_bpb\tmemory_gb\tstatus\tdescription",
        "count": 0,
    }


# --- summary --------------------------------------------------------------------------------


def test_summary(client):
    setup(client)
    client.post("/api/pool/register", json={"gpu_id": "g0", "gpu_index": 0, "gpu_name": "H100", "vram_mb": 80.0})
    first = register(client, description="baseline", category="architecture")
    complete(client, first, 1.0, training_seconds=300.0)
    complete(client, register(client, category="optimizer"), 1.1, training_seconds=300.0)
    second = register(client, description="better", category="optimizer")
    complete(client, second, 0.95, training_seconds=300.0)
    crash(client, register(client, category="architecture"))
    register(client, category="attention")

    body = client.post("/api/report/summary", json={"tag": TAG}).get_json()
    assert body["tag"] == TAG
    assert body["branch"] == "autoresearch/mar11"
    assert body["best"] == {"val_bpb": 0.95, "commit": "abc1234def5678", "experiment_id": second}
    stats = body["stats"]
    assert (stats["total"], stats["kept"], stats["discarded"], stats["crashed"], stats["running"]) == (4, 2, 1, 1, 1)
    assert stats["keep_rate"] == 0.5
    assert body["categories"] == {"architecture": 2, "optimizer": 2, "attention": 1}
    assert [(p["id"], p["val_bpb"], p["description"]) for p in body["bpb_progression"]] == [
        (first, 1.0, "baseline"),
        (second, 0.95, "better"),
    ]
    assert all(p["at"] for p in body["bpb_progression"])
    assert body["total_training_minutes"] == 15.0
    assert body["strategy"] == "explore"
    assert body["gpu_pool"] == {"total": 1, "idle": 1, "training": 0}


def test_summary_of_an_empty_tag(client):
    setup(client)
    body = client.post("/api/report/summary", json={"tag": TAG}).get_json()
    assert body["best"] is None
    assert body["stats"]["total"] == 0 and body["stats"]["keep_rate"] == 0
    assert body["bpb_progression"] == []
    assert body["total_training_minutes"] == 0


def test_summary_of_an_unknown_tag_is_404(client):
    response = client.post("/api/report/summary", json={"tag": "nope"})
    assert response.status_code == 404
    assert response.get_json()["error"] == "Tag 'nope' not found"


# --- diff -----------------------------------------------------------------------------------

TRAIN_A = "DEPTH = 8\nLR = 0.04\n\ndef main():\n    pass\n"
TRAIN_B = "DEPTH = 12\nLR = 0.04\n\ndef main():\n    pass\n"


def stored(db, source, tag=TAG, description="d"):
    with transaction(db) as session:
        return experiments_svc.register(
            session,
            tag=tag,
            commit_sha="abc1234",
            description=description,
            hypothesis="h",
            category="architecture",
            train_py=source,
        ).id


def test_diff_compares_metrics_and_train_py_sources(client, db):
    setup(client)
    a = stored(db, TRAIN_A, description="depth 8")
    b = stored(db, TRAIN_B, description="depth 12")
    complete(client, a, 1.0, num_params_m=50.0, peak_vram_mb=40000.0)
    complete(client, b, 0.98, num_params_m=75.5, peak_vram_mb=52000.0)
    body = client.post("/api/report/diff", json={"experiment_a": a, "experiment_b": b}).get_json()
    assert body["a"]["id"] == a and body["b"]["id"] == b
    assert body["a"]["description"] == "depth 8"
    for side in ("a", "b"):
        assert {"id", "val_bpb", "description", "category", "num_params_m", "peak_vram_mb"} <= body[side].keys()
    assert body["delta_bpb"] == pytest.approx(-0.02)
    assert body["delta_params_m"] == pytest.approx(25.5)
    assert body["delta_vram_mb"] == pytest.approx(12000.0)
    assert body["diff"] == (
        f"--- {a}/train.py\n+++ {b}/train.py\n@@ -1,4 +1,4 @@\n-DEPTH = 8\n+DEPTH = 12\n LR = 0.04\n \n def main():\n"
    )


def test_diff_without_sources_or_results(client):
    setup(client)
    a, b = register(client), register(client)
    body = client.post("/api/report/diff", json={"experiment_a": a, "experiment_b": b}).get_json()
    assert body["diff"] is None
    assert body["delta_bpb"] is None


def test_diff_of_identical_sources_is_empty(client, db):
    setup(client)
    a, b = stored(db, TRAIN_A), stored(db, TRAIN_A)
    assert client.post("/api/report/diff", json={"experiment_a": a, "experiment_b": b}).get_json()["diff"] == ""


def test_diff_with_an_unknown_experiment_is_404(client):
    setup(client)
    a = register(client)
    response = client.post("/api/report/diff", json={"experiment_a": a, "experiment_b": "exp-nope"})
    assert response.status_code == 404
    assert response.get_json()["error"] == "One or both experiments not found"


# --- tags -----------------------------------------------------------------------------------


def test_tags_lists_every_tag_newest_first(client):
    setup(client, "first")
    setup(client, "second")
    complete(client, register(client, tag="second"), 0.9)
    tags = client.get("/api/report/tags").get_json()["tags"]
    assert [t["name"] for t in tags] == ["second", "first"]
    assert tags[0]["best_val_bpb"] == 0.9
    assert tags[0]["total_experiments"] == 1 and tags[0]["kept_experiments"] == 1
    assert tags[1]["branch"] == "autoresearch/first"


# --- /openapi.json --------------------------------------------------------------------------

SEED_ROUTES = [
    ("/api/experiment/setup", "post"),
    ("/api/experiment/register", "post"),
    ("/api/experiment/complete", "post"),
    ("/api/experiment/crash", "post"),
    ("/api/experiment/history", "post"),
    ("/api/experiment/best", "post"),
    ("/api/experiment/near-misses", "post"),
    ("/api/search/strategy", "post"),
    ("/api/search/set-strategy", "post"),
    ("/api/search/adapt", "post"),
    ("/api/search/suggest", "post"),
    ("/api/pool/register", "post"),
    ("/api/pool/heartbeat", "post"),
    ("/api/pool/list", "get"),
    ("/api/pool/acquire", "post"),
    ("/api/pool/release", "post"),
    ("/api/pool/deregister", "post"),
    ("/api/report/summary", "post"),
    ("/api/report/tsv", "post"),
    ("/api/report/diff", "post"),
    ("/api/report/tags", "get"),
]


def resolve(document, ref):
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        assert part in node, f"unresolved $ref {ref}"
        node = node[part]
    return node


def refs_in(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from refs_in(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs_in(value)


def test_openapi_document_is_complete_and_resolves(app, client):
    response = client.get("/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"] and document["info"]["version"]
    paths = document["paths"]
    for path, method in SEED_ROUTES:
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing from the document"

    # Every route the app serves under /api is in the document, with its method.
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert method.lower() in paths.get(path, {}), f"{method} {path} missing from the document"

    operation_ids = []
    for path, operations in paths.items():
        for method, operation in operations.items():
            assert method in {"get", "post", "put", "delete", "patch"}
            assert operation["summary"] and operation["responses"]["200"]
            operation_ids.append(operation["operationId"])
            if method == "post" and path in dict(SEED_ROUTES):
                schema = operation["requestBody"]["content"]["application/json"]["schema"]
                assert "$ref" in schema
            for parameter in operation.get("parameters", []):
                assert parameter["in"] in {"path", "query"}
                if parameter["in"] == "path":
                    assert "{" + parameter["name"] + "}" in path
    assert len(operation_ids) == len(set(operation_ids))

    for ref in refs_in(document):
        resolve(document, ref)
    complete_schema = resolve(
        document,
        paths["/api/experiment/complete"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"],
    )
    assert {"experiment_id", "val_bpb"} <= set(complete_schema["required"])
    assert "ErrorPublic" in document["components"]["schemas"]


# --- /health --------------------------------------------------------------------------------


def test_health_reports_a_reachable_database(client):
    response = client.get("/health")
    assert response.status_code == 200
    body = response.get_json()
    assert body["status"] == "ok"
    assert body["database"] == "ok"
    assert "broker" in body


def test_health_reports_an_unreachable_database(settings, db):
    from app.web import create_app

    broken = dataclasses.replace(settings, database_url="postgresql+psycopg2://postgres@127.0.0.1:1/nowhere")
    response = create_app(broken).test_client().get("/health")
    assert response.status_code == 503
    body = response.get_json()
    assert body["database"].startswith("unreachable")
    assert body["status"] == "degraded"
    assert "error" in body
