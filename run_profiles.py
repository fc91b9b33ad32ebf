"""The profiles a run can be scored under: fixed constants, one set per profile name.

A tag picks a profile and every run in it uses the same constants. prepare.py reads the run's
profile from the environment and re-exports this table; it lives in a module of its own, which
imports nothing, so that the API and Celery's parent process can read the names without
importing torch (CUDA does not survive the fork of a pool child).
"""

# STARTUP_ALLOWANCE: seconds a run may take beyond TIME_BUDGET (imports, data loading, compile,
# evaluation, export) before the worker kills it as `timeout`, on its own clock; KILL_TIMEOUT
# caps the sum (app/config.py, Settings.run_deadline_s). Generous against a normal run's overhead,
# so that only a run that overstays its budget is cut.
PROFILES = {
    # Karpathy's autoresearch numbers, for one H100-class GPU.
    "h100": dict(MAX_SEQ_LEN=2048, TIME_BUDGET=300, EVAL_TOKENS=40 * 524288, DOC_BUFFER=1000, STARTUP_ALLOWANCE=240),
    # The h100 model and data with a 30 s budget: smoke and throughput runs of the whole stack.
    "h100-short": dict(MAX_SEQ_LEN=2048, TIME_BUDGET=30, EVAL_TOKENS=10 * 524288, DOC_BUFFER=1000,
                       STARTUP_ALLOWANCE=180),
    # For CPUs and tests: a run with startup and eval takes well under half a minute.
    "tiny": dict(MAX_SEQ_LEN=256, TIME_BUDGET=6, EVAL_TOKENS=64 * 256, DOC_BUFFER=128, STARTUP_ALLOWANCE=40),
}
DEFAULT_PROFILE = "h100"
