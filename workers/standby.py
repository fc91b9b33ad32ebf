"""The standby interpreter: a Python process that has done, before its run is known, what every
train.py spends its first seconds on (issue 15, "staged start").

On a GPU host about 10 s pass between starting `python train.py` and its first line: the
interpreter starts and imports torch, Triton, numpy and pyarrow. A worker starts the interpreter
of its next run while it is between runs (workers/training.py), so that this overlaps recording
and scoring the previous run; the runner hands it the run instead of starting a fresh process
(workers/runner.py: start_standby, run_training(..., standby=...)).

Before the hand-over it imports PRELOAD and nothing of the project: prepare.py reads the run's
profile and cache from the environment at import. It runs nothing of train.py before it is handed
a run, and runs one run only: the agent's code may leave anything behind in it.

The hand-over: over a socketpair inherited at spawn, the worker sends the run directory as an
open directory fd and the log file's fd (a sandboxed standby cannot reach the run directory by
path: workers/sandbox.py), with the run's whole environment and script path as JSON. The
standby changes into that directory, makes the log its stdout and stderr, takes that
environment, and runs the script as __main__ with the argv, sys.path[0], __file__ and exit
status that `python <script>` would give it. What train.py could still tell apart: the modules
already in sys.modules (PRELOAD and theirs, this module), sys.orig_argv, and __main__'s
__loader__ (None).

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
MAX_MESSAGE_BYTES = 1 << 20  # the hand-over message: the run's environment and script path
HANDED_FDS = 2  # the run directory and the log file


def standing_environment(env: dict[str, str]) -> dict[str, str]:
    """`env` without the run's own variables: what a standby for that run is started with."""
    return {name: value for name, value in env.items() if not name.startswith(RUN_VARIABLES_PREFIX)}


# ---------------------------------------------------------------------------
# The worker's side


@dataclass
class Standby:
    """A started standby interpreter (workers.runner.start_standby makes one)."""

    proc: subprocess.Popen  # leads a process group of its own
    channel: socket.socket  # the worker's end of the socketpair
    env: dict[str, str]  # its environment: standing_environment() of the runs it can take
    python: str
    uid: int | None  # the account it runs as; None: the worker's own
    launched: bool = False

    def launch(self, run_dir_fd: int, log_fd: int, env: dict[str, str], *, script: str, python: str,
               uid: int | None) -> subprocess.Popen | None:
        """Hand it the run; its process is then the run's process. None, with the reason logged,
        when it cannot take this run: it is discarded then, and the caller starts a fresh one."""
        why = self._unfit(env, python, uid)
        if why is None:
            message = json.dumps({"env": env, "script": script}).encode()
            try:
                socket.send_fds(self.channel, [message], [run_dir_fd, log_fd])
            except OSError as exc:  # it died since we looked
                why = f"the hand-over failed: {exc}"
        if why is not None:
            log.warning("standby interpreter %d not used, starting train.py afresh: %s", self.proc.pid, why)
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
    message, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE_BYTES, HANDED_FDS)
    channel.close()
    if not message:  # the worker closed its end: discarded
        return
    run = json.loads(message)
    run_dir_fd, log_fd = fds
    os.fchdir(run_dir_fd)
    os.close(run_dir_fd)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    os.environ.clear()
    os.environ.update(run["env"])
    script = run["script"]
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
