"""Run one train.py as a child process and report how it ended.

No database, no Celery: the training task calls run_training() and records the RunResult.

Why it is built this way (see shared/notes/celery.md, "The training subprocess"):
- train.py runs in its own process group (start_new_session=True), and every way out of
  run_training() kills that whole group and waits until no member is left. Killing only the
  direct child would leave its children (torch compile workers, dataloaders) holding GPU memory.
- Output goes to a file, never a PIPE: a PIPE nobody drains fills up and blocks train.py.
- The deadline and cancel requests are checked here, by polling, not by Celery's time limits,
  which kill only the pool process and leave the training group running.
- PR_SET_PDEATHSIG(SIGKILL) makes the direct child die if the worker process dies without
  running any cleanup (kill -9). Its own children are not covered: the kernel clears the
  setting on fork, and a grandchild that calls setsid() leaves the group. Those limits are
  accepted; the normal paths (exit, timeout, cancel, exception, SIGTERM) clean the whole group.
- train.py is the agent's code, and the score must not depend on its manners: its environment
  is built from an allow-list (CHILD_ENV_NAMES below), never copied from the worker's, which
  holds the database, broker and API credentials; a root worker runs it as an unprivileged user
  in a run directory it cannot leave (workers/sandbox.py).
- A run may start from a standby interpreter (workers/standby.py, start_standby below) that has
  imported torch and the rest before the run was known; it is started with the same account,
  arguments and environment (less the run's own variables) as a fresh train.py, and its process
  is then the run's, handled as a fresh one would be. The trusted evaluator starts from one too
  (start_evaluator_standby).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from app.config import PROJECT_ROOT, SANDBOX_ROOT
from app.process_groups import group_alive, parent_death_signal
from workers import evaluator, sandbox
from workers.progress import last_progress, parse_summary
from workers.standby import Standby, standing_environment

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Settings

TRAIN_FILENAME = "train.py"  # the source is written here, inside the run directory
LOG_FILENAME = "train.log"  # stdout and stderr of the run, together
TERM_GRACE_S = 5.0  # seconds between SIGTERM and SIGKILL, for train.py to exit cleanly
KILL_WAIT_S = 30.0  # seconds to wait for the group to vanish after SIGKILL (D-state GPU calls)
GROUP_POLL_S = 0.05  # seconds between checks while waiting for the group to vanish
LOG_TAIL_CHARS = 4000  # size of RunResult.log_tail
SUMMARY_SCAN_BYTES = 64 * 1024  # the summary block is searched for in this much of the log end
PROGRESS_SCAN_BYTES = 1024 * 1024  # at most this much new output is scanned per poll
ERROR_LINES = 30  # lines kept in RunResult.error when no traceback is found

STATUSES = ("finished", "failed", "timeout", "cancelled")

# The child's environment: the worker's variables named here, then what the caller passes (the
# run's profile, cache view, seed, PYTHONPATH). Only what running Python and a GPU needs: locale
# and time zone, the loader path, the CUDA/NVIDIA/torch/triton settings of the machine, thread
# counts. Everything else the worker holds stays with it: DATABASE_URL, CELERY_BROKER_URL,
# CELERY_RESULT_BACKEND, API_TOKEN, FLOWER_BASIC_AUTH, cloud keys, its own AUTORESEARCH_* settings.
CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
})
CHILD_ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "CUBLAS_", "CUDNN_", "NCCL_", "TORCH_", "TORCHINDUCTOR_",
                      "PYTORCH_", "TRITON_")
# A name under an allowed prefix is still dropped when it looks like a secret (NVIDIA_API_KEY)
# or a service address: no GPU setting is named so.
CHILD_ENV_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "AUTH", "URL")


def allowed_environment(environ: dict[str, str]) -> dict[str, str]:
    """The variables of `environ` that train.py may see (CHILD_ENV_NAMES, CHILD_ENV_PREFIXES)."""
    return {name: value for name, value in environ.items()
            if (name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES))
            and not any(word in name.upper() for word in CHILD_ENV_SECRET_WORDS)}


@dataclass
class RunResult:
    status: str  # one of STATUSES
    returncode: int | None  # exit code; negative = killed by that signal; None if never reaped
    summary: dict | None  # parse_summary() of the log, None if absent or invalid
    log_path: Path
    log_tail: str  # the last LOG_TAIL_CHARS characters of the log
    error: str | None  # None when finished; otherwise why, with the traceback tail if any
    started_at: float  # time.time()
    ended_at: float  # time.time(), after the process group is gone
    duration_s: float
    progress: dict | None = None  # the last progress line seen, parsed
    standby: bool = False  # train.py ran in a standby interpreter (workers/standby.py)


def run_training(
    source: str,
    run_dir: Path,
    *,
    env: dict[str, str],
    timeout_s: float,
    should_cancel: Callable[[], bool] = lambda: False,
    on_progress: Callable[[dict], None] | None = None,
    poll_interval_s: float = 1.0,
    python: str = sys.executable,
    sandbox_dir: Path = SANDBOX_ROOT,
    standby: Standby | None = None,
    staged: StagedRun | None = None,
) -> RunResult:
    """Write `source` to run_dir/train.py, run it, and return how it ended.

    The child's environment is allowed_environment(os.environ) plus `env` (AUTORESEARCH_PROFILE,
    AUTORESEARCH_CACHE, PYTHONPATH, ...). When this process is root, the child runs as
    sandbox.SANDBOX_USER, with its home under `sandbox_dir`, in run_dir made its own (see
    workers/sandbox.py). Every `poll_interval_s` the new log output is scanned and on_progress is
    called with the latest new progress line (at most once per poll), then the deadline and
    should_cancel() are checked. On timeout or cancel the process group gets SIGTERM, then
    SIGKILL after TERM_GRACE_S.

    With a `standby` (start_standby) train.py runs in it when it fits this run, else (logged) in
    a fresh process; either way the standby is used up. With `staged` (stage_training), the run
    started earlier is let go on, and `source`, `env` and `standby` are not used: the deadline
    counts from now.

    An exception raised by on_progress or should_cancel propagates to the caller, after the
    process group has been killed. So does SystemExit when the worker gets SIGTERM.
    """
    with sigterm_raises_system_exit():
        started = None
        stop_reason = None  # "timeout" or "cancelled" once we decide to kill
        progress = None
        try:
            if staged is not None:
                started = staged.started
                staged.let_go()
            else:
                started = _start(source, Path(run_dir), env, python, sandbox_dir, standby)
            proc = started.proc
            deadline = time.monotonic() + timeout_s
            reader = _LogFollower(started.log_path)
            while True:
                wait_s = max(0.0, min(poll_interval_s, deadline - time.monotonic()))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=wait_s)
                latest = last_progress(reader.read_new())
                if latest is not None:
                    progress = latest
                    if on_progress is not None:
                        on_progress(latest)
                if proc.returncode is not None:
                    break
                if time.monotonic() >= deadline:
                    stop_reason = "timeout"
                    break
                if should_cancel():
                    stop_reason = "cancelled"
                    break
        finally:
            # Every exit path, including exceptions, ends here: no member of the group may
            # outlive the run (a child left behind by train.py would keep its GPU memory).
            if started is not None:
                _stop_group(started.proc)
            if staged is not None:
                staged.discard()
            if standby is not None:  # a no-op once handed the run; unused, it must not outlive it
                standby.discard()
        ended_at = time.time()

    return _make_result(
        stop_reason=stop_reason,
        returncode=started.proc.returncode,
        log_path=started.log_path,
        timeout_s=timeout_s,
        progress=progress,
        started_at=started.started_at,
        ended_at=ended_at,
        standby=started.standby,
    )


@dataclass(frozen=True)
class _Started:
    proc: subprocess.Popen  # leads the run's process group
    log_path: Path
    started_at: float  # time.time()
    standby: bool  # it runs in a standby interpreter


def _start(source: str, run_dir: Path, env: dict[str, str], python: str, sandbox_dir: Path,
           standby: Standby | None, gate: socket.socket | None = None) -> _Started:
    """Write train.py into run_dir and start it: in `standby` when it fits, else afresh. With a
    `gate` (stage_training), the run holds at prepare's training loader until told to go on."""
    run_dir.mkdir(parents=True, exist_ok=True)
    account = sandbox.run_account()
    if account is not None:
        sandbox.prepare_for_account(account, run_dir, sandbox_dir)
    (run_dir / TRAIN_FILENAME).write_text(source, encoding="utf-8")
    log_path = run_dir / LOG_FILENAME
    child_env = _child_environment(env, account, sandbox_dir)
    started_at = time.time()
    proc = None
    with open(log_path, "wb") as log_file:  # the child keeps its own copy of the fd
        if standby is not None:
            proc = _launch(standby, run_dir, log_file.fileno(), child_env, python, account, gate)
        if proc is None:
            if gate is not None:
                child_env[STAGE_FD_VARIABLE] = str(gate.fileno())
            proc = subprocess.Popen(
                [python, _script_path(account)],
                cwd=run_dir,
                env=child_env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                pass_fds=() if gate is None else (gate.fileno(),),
                start_new_session=True,
                # Set after the switch to the account: a change of uid clears it.
                preexec_fn=parent_death_signal(signal.SIGKILL),
                **_account_arguments(account),
            )
    return _Started(proc, log_path, started_at, standby is not None and proc is standby.proc)


