"""Request and response bodies, named by direction. The OpenAPI document is generated from these."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.models import FINISHED_STATUSES, LIVE_STATUSES

ExperimentId = Field(min_length=1, max_length=40, description="id returned by register or submit")
TagName = Field(min_length=1, max_length=64, description="run tag; also the git branch autoresearch/<tag>")
NonNegative = Field(default=None, ge=0, allow_inf_nan=False)
# Integer columns are Postgres INTEGER: a larger number must be a 400, not a database error.
INT_MAX = 2**31 - 1
Status = Literal[LIVE_STATUSES + FINISHED_STATUSES]  # type: ignore[valid-type]


class Request(BaseModel):
    # strict: "1.5" is not a number and 1 is not a string; unknown fields are ignored as in the seed.
    model_config = ConfigDict(strict=True, extra="ignore")


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- requests -------------------------------------------------------------------------------

class TagQuery(Request):
    tag: str = TagName


class SetupCreate(Request):
    tag: str = TagName
    profile: str | None = Field(default=None, description="prepare.py profile; default from AUTORESEARCH_PROFILE")
    early_stopping: bool = Field(default=False, description="stop runs clearly worse than the best's at the same "
                                 "progress, as `pruned` (docs/benchmarks.md, Early stopping)")


class ExperimentCreate(Request):
    tag: str = TagName
    commit_sha: str = Field(min_length=4, max_length=64, pattern=r"^[0-9a-fA-F]+$")
    description: str = Field(min_length=1, max_length=2000)
    hypothesis: str = Field(min_length=1, max_length=4000)
    category: str = Field(min_length=1, max_length=32)
    diff_summary: str = Field(default="", max_length=20000)
    parent_id: str | None = Field(default=None, max_length=40)
    gpu_id: str | None = Field(default=None, max_length=128)


class ExperimentSubmit(ExperimentCreate):
    train_py: str | None = Field(default=None, max_length=1_000_000, description="the train.py source; else read from REPO_DIR at commit_sha")
    gpu_index: int | None = Field(default=None, ge=0, le=INT_MAX, description="pin to this GPU's queue")
    acknowledge_crashes: bool = Field(default=False, description="reset the tag's consecutive crashes after a crash limit tripped")
    gpu_id: str | None = Field(default=None, max_length=128, description="pin to this GPU of the pool (its id, e.g. gpu0@host)")


class RunMetrics(Request):
    """A summary block's numbers, by the same rules whoever reports them (agent or worker)."""

    val_bpb: float = Field(ge=0, allow_inf_nan=False)
    peak_vram_mb: float | None = NonNegative
    training_seconds: float | None = NonNegative
    total_seconds: float | None = NonNegative
    total_tokens_m: float | None = NonNegative
    mfu_percent: float | None = NonNegative
    num_steps: int | None = Field(default=None, ge=0, le=INT_MAX)
    num_params_m: float | None = NonNegative
    depth: int | None = Field(default=None, ge=0, le=INT_MAX)
    profile: str | None = Field(default=None, max_length=32)


class ExperimentComplete(RunMetrics):
    experiment_id: str = ExperimentId


class ExperimentCrash(Request):
    experiment_id: str = ExperimentId
    error: str = Field(min_length=1, max_length=100_000)


class ExperimentRef(Request):
    experiment_id: str = ExperimentId


class ExperimentWait(Request):
    experiment_id: str = ExperimentId
    timeout_s: float = Field(default=60, ge=0, le=600, allow_inf_nan=False)


class LogQuery(Request):
    # Query strings carry text, so this one model parses leniently.
    model_config = ConfigDict(strict=False, extra="ignore")
    max_bytes: int = Field(default=16_000, ge=1, le=1_000_000)


class HistoryQuery(Request):
    tag: str = TagName
    status: Status | None = None
    limit: int | None = Field(default=None, ge=1, le=10_000)


class NearMissQuery(Request):
    tag: str = TagName
    limit: int = Field(default=20, ge=1, le=1000)


class StrategySet(Request):
    tag: str = TagName
    mode: Literal["explore", "exploit", "combine", "ablation"]
    reason: str = Field(min_length=1, max_length=2000)
    explore_ratio: float = Field(default=0.7, ge=0, le=1, allow_inf_nan=False)
    temperature: float = Field(default=1.0, ge=0, le=10, allow_inf_nan=False)


class GpuRegister(Request):
    gpu_id: str = Field(min_length=1, max_length=128)
    gpu_index: int = Field(ge=0, le=INT_MAX)
    gpu_name: str = Field(min_length=1, max_length=255)
    vram_mb: float = Field(ge=0, allow_inf_nan=False)
    host: str = Field(default="", max_length=255)


