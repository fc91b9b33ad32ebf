"""Parsing of train.py's progress lines and summary block."""

from __future__ import annotations

import math

import pytest

from workers.progress import PROGRESS_KEYS, SUMMARY_KEYS, last_progress, parse_progress, parse_summary

LINE = "step 42 | progress 14.0% | loss 4.123456 | lrm 1.00 | dt 312ms | tok/s 1680000 | mfu 40.5% | remaining 258s"

SUMMARY = """\
---
profile:          h100
val_bpb:          0.997900
training_seconds: 300.1
total_seconds:    325.9
peak_vram_mb:     45060.2
mfu_percent:      39.80
total_tokens_M:   499.6
num_steps:        953
num_params_M:     50.3
depth:            8
"""


def test_parse_progress_full_line():
    assert parse_progress(LINE) == {
        "step": 42,
        "progress_pct": 14.0,
        "loss": 4.123456,
        "tokens_per_sec": 1680000.0,
        "mfu_percent": 40.5,
        "remaining_s": 258.0,
        "step_ms": 312.0,
    }


def test_parse_progress_missing_extra_and_reordered_fields():
    parsed = parse_progress("step 00007 | grad_norm 0.5 | loss 3.5 | remaining 12.5s\n")
    assert parsed == {
        "step": 7,
        "progress_pct": None,
        "loss": 3.5,
        "tokens_per_sec": None,
        "mfu_percent": None,
        "remaining_s": 12.5,
        "step_ms": None,
    }
    assert set(parsed) == set(PROGRESS_KEYS)


def test_parse_progress_nan_loss():
    parsed = parse_progress("step 3 | progress 1.0% | loss nan | mfu 0.0%")
    assert parsed["step"] == 3
    assert math.isnan(parsed["loss"])


def test_parse_progress_unreadable_optional_field_is_none():
    assert parse_progress("step 3 | loss ??? | mfu 2%")["loss"] is None


@pytest.mark.parametrize(
    "line",
    [
        "",
        "---",
        "val_bpb: 0.99",
        "stepping into the loop",
        "step | loss 1.0",
        "step x | loss 1.0",
        "loss 1.0 | step 3",
        "Traceback (most recent call last):",
    ],
)
def test_parse_progress_rejects_other_lines(line):
    assert parse_progress(line) is None


def test_last_progress_handles_carriage_returns_and_noise():
    text = f"warming up\nstep 1 | loss 5.0\rstep 2 | loss 4.0\r{LINE}\nsome warning\n" + SUMMARY
    assert last_progress(text)["step"] == 42
    assert last_progress("no progress here\n") is None


def test_parse_summary_types():
    summary = parse_summary("step 1 | loss 2.0\n" + SUMMARY)
    assert summary == {
        "profile": "h100",
        "val_bpb": 0.9979,
        "training_seconds": 300.1,
        "total_seconds": 325.9,
        "peak_vram_mb": 45060.2,
        "mfu_percent": 39.8,
        "total_tokens_M": 499.6,
        "num_steps": 953,
        "num_params_M": 50.3,
        "depth": 8,
    }
    assert set(summary) == set(SUMMARY_KEYS)
    assert isinstance(summary["num_steps"], int) and isinstance(summary["depth"], int)


def test_parse_summary_takes_the_last_block_and_ignores_unknown_keys():
    text = "---\nval_bpb: 2.0\n" + "---\nval_bpb: 1.5\nnew_metric: 7\nnum_steps: 10.0\n"
    assert parse_summary(text) == {"val_bpb": 1.5, "num_steps": 10}


def test_parse_summary_without_val_bpb_or_profile_is_none():
    assert parse_summary("no summary at all") is None
    assert parse_summary("---\nnum_steps: 3\n") is None
    # A val_bpb before the last separator does not count.
    assert parse_summary("---\nval_bpb: 1.0\n---\nnum_steps: 3\n") is None


def test_parse_summary_of_a_worker_run_names_the_profile_without_val_bpb():
    # A worker's train.py has no validation split: the worker scores its exported model.
    assert parse_summary("---\nprofile: tiny\nnum_steps: 3\n") == {"profile": "tiny", "num_steps": 3}


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "abc"])
def test_parse_summary_rejects_non_finite_val_bpb(value):
    with pytest.raises(ValueError, match="val_bpb"):
        parse_summary(f"---\nval_bpb: {value}\n")


def test_parse_summary_rejects_bad_other_numbers():
    with pytest.raises(ValueError, match="mfu_percent"):
        parse_summary("---\nval_bpb: 1.0\nmfu_percent: inf\n")
    with pytest.raises(ValueError, match="num_steps"):
        parse_summary("---\nval_bpb: 1.0\nnum_steps: 2.5\n")


def test_step0_seconds_is_the_first_progress_line_when_it_is_step_0():
    from workers.progress import step0_seconds

    log = "Profile: tiny\nstep 0 | progress 0.0% | loss 9.0 | dt 45700ms | tok/s 11\n" + LINE + "\n"
    assert step0_seconds(log) == 45.7
    assert step0_seconds(LINE + "\n") is None  # the log starts later: no step 0 to read
    assert step0_seconds("no progress at all\n") is None


def test_step0_seconds_of_a_staged_run_leave_out_its_wait_for_the_gpu():
    from workers.progress import step0_seconds

    step0 = "step 0 | progress 0.0% | loss 9.0 | dt 45700ms | tok/s 11\n"
    assert step0_seconds("staged: held 40.250s for the GPU before batch 1\n" + step0) == pytest.approx(5.45)
    # Held before the first batch: before train.py's step 0 began.
    assert step0_seconds("staged: held 40.250s for the GPU before batch 0\n" + step0) == 45.7