# ---------------------------------------------------------------------------
# A run staged while the GPU still trains the one before it (issue 15, "staged start")

# prepare._StagingGate reads these (named here to keep torch out of the worker).
STAGE_FD_VARIABLE = "AUTORESEARCH_STAGE_FD"
STAGE_BATCHES_VARIABLE = "AUTORESEARCH_STAGE_BATCHES"


@dataclass
class StagedRun:
    """A run started ahead of its turn (stage_training), held by prepare's training loader
    before its batch number `batches`, until run_training(..., staged=) lets it go on."""

    run_id: str
    started: _Started
    gate: socket.socket  # the worker's end: a byte lets the run go on, closing it ends the run
    batches: int  # 1: its first forward and backward (the compile) ran before the hold; 0: none
    staged_monotonic: float
    ready: dict | None = None  # what the run said at the hold: its peak and held GPU memory (MB)
    ready_after_s: float | None = None  # seconds from staging to the hold

    def poll_ready(self) -> dict | None:
        """What the run said on reaching the hold, once it has; never blocks."""
        if self.ready is None:
            try:
                message = self.gate.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:  # the run died before its hold: run_training will say how
                return None
            if message:
                self.ready = json.loads(message)
                self.ready_after_s = time.monotonic() - self.staged_monotonic
        return self.ready

    def usable(self) -> bool:
        """It waits at its hold, or is still on its way there (a long compile). A train.py that
        takes no batch from prepare's training loader never holds: once it has ended or printed
        progress, what it did cannot be the run, which starts afresh instead."""
        return self.started.proc.poll() is None and not self.trains_unheld()

    def trains_unheld(self) -> bool:
        """It printed a progress line without having held."""
        return self.poll_ready() is None and last_progress(tail_log(self.started.log_path)) is not None

    def let_go(self) -> None:
        self.poll_ready()
        with contextlib.suppress(OSError):  # it died meanwhile: its exit is the run's end
            self.gate.send(b"1")
        self.gate.close()

    def discard(self) -> None:
        """End it: its whole process group, and the hold's channel."""
        self.gate.close()
        _stop_group(self.started.proc)

    def record(self) -> dict:
        """What the run's record keeps of its staging."""
        self.poll_ready()
        return {"held": self.ready is not None, "batches": self.batches, "standby": self.started.standby,
                "ready_after_s": None if self.ready_after_s is None else round(self.ready_after_s, 2),
                "waited_s": round(time.monotonic() - self.staged_monotonic, 2), **(self.ready or {})}


