"""The agent's client: `autoresearch submit|wait|status|best|diff|suggest|...` over the HTTP API.

`Client` holds one method per operation and returns the API's JSON as it comes (fields this
client does not know pass through untouched). The command functions here and the MCP tools in
app.mcp_server are thin callers of it, so both speak to the API the same way.

Output: JSON by default (what an agent parses), `--table` for a short human-readable view.
Exit status: 0 on an answer, 1 when the API answers with an error (its one-line message goes
to stderr), 2 for a local problem (no train.py, not a git repository, bad arguments), 3 when
the API cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from app.cli import api_url
from app.config import Settings, load_settings
from app.models import LIVE_STATUSES

# The API caps one long poll at 600 s; the HTTP read waits a little longer than the poll.
MAX_WAIT_CALL_S = 600.0
READ_MARGIN_S = 30.0
REQUEST_TIMEOUT_S = 60.0


class ClientError(Exception):
    """Something to tell the user in one line; `exit_code` says which kind of failure."""

    exit_code = 2


class ApiError(ClientError):
    """The API answered with an error."""

    exit_code = 1

    def __init__(self, message: str, status: int, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


class ApiUnreachable(ClientError):
    exit_code = 3


def base_url(settings: Settings) -> str:
    url = settings.api_url or api_url(settings)
    if not url.startswith(("http://", "https://")):
        raise ClientError(f"AUTORESEARCH_API_URL={url!r} must start with http:// or https://")
    return url


@dataclass(frozen=True)
class Client:
    url: str
    token: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> Client:
        settings = settings or load_settings()
        return cls(base_url(settings), settings.api_token)

    def request(self, method: str, path: str, *, body: dict[str, Any] | None = None,
                params: dict[str, Any] | None = None, timeout_s: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = requests.request(method, self.url + path, json=body, params=params, headers=headers,
                                        timeout=(10, timeout_s))
        except requests.ConnectionError:
            raise ApiUnreachable(f"cannot reach the API at {self.url}: start it with `autoresearch up`, "
                                 "or point AUTORESEARCH_API_URL at it") from None
        except requests.Timeout:
            raise ApiUnreachable(f"the API at {self.url} did not answer {method} {path} "
                                 f"within {timeout_s:.0f}s") from None
        except requests.RequestException as exc:
            raise ApiUnreachable(f"{method} {self.url}{path} failed: {exc}") from None
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ApiError(f"{method} {path}: HTTP {response.status_code} from {self.url} is not a JSON object "
                           "(is AUTORESEARCH_API_URL the autoresearch API?)", response.status_code)
        if response.status_code >= 400:
            message = str(data.get("error") or f"HTTP {response.status_code}")
            if response.status_code == 401:
                message += "; set API_TOKEN to the server's token"
            raise ApiError(f"{message} (HTTP {response.status_code})", response.status_code, data)
        return data

    def post(self, path: str, body: dict[str, Any], **kwargs) -> dict[str, Any]:
        return self.request("POST", path, body=body, **kwargs)

    # --- operations -----------------------------------------------------------------------

    def setup_tag(self, tag: str, profile: str | None = None) -> dict[str, Any]:
        return self.post("/api/experiment/setup", {"tag": tag, **({"profile": profile} if profile else {})})

    def submit(self, fields: dict[str, Any]) -> dict[str, Any]:
        return self.post("/api/experiment/submit", fields)

    def experiment(self, experiment_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/experiment/{_path_part(experiment_id)}")

    def wait(self, experiment_id: str, timeout_s: float | None = None) -> dict[str, Any]:
        """The record once its status is final, or as it stands when timeout_s (None: no limit)
        runs out. One long poll covers at most MAX_WAIT_CALL_S; this loops over as many as needed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = MAX_WAIT_CALL_S if deadline is None else max(0.0, deadline - time.monotonic())
            poll = min(MAX_WAIT_CALL_S, left)
            record = self.post("/api/experiment/wait", {"experiment_id": experiment_id, "timeout_s": poll},
                               timeout_s=poll + READ_MARGIN_S)
            if record.get("status") not in LIVE_STATUSES or (deadline is not None and time.monotonic() >= deadline):
                return record

    def cancel(self, experiment_id: str) -> dict[str, Any]:
        return self.post("/api/experiment/cancel", {"experiment_id": experiment_id})

    def log(self, experiment_id: str, max_bytes: int = 16_000) -> dict[str, Any]:
        return self.request("GET", f"/api/experiment/{_path_part(experiment_id)}/log", params={"max_bytes": max_bytes})

    def best(self, tag: str) -> dict[str, Any]:
        return self.post("/api/experiment/best", {"tag": tag})

    def history(self, tag: str, status: str | None = None, limit: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"tag": tag}
        if status:
            body["status"] = status
        if limit:
            body["limit"] = limit
        return self.post("/api/experiment/history", body)

    def diff(self, experiment_a: str, experiment_b: str) -> dict[str, Any]:
        return self.post("/api/report/diff", {"experiment_a": experiment_a, "experiment_b": experiment_b})

    def suggest(self, tag: str) -> dict[str, Any]:
        return self.post("/api/search/suggest", {"tag": tag})

    def overview(self) -> dict[str, Any]:
        """The GPU pool and every tag: what `status` without an experiment shows."""
        return {"pool": self.request("GET", "/api/pool/list"), "tags": self.request("GET", "/api/report/tags")["tags"]}

    def best_id(self, tag: str) -> str | None:
        """The tag's best experiment, or None before its first result (an unknown tag is then
        reported by the call that uses the tag)."""
        try:
            return self.best(tag)["best"]["experiment_id"]
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise


