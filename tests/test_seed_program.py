"""The seed's program.md works unchanged: its curl calls, verbatim but for host, port and the ids
the agent pastes in, run with the real curl binary against a real HTTP server.

Note the seed's calls send `-d` without a Content-Type, so curl says
application/x-www-form-urlencoded; the API must read the body as JSON all the same."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import threading

import pytest
from werkzeug.serving import make_server

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")

# From the seed's program.md (iii-hq/n-autoresearch), with http://localhost:3111 as $API.
SETUP = """curl -X POST $API/api/experiment/setup -d '{"tag":"mar11"}'"""
SUGGEST = """curl -X POST $API/api/search/suggest -d '{"tag":"mar11"}'"""
REGISTER = """COMMIT=$(printf %s "$SHA")
curl -X POST $API/api/experiment/register -d '{
  "tag": "mar11",
  "hypothesis": "Increasing depth from 8 to 12 should lower BPB due to more representational capacity",
  "description": "increase depth 8->12",
  "category": "architecture",
  "commit_sha": "'$COMMIT'",
  "diff_summary": "DEPTH=8 -> DEPTH=12",
  "parent_id": null
}'"""
COMPLETE = """curl -X POST $API/api/experiment/complete -d '{
  "experiment_id": "<id>",
  "val_bpb": 0.997900,
  "peak_vram_mb": 45060.2,
  "training_seconds": 300.1,
  "total_tokens_m": 499.6,
  "mfu_percent": 39.80,
  "num_steps": 953,
  "num_params_m": 50.3,
  "depth": 8
}'"""
CRASH = """curl -X POST $API/api/experiment/crash -d '{
  "experiment_id": "<id>",
  "error": "RuntimeError: CUDA out of memory..."
}'"""
POOL_LIST = """curl $API/api/pool/list"""
ACQUIRE = """curl -X POST $API/api/pool/acquire -d '{"experiment_id":"<id>"}'"""
RELEASE = """curl -X POST $API/api/pool/release -d '{"gpu_id":"<id>"}'"""
SUMMARY = """curl -X POST $API/api/report/summary -d '{"tag":"mar11"}'"""
TSV = """curl -X POST $API/api/report/tsv -d '{"tag":"mar11"}'"""
DIFF = """curl -X POST $API/api/report/diff -d '{"experiment_a":"exp-xxx","experiment_b":"exp-yyy"}'"""
BEST = """curl -X POST $API/api/experiment/best -d '{"tag":"mar11"}'"""
NEAR_MISSES = """curl -X POST $API/api/experiment/near-misses -d '{"tag":"mar11"}'"""
# Not in program.md but the seed's route with its field names: what a seed agent reads back.
HISTORY = """curl -X POST $API/api/experiment/history -d '{"tag":"mar11"}'"""


class Server:
    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def api(app):
    server = Server(app)
    yield server.url
    server.close()