def stage_training(run_id: str, source: str, run_dir: Path, *, env: dict[str, str], batches: int,
                   python: str = sys.executable, sandbox_dir: Path = SANDBOX_ROOT,
                   standby: Standby | None = None) -> StagedRun:
    """Start a run that may not train yet: it does everything up to prepare's training loader
    handing out batch number `batches` (imports, data, model, and with 1 the first forward and
    backward: the compile), then holds until run_training(..., staged=) lets it go on."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with theirs:  # the run keeps its own copy
            started = _start(source, Path(run_dir), {**env, STAGE_BATCHES_VARIABLE: str(batches)}, python,
                             sandbox_dir, standby, gate=theirs)
    except BaseException:
        ours.close()
        raise
    return StagedRun(run_id, started, ours, batches, time.monotonic())


def start_standby(env: dict[str, str], *, python: str = sys.executable, sandbox_dir: Path = SANDBOX_ROOT) -> Standby:
    """Start the interpreter for a later run_training(..., standby=) whose `env` is this `env`
    apart from its AUTORESEARCH_* variables: the same account, process group and parent-death
    signal as a fresh train.py, and the environment it will have, which Python and the imported
    modules read at start (PYTHONPATH, thread counts, CUDA settings)."""
    account = sandbox.run_account()
    if account is not None:
        # As prepare_for_account does for a run: the standby may start before the first run.
        sandbox.interpreter_reachable(Path(python))
    return _spawn_standby(standing_environment(_child_environment(env, account, sandbox_dir)), python, account)


def start_evaluator_standby(visible_devices: str, *, python: str = sys.executable) -> Standby:
    """Start the interpreter for a later evaluator.score(..., standby=) on the GPUs `visible_devices`
    names: as the worker's own account (the evaluator is trusted code, and reads the validation
    split), with evaluator.standing_env."""
    return _spawn_standby(evaluator.standing_env(visible_devices), python, None)


def _spawn_standby(standing: dict[str, str], python: str, account: pwd.struct_passwd | None) -> Standby:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one message, whole
    try:
        with theirs:  # the standby keeps its own copy
            proc = subprocess.Popen(
                [python, "-m", "workers.standby", str(theirs.fileno())],
                # Where -m finds workers.standby: the run's PYTHONPATH need not name the project.
                cwd=PROJECT_ROOT,
                env=standing,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # The worker's own stderr (its log), for a failing import; replaced by the run's
                # at the hand-over, before any of its code runs.
                stderr=None,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGKILL),
                **_account_arguments(account),
            )
    except BaseException:
        ours.close()
        raise
    return Standby(proc, ours, env=standing, python=python, uid=_uid(account))


def _launch(standby: Standby, run_dir: Path, log_fd: int, child_env: dict[str, str], python: str,
            account: pwd.struct_passwd | None, gate: socket.socket | None) -> subprocess.Popen | None:
    # A sandboxed standby cannot open the run directory by path (the folder above is closed to
    # it), so it gets the directory itself, opened here.
    run_dir_fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return standby.launch(child_env, python=python, uid=_uid(account), cwd_fd=run_dir_fd, stdout_fd=log_fd,
                              stderr_fd=log_fd, script=_script_path(account),
                              files=() if gate is None else (gate.fileno(),),
                              fd_variable=None if gate is None else STAGE_FD_VARIABLE)
    finally:
        os.close(run_dir_fd)


def _child_environment(env: dict[str, str], account: pwd.struct_passwd | None, sandbox_dir: Path) -> dict[str, str]:
    return {**allowed_environment(dict(os.environ)), **sandbox.account_env(account, sandbox_dir),
            "PYTHONUNBUFFERED": "1", **env}  # unbuffered: live progress


def _script_path(account: pwd.struct_passwd | None) -> str:
    # Python opens its script by absolute path, which the sandbox user cannot walk (the folder
    # above the run directory is closed to it); /proc/self/cwd leads to its working directory
    # without walking the folders above it.
    return TRAIN_FILENAME if account is None else f"/proc/self/cwd/{TRAIN_FILENAME}"


def _account_arguments(account: pwd.struct_passwd | None) -> dict:
    if account is None:
        return {}
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _uid(account: pwd.struct_passwd | None) -> int | None:
    return None if account is None else account.pw_uid


def tail_log(path: Path, max_bytes: int = LOG_TAIL_CHARS) -> str:
    """The last `max_bytes` bytes of a log file as text; "" if the file does not exist.

    When the file is longer than that, the partial first line is dropped so the tail starts at
    a line boundary (unless that would drop everything).
    """
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read(max_bytes)
    except FileNotFoundError:
        return ""
    if start > 0:
        newline = data.find(b"\n")
        if 0 <= newline < len(data) - 1:
            data = data[newline + 1 :]
    return data.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Result


def _make_result(
    *,
    stop_reason: str | None,
    returncode: int | None,
    log_path: Path,
    timeout_s: float,
    progress: dict | None,
    started_at: float,
    ended_at: float,
    standby: bool,
) -> RunResult:
    log_tail = tail_log(log_path, LOG_TAIL_CHARS)
    summary_error = None
    try:
        summary = parse_summary(tail_log(log_path, SUMMARY_SCAN_BYTES))
    except ValueError as exc:  # a summary with nan/inf/garbage in it: the run diverged
        summary, summary_error = None, f"invalid summary: {exc}"

    if stop_reason == "timeout":
        status, error = "timeout", f"killed after exceeding the time limit of {timeout_s:g} s"
    elif stop_reason == "cancelled":
        status, error = "cancelled", "cancelled on request"
    elif returncode == 0 and summary is not None:
        status, error = "finished", None
    else:
        status = "failed"
        if summary_error is not None and returncode == 0:
            error = summary_error
        elif returncode == 0:
            error = "train.py exited 0 without a summary (no val_bpb after the last '---' line)"
        elif returncode is not None and returncode < 0:
            error = f"train.py was killed by {_signal_name(-returncode)}"
        else:
            error = f"train.py exited with code {returncode}"
        if returncode != 0 or summary_error is None:
            detail = _failure_detail(log_tail)
            if detail:
                error = f"{error}\n{detail}"

    return RunResult(
        status=status,
        returncode=returncode,
        summary=summary,
        log_path=log_path,
        log_tail=log_tail,
        error=error,
        started_at=started_at,
        ended_at=ended_at,
        duration_s=ended_at - started_at,
        progress=progress,
        standby=standby,
    )


def _failure_detail(log_tail: str) -> str:
    """The last Python traceback in the log tail, or else its last ERROR_LINES lines."""
    marker = "Traceback (most recent call last):"
    index = log_tail.rfind(marker)
    if index >= 0:
        return log_tail[index:].strip()
    lines = log_tail.strip().splitlines()
    return "\n".join(lines[-ERROR_LINES:])


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ---------------------------------------------------------------------------
# Reading the log while it grows


class _LogFollower:
    """Returns the complete lines appended to a file since the previous call."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.partial = b""  # an unfinished last line, kept until its end arrives

    def read_new(self) -> str:
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < self.offset:  # truncated under us; start over
                self.offset, self.partial = 0, b""
            if size - self.offset > PROGRESS_SCAN_BYTES:
                # A flood of output: only the newest progress line matters, so skip ahead.
                self.offset, self.partial = size - PROGRESS_SCAN_BYTES, b""
            f.seek(self.offset)
            data = f.read(size - self.offset)
        self.offset += len(data)
        data = self.partial + data
        # Lines end with \n, or \r for a redrawn terminal line; an unfinished one may still be
        # half-written, so it waits for the next call.
        end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
        self.partial = data[end:]
        return data[:end].decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# Process group handling


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, SIGKILL it after TERM_GRACE_S, wait until it is gone."""
    pgid = proc.pid  # start_new_session=True: the child leads a group with its own pid
    if _wait_group_gone(proc, 0):
        return
    _signal_group(proc, signal.SIGTERM)
    if _wait_group_gone(proc, TERM_GRACE_S):
        return
    _signal_group(proc, signal.SIGKILL)
    if not _wait_group_gone(proc, KILL_WAIT_S):
        log.error("process group %d still has live members %ss after SIGKILL", pgid, KILL_WAIT_S)


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signum)
    # Also the child itself, in case it left its group (train.py calling setsid/setpgid).
    proc.send_signal(signum)  # a no-op once the child has been reaped


def _wait_group_gone(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to timeout_s until the child is reaped and its group has vanished; True if so."""
    deadline = time.monotonic() + timeout_s
    while True:
        # Reaping the leader matters: an unreaped zombie keeps the group id in use.
        if proc.poll() is not None and not group_alive(proc.pid):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(GROUP_POLL_S)


@contextlib.contextmanager
def sigterm_raises_system_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit while a run is in progress, so `finally` kills the group.

    With the default disposition SIGTERM ends the process at once and no cleanup runs; train.py
    would die of PDEATHSIG but its own children would be orphaned. Only done in the main thread
    (Python's rule for signal handlers) and only when nobody installed a handler already (Celery
    has its own for the processes it manages).
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    received = False

    def handler(signum: int, frame: object) -> None:
        # A second SIGTERM must not interrupt the cleanup the first one started.
        nonlocal received
        received = True
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        # After a SIGTERM the process is on its way out and stays deaf to more of them: the
        # caller's own cleanup (handing the run back) must not be cut short by a second one.
        if not received:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