def _path_part(experiment_id: str) -> str:
    if not experiment_id or "/" in experiment_id or experiment_id in (".", ".."):
        raise ClientError(f"{experiment_id!r} is not an experiment id (exp-...)")
    return experiment_id


# --- reading the agent's repository ---------------------------------------------------------

def _git(directory: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ClientError("git is not installed: install it, or pass the commit (--commit SHA)") from None


def read_submission(train_py: str | Path = "train.py", commit: str | None = None) -> tuple[str, str]:
    """(source, commit sha) of the train.py to submit. Without an explicit commit, the sha is
    HEAD of the repository holding the file, which must then match the file: the record says
    the experiment is that commit, and the agent moves its branch to it on a keep."""
    path = Path(train_py).expanduser().resolve()
    if not path.is_file():
        raise ClientError(f"no train.py at {path}: run from the repository holding it, or pass its path (--train-py)")
    source = path.read_text(encoding="utf-8")
    if commit:
        return source, commit
    head = _git(path.parent, "rev-parse", "HEAD")
    if head.returncode != 0:
        raise ClientError(f"cannot read the commit of {path.parent} (git: {head.stderr.strip() or 'no HEAD'}): "
                          "commit train.py first, or pass the commit (--commit SHA)")
    changes = _git(path.parent, "status", "--porcelain", "--", path.name)
    if changes.stdout.strip():
        raise ClientError(f"{path} differs from HEAD ({head.stdout.strip()[:12]}): commit it first "
                          "(git commit -am '...'), or pass the commit to record (--commit SHA)")
    return source, head.stdout.strip()


def submission_fields(client: Client, *, tag: str, description: str, hypothesis: str, category: str,
                      train_py: str | Path = "train.py", commit: str | None = None, parent: str | None = None,
                      diff_summary: str = "", gpu_index: int | None = None, gpu_id: str | None = None,
                      acknowledge_crashes: bool = False) -> dict[str, Any]:
    """The body of /api/experiment/submit. `parent="best"` means the tag's best at this moment
    (none before the first result)."""
    source, sha = read_submission(train_py, commit)
    fields: dict[str, Any] = {
        "tag": tag, "commit_sha": sha, "train_py": source, "description": description,
        "hypothesis": hypothesis, "category": category, "diff_summary": diff_summary,
        "acknowledge_crashes": acknowledge_crashes,
    }
    parent_id = client.best_id(tag) if parent == "best" else parent
    if parent_id:
        fields["parent_id"] = parent_id
    if gpu_index is not None:
        fields["gpu_index"] = gpu_index
    if gpu_id is not None:
        fields["gpu_id"] = gpu_id
    return fields


# --- the commands -------------------------------------------------------------------------

def _short(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}" if abs(value) < 100 else f"{value:.1f}"
    if isinstance(value, list):
        return str(len(value))
    text = str(value)
    first = text.splitlines()[0] if text else ""
    return first[:100] + (" ..." if len(text) > len(first) or len(first) > 100 else "")


def _pairs(record: dict[str, Any], keys: tuple[str, ...]) -> str:
    present = [k for k in keys if k in record]
    width = max(map(len, present), default=0)
    return "\n".join(f"{k:<{width}}  {_short(record[k])}" for k in present)


def _rows(items: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    cells = [list(keys)] + [[_short(item.get(k)) for k in keys] for item in items]
    widths = [max(len(row[i]) for row in cells) for i in range(len(keys))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


EXPERIMENT_KEYS = ("id", "experiment_id", "tag", "status", "val_bpb", "sigma", "z", "delta", "best_val_bpb",
                   "near_miss", "run_count", "runs", "best_runs", "category", "description", "gpu_id", "queue", "error")
EXPERIMENT_ROW_KEYS = ("id", "status", "val_bpb", "delta", "category", "description")


def _experiment_table(record: dict[str, Any]) -> str:
    text = _pairs(record, EXPERIMENT_KEYS)
    progress = record.get("progress")
    if isinstance(progress, dict) and progress.get("progress_pct") is not None:
        text += f"\nprogress  {progress['progress_pct']:.1f}% (loss {_short(progress.get('loss'))})"
    return text


def _overview_table(data: dict[str, Any]) -> str:
    pool = data["pool"]
    counts = ", ".join(f"{k} {pool.get(k)}" for k in ("total", "idle", "training", "offline"))
    return (f"GPUs: {counts}\n" + _rows(pool.get("workers", []), ("id", "status", "current_experiment_id"))
            + "\n\n" + _rows(data["tags"], ("name", "profile", "best_val_bpb", "total_experiments",
                                            "kept_experiments", "discarded_experiments", "crashed_experiments")))


def _diff_table(data: dict[str, Any]) -> str:
    rows = [{"side": side, **{k: data[side].get(k) for k in ("id", "val_bpb", "num_params_m", "peak_vram_mb")}}
            for side in ("a", "b")]
    head = _rows(rows, ("side", "id", "val_bpb", "num_params_m", "peak_vram_mb"))
    return head + "\n" + _pairs(data, ("delta_bpb", "delta_params_m", "delta_vram_mb")) + "\n\n" + (data.get("diff") or "")


def _suggest_table(data: dict[str, Any]) -> str:
    lines = [_pairs(data, ("strategy", "total_experiments", "near_misses_available"))]
    for key in ("underexplored_categories", "high_yield_categories"):
        if data.get(key):
            lines.append(f"{key}: {', '.join(data[key])}")
    lines += [f"- {s}" for s in data.get("suggestions", [])]
    return "\n".join(lines)


def _best_table(data: dict[str, Any]) -> str:
    return _experiment_table({**data.get("experiment", {}), **data.get("best", {})})


def _setup_table(data: dict[str, Any]) -> str:
    return _pairs({**data.get("tag", {}), "branch": data.get("branch")}, ("name", "profile", "branch"))


def _emit(args, data: dict[str, Any], table) -> None:
    print(table(data) if args.table else json.dumps(data, indent=2))


def cmd_submit(client: Client, args) -> int:
    fields = submission_fields(
        client, tag=args.tag, description=args.description, hypothesis=args.hypothesis, category=args.category,
        train_py=args.train_py, commit=args.commit, parent=args.parent, diff_summary=args.diff_summary,
        gpu_index=args.gpu_index, gpu_id=args.gpu_id, acknowledge_crashes=args.acknowledge_crashes,
    )
    _emit(args, client.submit(fields), _experiment_table)
    return 0


def cmd_wait(client: Client, args) -> int:
    _emit(args, client.wait(args.experiment_id, args.timeout), _experiment_table)
    return 0


def cmd_status(client: Client, args) -> int:
    if args.experiment_id:
        _emit(args, client.experiment(args.experiment_id), _experiment_table)
    else:
        _emit(args, client.overview(), _overview_table)
    return 0


def cmd_best(client: Client, args) -> int:
    _emit(args, client.best(args.tag), _best_table)
    return 0


def cmd_diff(client: Client, args) -> int:
    _emit(args, client.diff(args.experiment_a, args.experiment_b), _diff_table)
    return 0


def cmd_suggest(client: Client, args) -> int:
    _emit(args, client.suggest(args.tag), _suggest_table)
    return 0


def cmd_setup(client: Client, args) -> int:
    _emit(args, client.setup_tag(args.tag, args.profile), _setup_table)
    return 0


def cmd_history(client: Client, args) -> int:
    _emit(args, client.history(args.tag, args.status, args.limit),
          lambda data: _rows(data.get("experiments", []), EXPERIMENT_ROW_KEYS))
    return 0


def cmd_cancel(client: Client, args) -> int:
    _emit(args, client.cancel(args.experiment_id), _experiment_table)
    return 0


def cmd_log(client: Client, args) -> int:
    _emit(args, client.log(args.experiment_id, args.max_bytes), lambda data: data.get("log", ""))
    return 0


def cmd_mcp(client: Client, args) -> int:
    from app.mcp_server import serve

    serve(client)
    return 0


def _with_client(command):
    """Run a command against the configured API; a ClientError becomes one line and its exit code."""

    def run(args) -> int:
        try:
            return command(Client.from_settings(), args)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return run


def add_client_commands(commands) -> None:
    """Register the client subcommands on `autoresearch`'s subparsers."""
    output = argparse.ArgumentParser(add_help=False)
    style = output.add_mutually_exclusive_group()
    style.add_argument("--json", dest="table", action="store_false", help="print the API's JSON (the default)")
    style.add_argument("--table", dest="table", action="store_true", help="print a short table for people")
    output.set_defaults(table=False)

    def command(name: str, run, help_text: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, parents=[output], help=help_text, description=help_text)
        parser.set_defaults(run=_with_client(run))
        return parser

    submit = command("submit", cmd_submit, "submit ./train.py at the current commit for training")
    submit.add_argument("--tag", required=True)
    submit.add_argument("--description", required=True, help="what changed, in a line")
    submit.add_argument("--hypothesis", required=True, help="why it should help")
    submit.add_argument("--category", required=True, help="architecture, optimizer, hyperparams, ... (see program.md)")
    submit.add_argument("--parent", metavar="EXPERIMENT_ID", help="the experiment this builds on; `best` for the tag's best")
    submit.add_argument("--diff-summary", default="", help="the change in short, e.g. 'DEPTH = 8 -> 10'")
    submit.add_argument("--train-py", default="train.py", metavar="PATH", help="default ./train.py")
    submit.add_argument("--commit", metavar="SHA", help="record this commit instead of HEAD of train.py's repository")
    submit.add_argument("--gpu-index", type=int, metavar="N", help="pin to GPU N (default: the first idle GPU)")
    submit.add_argument("--gpu-id", metavar="ID", help="pin to this GPU of the pool, e.g. gpu0@host (unambiguous "
                        "across machines)")
    submit.add_argument("--acknowledge-crashes", action="store_true",
                        help="submit although the tag hit its consecutive-crash limit")

    wait = command("wait", cmd_wait, "wait until an experiment has its final status; print its record")
    wait.add_argument("experiment_id")
    wait.add_argument("--timeout", type=float, metavar="S",
                      help="give up after S seconds and print the record as it stands (default: no limit)")

    status = command("status", cmd_status, "one experiment, or (without an id) the GPU pool and every tag")
    status.add_argument("experiment_id", nargs="?")

    best = command("best", cmd_best, "the tag's best experiment")
    best.add_argument("--tag", required=True)

    diff = command("diff", cmd_diff, "metric deltas and the train.py diff from experiment A to B")
    diff.add_argument("experiment_a")
    diff.add_argument("experiment_b")

    suggest = command("suggest", cmd_suggest, "the search strategy's suggestions for the next experiment")
    suggest.add_argument("--tag", required=True)

    setup = command("setup", cmd_setup, "create a tag")
    setup.add_argument("--tag", required=True)
    setup.add_argument("--profile", help="prepare.py profile (default: the server's)")

    history = command("history", cmd_history, "a tag's experiments, oldest first")
    history.add_argument("--tag", required=True)
    history.add_argument("--status", help="only experiments with this status")
    history.add_argument("--limit", type=int)

    cancel = command("cancel", cmd_cancel, "cancel a queued or running experiment")
    cancel.add_argument("experiment_id")

    log = command("log", cmd_log, "the tail of an experiment's training log")
    log.add_argument("experiment_id")
    log.add_argument("--max-bytes", type=int, default=16_000)

    mcp = commands.add_parser("mcp", help="serve these operations as MCP tools over stdio (for agents)")
    mcp.set_defaults(run=_with_client(cmd_mcp))
