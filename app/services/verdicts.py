"""Keep, discard or run again: the verdict on a candidate from its runs, the best's runs and the noise floor.

Pure functions over lists of `val_bpb` values (lower is better); no database, no I/O. The policies and
their thresholds were chosen with `bench/verdicts.py` (docs/benchmarks.md, "Verdicts").

The candidate's advantage is measured as
    z = (mean(best) - mean(candidate)) / (sigma * sqrt(1/n + 1/m))
with n and m the two run counts and sigma the pooled run-to-run stdev. A positive z means the
candidate scored better.

- `single` is the seed's rule: one run, keep iff its score is strictly below the best's; the first
  result of a tag is always kept; it never asks for another run.
- The other policies run a candidate again while it is promising but not yet clear, up to the rule's
  `max_runs`: after each run, z <= `drop_z` discards it, z >= `early_keep_z` (from the second run on)
  keeps it, and at `max_runs` it is kept iff z > `final_z`. The first experiment of a tag (no best yet)
  is run `baseline_runs` times and then kept, so the noise floor is measured from the start.
- Without a usable sigma (None or 0: no experiment has two runs yet, e.g. manual mode without
  replicates) z is unknown and every threshold becomes the seed's sign test: a run that is not
  strictly better than the best is discarded, a better one is confirmed up to `max_runs` and kept iff
  the mean is still strictly better; there is no early keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

KEEP = "keep"
DISCARD = "discard"
CONFIRM = "confirm"
SINGLE = "single"


@dataclass(frozen=True)
class Rule:
    """When a confirming policy stops running a candidate (thresholds on z, see the module doc)."""

    drop_z: float
    final_z: float
    max_runs: int
    early_keep_z: float | None = None


RULES = {
    # One confirmation run for a first result within a quarter sigma of the best; keep iff the mean of
    # the two is strictly better.
    "confirm": Rule(drop_z=-0.25, final_z=0.0, max_runs=2),
    # The same, but keep only when the two runs together are half a z-unit better.
    "confirm-z": Rule(drop_z=-0.25, final_z=0.5, max_runs=2),
    # A sequential test: run again while 0 < z < 2, at most 3 runs, then keep iff z > 0. The benchmark's
    # choice (docs/benchmarks.md, "Verdicts"): the most true progress per GPU-hour of the policies that
    # halve the optimism of the reported best.
    "sequential": Rule(drop_z=0.0, final_z=0.0, max_runs=3, early_keep_z=2.0),
}
POLICIES = (SINGLE, *RULES)
DEFAULT_POLICY = "sequential"


@dataclass(frozen=True)
class Verdict:
    action: str  # KEEP, DISCARD or CONFIRM (the candidate needs another run)
    estimate: float  # mean val_bpb of the candidate's runs
    best: float | None  # mean val_bpb of the best's runs; None while the tag has no best
    delta: float  # best - estimate (positive: the candidate is better); 0.0 without a best
    sigma: float | None  # the run-to-run stdev used; None when unknown
    z: float | None  # delta / (sigma * sqrt(1/n + 1/m)); None without a usable sigma or a best
    runs: int  # the candidate's finished runs
    best_runs: int  # the best's runs; 0 without a best


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def decide(
    candidate: Sequence[float],
    best: Sequence[float] | None,
    *,
    sigma: float | None,
    policy: str,
    max_runs: int | None = None,
    baseline_runs: int = 1,
) -> Verdict:
    """The verdict on a candidate with the finished runs `candidate`, against the tag's best.

    `best` holds the best's runs (None or empty: the tag has no best yet). `max_runs` overrides the
    policy's own limit (ignored by `single`); `baseline_runs` is how often the first experiment of a
    tag is run before it is kept (BASELINE_RUNS; ignored by `single`, which runs everything once).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown verdict policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not candidate:
        raise ValueError("a verdict needs at least one finished run of the candidate")
    if sigma is not None and sigma < 0:
        raise ValueError(f"sigma must be None or at least 0, got {sigma}")
    if max_runs is not None and max_runs < 1:
        raise ValueError(f"max_runs must be at least 1, got {max_runs}")

    runs = len(candidate)
    estimate = _mean(candidate)
    if not best:
        # The first result of a tag is always kept; the confirming policies replicate it first.
        enough = policy == SINGLE or runs >= baseline_runs
        return Verdict(KEEP if enough else CONFIRM, estimate, None, 0.0, sigma, None, runs, 0)

    best_score = _mean(best)
    delta = best_score - estimate
    z = delta / (sigma * math.sqrt(1 / runs + 1 / len(best))) if sigma else None

    def verdict(action: str) -> Verdict:
        return Verdict(action, estimate, best_score, delta, sigma, z, runs, len(best))

    if policy == SINGLE:
        return verdict(KEEP if estimate < best_score else DISCARD)

    rule = RULES[policy]
    limit = rule.max_runs if max_runs is None else max_runs
    if z is None:
        # No noise floor yet: the seed's strict comparison, with confirmation runs of a better mean.
        if delta <= 0:
            return verdict(DISCARD)
        return verdict(KEEP if runs >= limit else CONFIRM)
    if runs >= limit:
        return verdict(KEEP if z > rule.final_z else DISCARD)
    if z <= rule.drop_z:
        return verdict(DISCARD)
    if rule.early_keep_z is not None and runs >= 2 and z >= rule.early_keep_z:
        return verdict(KEEP)
    return verdict(CONFIRM)


def pooled_sigma(groups: Iterable[Sequence[float]]) -> tuple[float | None, int]:
    """The pooled run-to-run stdev over the groups (one per experiment) with two or more runs.

    Each group contributes its squared deviations from its own mean and n - 1 degrees of freedom,
    so experiments with different true scores can be pooled. Returns (sigma, runs behind it);
    (None, 0) when no group has two runs.
    """
    squares = 0.0
    freedom = 0
    runs = 0
    for group in groups:
        if len(group) < 2:
            continue
        mean = _mean(group)
        squares += math.fsum((value - mean) ** 2 for value in group)
        freedom += len(group) - 1
        runs += len(group)
    if not freedom:
        return None, 0
    return math.sqrt(squares / freedom), runs