def shell(api, command, sha="", **substitutions):
    """Run one program.md snippet in bash; return curl's output parsed as JSON."""
    for placeholder, value in substitutions.items():
        command = command.replace(placeholder, value)
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=30,
        env={"API": api, "SHA": sha, "PATH": "/usr/bin:/bin:/usr/local/bin"},
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_program_md_loop(api):
    setup = shell(api, SETUP)
    assert setup["branch"] == "autoresearch/mar11"
    assert setup["tag"]["name"] == "mar11"

    suggestion = shell(api, SUGGEST)
    assert suggestion["strategy"] == "explore"
    assert "underexplored_categories" in suggestion and suggestion["suggestions"]

    registered = shell(api, REGISTER, sha="3f9a2c1")
    assert registered["status"] == "registered"
    baseline = registered["experiment_id"]

    decision = shell(api, COMPLETE, **{"<id>": baseline})
    assert decision["improved"] is True
    assert decision["action"] == "keep_commit"
    assert decision["best_val_bpb"] == 0.9979

    worse = shell(api, REGISTER, sha="8b7e6d5")["experiment_id"]
    decision = shell(api, COMPLETE.replace("0.997900", "0.998500"), **{"<id>": worse})
    assert (decision["improved"], decision["action"], decision["best_val_bpb"]) == (False, "git_reset", 0.9979)

    crashed = shell(api, REGISTER, sha="1c2d3e4")["experiment_id"]
    crash = shell(api, CRASH, **{"<id>": crashed})
    assert crash["status"] == "crash"
    assert (crash["consecutive_crashes"], crash["should_abort"], crash["action"]) == (1, False, "git_reset")

    best = shell(api, BEST)
    assert best["best"]["experiment_id"] == baseline
    assert best["best"]["commit_sha"] == "3f9a2c1"
    assert best["experiment"]["val_bpb"] == 0.9979

    near = shell(api, NEAR_MISSES)
    assert near["total"] == 1
    assert near["near_misses"][0]["experiment_id"] == worse
    assert near["near_misses"][0]["delta"] == pytest.approx(0.0006)

    history = shell(api, HISTORY)
    assert [e["id"] for e in history["experiments"]] == [baseline, worse, crashed]
    assert [e["status"] for e in history["experiments"]] == ["keep", "discard", "crash"]

    summary = shell(api, SUMMARY)
    assert summary["best"] == {"val_bpb": 0.9979, "commit": "3f9a2c1", "experiment_id": baseline}
    assert summary["stats"]["total"] == 3
    assert (summary["stats"]["kept"], summary["stats"]["discarded"], summary["stats"]["crashed"]) == (1, 1, 1)

    tsv = shell(api, TSV)
    assert tsv["count"] == 3
    assert tsv["tsv"] == "\n".join(
        [
            "commit\tval_bpb\tmemory_gb\tstatus\tdescription",
            "3f9a2c1\t0.997900\t44.0\tkeep\tincrease depth 8->12",
            "8b7e6d5\t0.998500\t44.0\tdiscard\tincrease depth 8->12",
            "1c2d3e4\t0.000000\t0.0\tcrash\tincrease depth 8->12",
        ]
    )

    diff = shell(api, DIFF, **{"exp-xxx": baseline, "exp-yyy": worse})
    assert diff["a"]["id"] == baseline and diff["b"]["id"] == worse
    assert diff["delta_bpb"] == pytest.approx(0.0006)
    assert diff["delta_params_m"] == 0 and diff["delta_vram_mb"] == 0

    tags = shell(api, "curl $API/api/report/tags")
    assert [t["name"] for t in tags["tags"]] == ["mar11"]


def test_program_md_crash_limit(api):
    shell(api, SETUP)
    answers = [shell(api, CRASH, **{"<id>": shell(api, REGISTER, sha="abcdef0")["experiment_id"]}) for _ in range(3)]
    assert [a["should_abort"] for a in answers] == [False, False, True]


def test_program_md_multi_gpu(api):
    shell(api, SETUP)
    empty = shell(api, POOL_LIST)
    assert (empty["workers"], empty["total"], empty["idle"], empty["training"], empty["offline"]) == ([], 0, 0, 0, 0)
    shell(
        api,
        """curl -X POST $API/api/pool/register -d '{"gpu_id":"gpu-0","gpu_index":0,"gpu_name":"NVIDIA H100","vram_mb":81559}'""",
    )
    eid = shell(api, REGISTER, sha="abcdef0")["experiment_id"]

    acquired = shell(api, ACQUIRE, **{"<id>": eid})
    assert acquired == {"acquired": True, "gpu_id": "gpu-0", "gpu_index": 0}
    assert shell(api, POOL_LIST)["training"] == 1

    # program.md's release line sends only gpu_id; the seed's own handler then answers
    # "experiment_id is required", and so does this API, naming the field.
    refused = shell(api, RELEASE, **{"<id>": "gpu-0"})
    assert "experiment_id" in refused["error"]
    assert shell(api, POOL_LIST)["training"] == 1
    released = shell(
        api, RELEASE.replace('"gpu_id":"<id>"', '"gpu_id":"<id>","experiment_id":"' + eid + '"'), **{"<id>": "gpu-0"}
    )
    assert released == {"released": True}
    assert shell(api, POOL_LIST)["idle"] == 1


def test_errors_reach_curl_as_json(api):
    shell(api, SETUP)
    assert shell(api, SETUP)["error"] == "Tag 'mar11' already exists"
    assert "malformed JSON" in shell(api, """curl -X POST $API/api/experiment/setup -d '{"tag":'""")["error"]
    assert "NaN" in shell(api, COMPLETE.replace("0.997900", "NaN"), **{"<id>": "exp-x"})["error"]


def test_oversized_chunked_body_is_413_over_http(settings, db, tmp_path):
    from app.web import create_app

    server = Server(create_app(dataclasses.replace(settings, max_body_bytes=1024)))
    try:
        payload = tmp_path / "body.json"
        payload.write_text(json.dumps({"tag": "mar11", "padding": "x" * 5000}))
        for headers in ("", "-H 'Transfer-Encoding: chunked'"):
            answer = shell(server.url, f"curl -s -X POST {headers} $API/api/experiment/setup --data-binary @{payload}")
            assert answer == {"error": "request body too large (limit 1024 bytes)"}
        assert shell(server.url, "curl -s $API/api/report/tags") == {"tags": []}
    finally:
        server.close()
