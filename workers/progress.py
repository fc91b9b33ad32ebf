"""Parse what train.py prints: progress lines while it runs, the summary block at the end.

Progress line (one per logging step; fields may be missing or extra, order does not matter):

    step 42 | progress 14.0% | loss 4.123456 | lrm 1.00 | dt 312ms | tok/s 1680000 | mfu 40.5% | remaining 258s

Summary block (the last `---` line of the log, then `key: value` lines):

    ---
    profile:          tiny
    val_bpb:          0.997900
    training_seconds: 300.1
    ...

Plain functions, no state: the runner feeds them text it read from the log file.
"""

from __future__ import annotations

import math
import re

# ---------------------------------------------------------------------------
# Progress lines

# Keys of the dict parse_progress returns. Missing fields come back as None, so callers
# always see the same shape.
PROGRESS_KEYS = ("step", "progress_pct", "loss", "tokens_per_sec", "mfu_percent", "remaining_s", "step_ms")

# Field name as printed -> (key in the result, unit suffix to strip, type).
# Unknown fields (lrm, dt, anything an agent adds) are ignored.
_PROGRESS_FIELDS = {
    "step": ("step", "", int),
    "progress": ("progress_pct", "%", float),
    "loss": ("loss", "", float),
    "tok/s": ("tokens_per_sec", "", float),
    "mfu": ("mfu_percent", "%", float),
    "remaining": ("remaining_s", "s", float),
    # The step's wall time; step 0's includes torch.compile, so it is the run's compile time.
    "dt": ("step_ms", "ms", float),
}

# Lines are split on \r too: train scripts often redraw one terminal line with "\r".
_LINE_SPLIT = re.compile(r"[\r\n]+")


def parse_progress(line: str) -> dict | None:
    """One progress line -> {step, progress_pct, loss, tokens_per_sec, mfu_percent, remaining_s, step_ms}.

    Returns None when the line is not a progress line (it must start with "step <int>").
    Optional fields that are missing or unreadable are None; loss may be nan (a diverging run
    still reports progress, and the summary check is where nan is rejected).
    """
    parts = [p.strip() for p in line.strip().split("|")]
    result: dict = dict.fromkeys(PROGRESS_KEYS)
    for index, part in enumerate(parts):
        name, _, value = part.partition(" ")
        name = name.rstrip(":")  # tolerate "loss: 4.1" as well as "loss 4.1"
        field = _PROGRESS_FIELDS.get(name)
        if field is None:
            if index == 0:
                return None  # not a progress line at all
            continue
        key, suffix, cast = field
        value = value.strip()
        if suffix and value.endswith(suffix):
            value = value[: -len(suffix)]
        try:
            result[key] = cast(value)
        except ValueError:
            if key == "step":
                return None  # "step" without a number: some other text
            result[key] = None
        if index == 0 and key != "step":
            return None  # a progress line starts with its step
    if result["step"] is None:
        return None
    return result


def last_progress(text: str) -> dict | None:
    """The last progress line in `text` (a whole log or a chunk of one), parsed; None if none."""
    for line in reversed(_LINE_SPLIT.split(text)):
        parsed = parse_progress(line)
        if parsed is not None:
            return parsed
    return None


HELD_LINE = re.compile(r"^staged: held ([\d.]+)s for the GPU before batch (\d+)$", re.MULTILINE)


def step0_seconds(text: str) -> float | None:
    """The wall time of step 0, whose progress line comes first: torch.compile traces and builds
    its kernels during it, so it is the run's compile time (short with a warm cache). A staged
    run's wait for the GPU is not, where it fell inside step 0: held before a later batch than
    the first (prepare's staging gate says how long, and before which batch)."""
    held = HELD_LINE.search(text)
    waited = float(held.group(1)) if held and int(held.group(2)) > 0 else 0.0
    for line in _LINE_SPLIT.split(text):
        parsed = parse_progress(line)
        if parsed is not None:
            if parsed["step"] != 0 or parsed["step_ms"] is None:
                return None
            return max(0.0, parsed["step_ms"] / 1000 - waited)
    return None


# ---------------------------------------------------------------------------
# Summary block

SUMMARY_SEPARATOR = "---"

# Every key train.py prints in its summary, with the type it is parsed to.
SUMMARY_KEYS: dict[str, type] = {
    "profile": str,
    "val_bpb": float,
    "training_seconds": float,
    "total_seconds": float,
    "peak_vram_mb": float,
    "mfu_percent": float,
    "total_tokens_M": float,
    "num_steps": int,
    "num_params_M": float,
    "depth": int,
}

# A block naming one of these is a summary. A worker's train.py prints no val_bpb of its own
# (it has no validation split; the worker scores its exported model), so the profile counts too.
SUMMARY_MARKERS = ("val_bpb", "profile")

_SUMMARY_LINE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*?)\s*$")


def parse_summary(text: str) -> dict | None:
    """The summary block after the last `---` line of a whole log, as a dict.

    Returns None when there is no `---` line or neither val_bpb nor profile after the last one
    (the run crashed before reporting). Only SUMMARY_KEYS are kept; unknown keys and other lines are ignored.

    Raises ValueError when a known numeric key is present but is not a finite number (nan, inf,
    or garbage). A nan val_bpb means the run diverged; raising, rather than returning None, lets
    the caller tell "diverged" from "never got that far" and keeps NaN out of the database.
    """
    lines = _LINE_SPLIT.split(text)
    start = None
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].strip() == SUMMARY_SEPARATOR:
            start = index + 1
            break
    if start is None:
        return None

    summary: dict = {}
    for line in lines[start:]:
        match = _SUMMARY_LINE.match(line)
        if match is None:
            continue
        key, raw = match.groups()
        cast = SUMMARY_KEYS.get(key)
        if cast is None:
            continue
        summary[key] = _parse_summary_value(key, raw, cast)

    if not any(key in summary for key in SUMMARY_MARKERS):
        return None
    return summary


def _parse_summary_value(key: str, raw: str, cast: type):
    if cast is str:
        return raw
    try:
        # int keys may be printed as "953" or "953.0"; go through float so both read.
        number = float(raw)
    except ValueError:
        raise ValueError(f"summary {key} is not a number: {raw!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"summary {key} is not finite: {raw!r}")
    if cast is int:
        if not number.is_integer():
            raise ValueError(f"summary {key} is not an integer: {raw!r}")
        return int(number)
    return number
