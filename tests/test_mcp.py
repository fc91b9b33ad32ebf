"""`autoresearch mcp` as an agent's MCP host runs it: a subprocess on stdio, driven by the MCP
client of the same SDK, against the real API and CPU worker of test_client."""

from __future__ import annotations

import asyncio
import json
import uuid

from mcp import ClientSession, StdioServerParameters, stdio_client
from test_client import AUTORESEARCH, agent_api, agent_repo, client_env, git  # noqa: F401  (fixtures)

from app.models import LIVE_STATUSES

EXPECTED_TOOLS = {"setup_tag", "submit", "wait", "get_experiment", "pool_status", "best", "history", "diff",
                  "suggest", "cancel", "log"}


def payload(result) -> dict:
    """A tool's JSON answer; the text block carries the same JSON as the structured content."""
    assert not result.is_error, result.content
    text = json.loads(result.content[0].text)
    assert result.structured_content in (None, text)
    return text


async def drive(url: str, repo, tag: str) -> dict:
    server = StdioServerParameters(command=AUTORESEARCH, args=["mcp"], env=client_env(url), cwd=str(repo))
    async with stdio_client(server) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        seen: dict = {"tools": {t.name: t for t in (await session.list_tools()).tools}}
        seen["setup"] = payload(await session.call_tool("setup_tag", {"tag": tag, "profile": "tiny"}))
        seen["submitted"] = payload(await session.call_tool("submit", {
            "tag": tag, "description": "baseline", "hypothesis": "the bar", "category": "other",
        }))
        experiment_id = seen["submitted"]["experiment_id"]
        record = {"status": "queued"}
        for _ in range(20):  # each call returns within its timeout, final or not
            record = payload(await session.call_tool("wait", {"experiment_id": experiment_id, "timeout_s": 10}))
            if record["status"] not in LIVE_STATUSES:
                break
        seen["verdict"] = record
        seen["best"] = payload(await session.call_tool("best", {"tag": tag}))
        seen["unknown_tag"] = await session.call_tool("suggest", {"tag": "no-such-tag"})
        seen["bad_category"] = await session.call_tool("submit", {
            "tag": tag, "description": "x", "hypothesis": "y", "category": "vibes",
        })
    return seen


def test_an_agent_drives_submit_and_wait_through_the_mcp_server(agent_api, agent_repo):  # noqa: F811
    tag = f"m{uuid.uuid4().hex[:10]}"
    seen = asyncio.run(drive(agent_api["url"], agent_repo, tag))

    assert EXPECTED_TOOLS <= set(seen["tools"])
    submit_schema = seen["tools"]["submit"].input_schema
    assert set(submit_schema["required"]) == {"tag", "description", "hypothesis", "category"}

    assert seen["setup"]["tag"]["name"] == tag
    # The server read train.py from its working directory, the agent's repository, at HEAD.
    verdict = seen["verdict"]
    assert verdict["id"] == seen["submitted"]["experiment_id"]
    assert verdict["status"] == "keep", verdict
    assert verdict["val_bpb"] == 1.5 and verdict["delta"] == 0
    assert verdict["commit_sha"] == git(agent_repo, "rev-parse", "HEAD")
    assert seen["best"]["best"]["experiment_id"] == verdict["id"]

    # Errors come back as tool errors carrying the API's one-line message.
    assert seen["unknown_tag"].is_error
    assert "Tag 'no-such-tag' not found (HTTP 404)" in seen["unknown_tag"].content[0].text
    assert seen["bad_category"].is_error
    assert "category must be one of" in seen["bad_category"].content[0].text
