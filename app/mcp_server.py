"""`autoresearch mcp`: the client's operations as MCP tools over stdio, for agents that speak MCP.

Each tool is one call of app.client.Client, the code behind the `autoresearch submit|wait|...`
commands, and answers the API's JSON. An error the API or the client reports comes back as a
tool error carrying the same one-line message the command prints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from app.client import Client, ClientError, submission_fields

# MCP clients give a tool call a limited time (Codex: 60 s by default), so one `wait` call
# returns after this long at most unless asked for more; the agent calls it again.
DEFAULT_WAIT_S = 50.0

INSTRUCTIONS = """\
autoresearch trains train.py on a pool of GPUs and decides keep or discard by val_bpb (lower is
better). Loop: `suggest` for guidance, edit train.py, git commit, `submit` (it sends train.py and
the commit), `wait` until the status is final (keep, discard, crash, timeout, cancelled, pruned;
call it again while it is queued, running or confirming), then move the branch on a keep.
program.md in the repository explains the whole protocol."""


def _answer(call: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return call()
    except ClientError as exc:
        raise ToolError(str(exc)) from None


def build_server(client: Client) -> MCPServer:
    server = MCPServer("autoresearch", instructions=INSTRUCTIONS)

    @server.tool()
    def setup_tag(tag: str, profile: str | None = None) -> dict[str, Any]:
        """Create a run tag (letters, digits, . _ -), optionally with a prepare.py profile (h100, tiny, ...)."""
        return _answer(lambda: client.setup_tag(tag, profile))

    @server.tool()
    def submit(tag: str, description: str, hypothesis: str, category: str, parent_id: str | None = None,
               train_py: str = "train.py", commit_sha: str | None = None, diff_summary: str = "",
               gpu_index: int | None = None, gpu_id: str | None = None,
               acknowledge_crashes: bool = False) -> dict[str, Any]:
        """Queue train.py for training. It reads the file (a path relative to this server's working
        directory, or absolute) and records HEAD of its git repository, which must match the file
        (commit first), unless commit_sha is given. parent_id is the experiment this builds on,
        "best" for the tag's current best. gpu_id (e.g. gpu0@host) or gpu_index pins one GPU. category: architecture, optimizer, hyperparams,
        activation, attention, embedding, normalization, regularization, scheduling,
        initialization, simplification, combination, ablation, other. Answers the experiment_id."""
        return _answer(lambda: client.submit(submission_fields(
            client, tag=tag, description=description, hypothesis=hypothesis, category=category,
            train_py=train_py, commit=commit_sha, parent=parent_id, diff_summary=diff_summary,
            gpu_index=gpu_index, gpu_id=gpu_id, acknowledge_crashes=acknowledge_crashes,
        )))

    @server.tool()
    def wait(experiment_id: str, timeout_s: float = DEFAULT_WAIT_S) -> dict[str, Any]:
        """Wait up to timeout_s seconds for the experiment's final status and answer its record
        (status, val_bpb, delta, near_miss, error, ...). If the status is still queued, running or
        confirming, call it again."""
        return _answer(lambda: client.wait(experiment_id, timeout_s))

    @server.tool()
    def get_experiment(experiment_id: str) -> dict[str, Any]:
        """One experiment's record now, with live progress while it trains."""
        return _answer(lambda: client.experiment(experiment_id))

    @server.tool()
    def pool_status() -> dict[str, Any]:
        """The GPU pool (total, idle, training, offline, each worker) and every tag with its best."""
        return _answer(client.overview)

    @server.tool()
    def best(tag: str) -> dict[str, Any]:
        """The tag's best experiment: best.experiment_id, best.commit_sha, best.val_bpb and its record."""
        return _answer(lambda: client.best(tag))

    @server.tool()
    def history(tag: str, status: str | None = None, limit: int | None = None) -> dict[str, Any]:
        """The tag's experiments, oldest first; status (e.g. running, keep) filters them."""
        return _answer(lambda: client.history(tag, status, limit))

    @server.tool()
    def diff(experiment_a: str, experiment_b: str) -> dict[str, Any]:
        """Metric deltas (b minus a) and the unified diff of the two experiments' train.py."""
        return _answer(lambda: client.diff(experiment_a, experiment_b))

    @server.tool()
    def suggest(tag: str) -> dict[str, Any]:
        """The search strategy (explore, exploit, combine, ablation), category stats, near-miss pairs
        and plain-language suggestions for the next experiment."""
        return _answer(lambda: client.suggest(tag))

    @server.tool()
    def cancel(experiment_id: str) -> dict[str, Any]:
        """Cancel a queued or running experiment (no verdict on the idea; frees the GPU)."""
        return _answer(lambda: client.cancel(experiment_id))

    @server.tool()
    def log(experiment_id: str, max_bytes: int = 4000) -> dict[str, Any]:
        """The tail of the experiment's training log."""
        return _answer(lambda: client.log(experiment_id, max_bytes))

    return server


def serve(client: Client) -> None:
    build_server(client).run("stdio")
