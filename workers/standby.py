"""The standby interpreter: a Python process that has done, before its run is known, what every
train.py spends its first seconds on (issue 15, "staged start"), and what the trusted evaluator
spends its first seconds on (issue 14).

On a GPU host about 10 s pass between starting `python train.py` and its first line: the
interpreter starts and imports torch, Triton, numpy and pyarrow. A worker starts the interpreter
of its next run while it is between runs (workers/training.py), so that this overlaps recording
and scoring the previous run; the runner hands it the run instead of starting a fresh process
(workers/runner.py: start_standby, run_training(..., standby=...)).

Before the hand-over it imports PRELOAD and nothing of the project: prepare.py reads the run's
profile and cache from the environment at import. It runs nothing of train.py before it is handed
a run, and runs one run only: the agent's code may leave anything behind in it.

The hand-over: over a socketpair inherited at spawn, the worker sends a working directory as an
open directory fd, the fds of its stdout and stderr, and any files it is to read (a sandboxed
standby cannot reach the run directory by path: workers/sandbox.py), with the whole environment
and what to run as JSON. The standby changes into that directory, takes those fds as stdout and
stderr and that environment, and runs either
- a script (train.py: the run directory, its log as stdout and stderr) as __main__, with the
  argv, sys.path[0], __file__ and exit status that `python <script>` would give it. What train.py
  could still tell apart: the modules already in sys.modules (PRELOAD and theirs, this module),
  sys.orig_argv, and __main__'s __loader__ (None); or
- a module, as `python -m <module> /dev/fd/N...` would, one argument for each file handed over
  (workers.evaluator, handed the exported model: workers/evaluator.py).

This file is also the standby's main module (`python -m workers.standby FD`): at module level it
imports the standard library only.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import json
import logging
import os
import runpy
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

# Imported before the hand-over, each only where installed (triton is not on a CPU host): what
# train.py, prepare.py and gpu_kernels.py import that takes time and reads no run's setting.
PRELOAD = ("torch", "numpy", "pyarrow", "pyarrow.parquet", "tiktoken", "triton")
# A run's own variables (profile, seed, cache view), given at the hand-over; the standby starts
# with the rest of the run's environment, which the interpreter and PRELOAD may read at start.
RUN_VARIABLES_PREFIX = "AUTORESEARCH_"
MAX_MESSAGE_BYTES = 1 << 20  # the hand-over message: the run's environment and what to run
MAX_HANDED_FDS = 8  # the working directory, stdout, stderr, then the files a module reads


def standing_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` without the run's own variables: what a standby for that run is started with."""
    return {name: value for name, value in env.items() if not name.startswith(RUN_VARIABLES_PREFIX)}


# ---------------------------------------------------------------------------
# The worker's side


@dataclass
class Standby:
    """A started standby interpreter (workers.runner.start_standby or start_evaluator_standby makes one)."""

    proc: subprocess.Popen  # leads a process group of its own
    channel: socket.socket  # the worker's end of the socketpair
    env: dict[str, str]  # its environment: standing_environment() of the runs it can take
    python: str
    uid: int | None  # the account it runs as; None: the worker's own
    launched: bool = False

    def launch(self, env: dict[str, str], *, python: str, uid: int | None, cwd_fd: int, stdout_fd: int,
               stderr_fd: int, script: str | None = None, module: str | None = None,
               files: tuple[int, ...] = (), fd_variable: str | None = None) -> subprocess.Popen | None:
        """Hand it the run of `script`, or of `module` with `files` as its arguments; its process
        is then the run's process. With `fd_variable`, the run finds the first of `files` by the
        number that variable holds (a script's gate: workers/runner.py, stage_training). None,
        with the reason logged, when it cannot take this run: it is discarded then, and the
        caller starts a fresh one."""
        why = self._unfit(env, python, uid)
        if why is None:
            message = json.dumps({"env": env, "script": script, "module": module,
                                  "fd_variable": fd_variable}).encode()
            try:
                socket.send_fds(self.channel, [message], [cwd_fd, stdout_fd, stderr_fd, *files])
            except OSError as exc:  # it died since we looked
                why = f"the hand-over failed: {exc}"
        if why is not None:
            log.warning("standby interpreter %d not used, starting %s afresh: %s", self.proc.pid, script or module,
                        why)
            self.discard()
            return None
        self.launched = True
        self.channel.close()
        return self.proc

    def _unfit(self, env: dict[str, str], python: str, uid: int | None) -> str | None:
        if self.launched:
            raise RuntimeError("a standby interpreter runs one run only")
        if self.proc.poll() is not None:
            return f"it exited with code {self.proc.returncode}"
        if python != self.python:
            return f"it runs {self.python}, the run needs {python}"
        if uid != self.uid:
            return f"it runs as uid {self.uid}, the run as uid {uid}"
        standing = standing_environment(env)
        if standing != self.env:
            differing = sorted({n for n in standing.keys() | self.env.keys() if standing.get(n) != self.env.get(n)})
            return f"its environment differs from the run's in {', '.join(differing)}"
        return None

    def discard(self) -> None:
        """Kill it and reap it, unless it was handed a run: that process is the runner's to stop."""
        self.channel.close()
        if self.launched or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


# ---------------------------------------------------------------------------
# The standby's side


def serve(channel_fd: int) -> None:
    """Import PRELOAD, wait for the run, run it; returns only if the worker never hands one over."""
    channel = socket.socket(fileno=channel_fd)
    for name in PRELOAD:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name)
    message, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE_BYTES, MAX_HANDED_FDS)
    channel.close()
    if not message:  # the worker closed its end: discarded
        return
    run = json.loads(message)
    cwd_fd, stdout_fd, stderr_fd, *files = fds
    os.fchdir(cwd_fd)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    for fd in (cwd_fd, stdout_fd, stderr_fd):
        os.close(fd)
    os.environ.clear()
    os.environ.update(run["env"])
    if run["fd_variable"] is not None:
        os.environ[run["fd_variable"]] = str(files[0])
    if run["module"] is not None:
        # As `python -m` sets them: sys.path[0] the working directory, argv[0] the module's file
        # (run_module puts it there). An uncaught exception leaves through the interpreter, which
        # prints it and exits 1, as python -m does.
        sys.path[0] = os.getcwd()
        sys.argv = [run["module"], *(f"/dev/fd/{fd}" for fd in files)]
        runpy.run_module(run["module"], run_name="__main__", alter_sys=True)
    else:
        run_script(run["script"])


def run_script(script: str) -> None:
    """Run `script` as `python <script>` would, in this process."""
    sys.argv = [script]
    # As `python <script>` sets them: __file__ (and the file name in tracebacks) is the script's
    # absolute path, sys.path[0] its folder with links resolved where the user may resolve them
    # (the sandbox user may not resolve /proc/self/cwd: its folders above are closed to it).
    path = os.path.abspath(script)
    try:
        sys.path[0] = os.path.dirname(os.path.realpath(path, strict=True))
    except OSError:
        sys.path[0] = os.path.dirname(path)
    try:
        # __builtins__ as in a __main__ module: the module, where exec would put its dict.
        runpy.run_path(path, init_globals={"__builtins__": builtins}, run_name="__main__")
    except Exception as exc:
        # What python prints for an uncaught exception: the frames from the script's on (none for
        # a SyntaxError, which python prints without a traceback), not this module's and runpy's.
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        sys.exit(1)


if __name__ == "__main__":
    serve(int(sys.argv[1]))