class GpuHeartbeat(Request):
    gpu_id: str = Field(min_length=1, max_length=128)
    telemetry: dict[str, Any] | None = None


class GpuRef(Request):
    gpu_id: str = Field(min_length=1, max_length=128)


class GpuAcquire(Request):
    experiment_id: str = ExperimentId


class GpuRelease(Request):
    gpu_id: str = Field(min_length=1, max_length=128)
    experiment_id: str = ExperimentId


class DiffQuery(Request):
    experiment_a: str = ExperimentId
    experiment_b: str = ExperimentId


# --- responses ------------------------------------------------------------------------------

class Progress(Response):
    step: int | None = None
    progress_pct: float | None = None
    loss: float | None = None
    tokens_per_sec: float | None = None
    mfu_percent: float | None = None
    remaining_s: float | None = None
    step_ms: float | None = None


class RunPublic(Response):
    id: str
    experiment_id: str
    replicate: int = Field(description="0: the first run; baseline replicates and confirmation runs count up")
    attempt: int = Field(description="attempts of this replicate so far, counting runs lost with their worker")
    purpose: Literal["first", "baseline", "confirm"]
    seed: int
    status: str
    scored_by: Literal["worker", "agent"]
    gpu_id: str | None
    gpu_index: int | None
    gpu_model: str | None
    host: str | None
    lease_holder: str | None
    lease_expires_at: str | None
    task_id: str | None
    queue: str | None
    queued_at: str | None
    claimed_at: str | None
    gpu_granted_at: str | None = Field(default=None, description="when the run got its GPU: its claim, or for a "
                                       "staged run (claimed while the GPU trained the run before it) the hand-over; "
                                       "null while it waits staged")
    staging: dict | None = Field(default=None, description="a staged run: batches trained before its hold (1: the "
                                 "compile), whether a standby interpreter ran it, seconds to the hold and waited, "
                                 "its peak and held GPU memory (MB)")
    training_started_at: str | None
    finished_at: str | None
    profile: str | None
    val_bpb: float | None
    reported_val_bpb: float | None = Field(description="the val_bpb train.py printed; worker runs score the exported "
                                           "model (val_bpb) and keep this for comparison")
    scoring: dict | None = Field(default=None, description="the trusted evaluator's account: eval_tokens, batch_size, "
                                 "device, causality_max_diff, timings")
    score_mismatch: bool | None = Field(default=None, description="reported_val_bpb differs from val_bpb by more "
                                        "than bf16 rounding (2**-8 relative)")
    training_seconds: float | None
    total_seconds: float | None
    peak_vram_mb: float | None
    mfu_percent: float | None
    total_tokens_m: float | None
    num_steps: int | None
    num_params_m: float | None
    depth: int | None
    error: str | None
    progress: Progress | None
    curve: list[Progress] | None = Field(description="every progress report of the run, in order")
    compile_seconds: float | None = Field(
        default=None, description="wall time of step 0, which torch.compile's tracing and kernel builds dominate")
    fingerprint: dict[str, Any] | None = Field(
        default=None, description="sha256 of the fixed files, tokenizer, manifest and validation shard; GPU model, "
        "driver, torch: the setup the run was scored with")


class ExperimentPublic(Response):
    id: str
    tag: str
    parent_id: str | None
    commit_sha: str
    description: str
    hypothesis: str
    category: str
    diff_summary: str
    status: str
    profile: str | None
    val_bpb: float | None
    peak_vram_mb: float | None
    training_seconds: float | None
    total_seconds: float | None
    total_tokens_m: float | None
    mfu_percent: float | None
    num_steps: int | None
    num_params_m: float | None
    depth: int | None
    delta: float | None
    near_miss: bool
    sigma: float | None = Field(description="run-to-run stdev of val_bpb the verdict used (the noise floor)")
    z: float | None = Field(description="delta in units of its own standard error; > 2 is a clear gain")
    scored_by: str | None = Field(description="worker (trained and scored by the pool) or agent (manual mode)")
    gpu_id: str | None
    gpu_index: int | None
    pinned_gpu: int | None
    pinned_gpu_id: str | None
    task_id: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    progress: Progress | None
    cancel_requested: bool
    run_count: int = Field(description="finished runs behind val_bpb (their mean)")
    runs: list[RunPublic] | None = None


class TagPublic(Response):
    name: str
    branch: str
    profile: str
    created_at: str | None
    best_val_bpb: float | None
    best_experiment_id: str | None
    total_experiments: int
    kept_experiments: int
    discarded_experiments: int
    crashed_experiments: int
    consecutive_crashes: int
    fingerprint: dict[str, Any] | None = Field(default=None, description="the setup pinned by the tag's first run")
    early_stopping: bool = False


class SetupPublic(Response):
    tag: TagPublic
    branch: str


class Registered(Response):
    experiment_id: str
    status: str


class Submitted(Response):
    experiment_id: str
    status: str
    task_id: str
    queue: str
    runs: list[str] = Field(description="ids of the runs queued: one, or BASELINE_RUNS for a tag's first experiment")


class Decision(Response):
    experiment_id: str
    status: str
    val_bpb: float
    improved: bool
    delta: float
    best_val_bpb: float | None
    near_miss: bool
    action: Literal["keep_commit", "git_reset"]
    sigma: float | None = Field(default=None, description="the noise floor used: run-to-run stdev of val_bpb")
    z: float | None = Field(default=None, description="delta / its standard error; None without a noise floor or best")
    runs: int = Field(default=1, description="finished runs of this experiment behind val_bpb")
    best_runs: int = Field(default=0, description="finished runs behind the best it was compared with")


class CrashRecorded(Response):
    experiment_id: str
    status: str
    consecutive_crashes: int
    should_abort: bool
    action: Literal["git_reset"]


class HistoryPublic(Response):
    experiments: list[ExperimentPublic]
    total: int


class BestPublic(Response):
    best: dict[str, Any]
    experiment: ExperimentPublic


class NearMissPublic(Response):
    experiment_id: str
    tag: str
    val_bpb: float | None
    delta: float
    hypothesis: str
    category: str
    diff_summary: str


class NearMissesPublic(Response):
    near_misses: list[NearMissPublic]
    total: int


class StrategyPublic(Response):
    mode: str
    explore_ratio: float | None = None
    temperature: float | None = None
    updated_at: str | None = None
    reason: str | None = None


class SuggestionPublic(Response):
    strategy: str
    total_experiments: int
    category_stats: dict[str, dict[str, int]]
    underexplored_categories: list[str]
    high_yield_categories: list[str]
    near_misses_available: int
    near_miss_categories: list[str]
    near_miss_pairs: list[dict[str, Any]]
    recent_bpb_trend: list[float]
    suggestions: list[str]


class GpuPublic(Response):
    id: str
    name: str
    gpu_index: int
    host: str
    gpu_name: str
    vram_mb: float
    status: str
    current_experiment_id: str | None
    registered_at: str | None
    last_heartbeat: str | None
    telemetry: dict[str, Any] | None


class GpuRegistered(Response):
    registered: bool
    worker: GpuPublic


class PoolPublic(Response):
    workers: list[GpuPublic]
    total: int
    idle: int
    training: int
    offline: int


class Acquired(Response):
    acquired: bool
    gpu_id: str | None
    gpu_index: int | None = None
    reason: str | None = None


class Flag(Response):
    """A one-key acknowledgement such as {"ok": true} or {"released": true}."""


class SummaryPublic(Response):
    tag: str
    branch: str
    profile: str
    best: dict[str, Any] | None
    stats: dict[str, Any]
    categories: dict[str, int]
    bpb_progression: list[dict[str, Any]]
    total_training_minutes: float
    strategy: str
    gpu_pool: dict[str, int]
    noise: dict[str, Any] = Field(description="{sigma, runs, by_gpu_model}: the tag's run-to-run noise floor")


class TsvPublic(Response):
    tsv: str
    count: int


class DiffPublic(Response):
    a: dict[str, Any]
    b: dict[str, Any]
    delta_bpb: float | None
    delta_params_m: float | None
    delta_vram_mb: float | None
    diff: str | None = Field(description="unified diff of the two train.py sources")


class TagsPublic(Response):
    tags: list[TagPublic]


class ProgressPoint(Response):
    n: int
    id: str
    val_bpb: float | None
    status: str
    description: str
    best: float | None = Field(description="the running best after this result")
    best_stderr: float | None = Field(default=None, description="standard error of that best's mean")
    runs: list[float] = Field(default_factory=list, description="val_bpb of each finished run behind val_bpb")


class ProgressPublic(Response):
    tag: str
    points: list[ProgressPoint]


class TagOverview(TagPublic):
    running: int = Field(description="experiments running or confirming")
    queued: int
    noise: dict[str, Any] = Field(description="{sigma, runs}: the tag's run-to-run noise floor of val_bpb")
    verdicts: int = Field(description="experiments with a verdict: keep, discard, crash or timeout")
    gpu_hours: float = Field(description="hours GPUs were held by the tag's runs, from claim to end")
    experiments_per_gpu_hour: float | None


class OverviewPublic(Response):
    tags: list[TagOverview]


class LogPublic(Response):
    experiment_id: str
    log: str
    log_path: str | None


class HealthPublic(Response):
    status: str
    database: str
    broker: str | None = None


class ErrorPublic(Response):
    error: str
    fields: Any | None = None
