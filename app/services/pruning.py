"""Early stopping: is a running run already clearly worse than the tag's best runs at the same progress?

Pure functions over progress curves as the runs table stores them: lists of points
{step, progress_pct, loss, tokens_per_sec}, progress_pct being the share of the time budget used
(0-100) and loss train.py's printed training loss (itself a bias-corrected moving average), which may
be None or NaN. No database, no I/O: the worker asks should_prune after each progress point it
records, and the lifecycle ends the run `pruned` when it answers with a Prune.

The comparison is made at equal progress, not equal step: the budget is wall-clock time, so a change
that makes steps slower must pay for it. Both sides are smoothed the same way (the mean loss over the
trailing `smooth_pct` of progress); the best's curves are interpolated at the progress points in that
window. The margin is relative (a share of the best's loss): loss levels differ by profile and data
(about 3 nats for the h100 profile, 5 to 9 for the tiny one on CPU), and a fixed share carries across
them where a fixed number of nats would not. The best's own run-to-run spread at that progress
(`spread_k` standard deviations of its curves) is added before the margin, so a run inside the best's
noise is never judged worse.

The rule used when a tag opts in is DEFAULT_RULE, chosen by bench/early_stopping.py over recorded
curves (docs/benchmarks.md, "Early stopping").
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PruneRule:
    margin: float            # relative: prune when the run's loss exceeds the best's by this share (0.03 = 3 %)
    min_progress_pct: float  # never judge before this share of the budget (0-100)
    smooth_pct: float = 5.0  # trailing window of progress (percentage points) averaged on both sides
    spread_k: float = 2.0    # standard deviations of the best's curves added to its mean before the margin

    def __post_init__(self):
        if not (self.margin >= 0 and 0 <= self.min_progress_pct < 100 and self.smooth_pct >= 0
                and self.spread_k >= 0):
            raise ValueError(f"not a prune rule: {self}")


@dataclass(frozen=True)
class Prune:
    reason: str
    progress_pct: float  # the run's progress when judged
    loss: float          # the run's smoothed training loss there
    best_loss: float     # the mean of the best's smoothed curves at the same progress
    threshold: float     # the loss above which the run was judged clearly worse


DEFAULT_RULE = PruneRule(margin=0.02, min_progress_pct=10.0, smooth_pct=5.0, spread_k=2.0)


def finite_points(curve: Sequence[dict]) -> list[tuple[float, float]]:
    """(progress_pct, loss) of the points that have both as finite numbers, in order of progress."""
    points = []
    for point in curve:
        progress, loss = point.get("progress_pct"), point.get("loss")
        if isinstance(progress, int | float) and isinstance(loss, int | float) \
                and math.isfinite(progress) and math.isfinite(loss):
            points.append((float(progress), float(loss)))
    points.sort(key=lambda p: p[0])
    return points


def loss_at(points: Sequence[tuple[float, float]], progress: float) -> float | None:
    """The loss of a curve at `progress`, linearly interpolated between its points; None outside them."""
    if not points or progress < points[0][0] or progress > points[-1][0]:
        return None
    right = bisect.bisect_left(points, progress, key=lambda point: point[0])
    p1, l1 = points[right]
    if p1 == progress or right == 0:
        return l1
    p0, l0 = points[right - 1]
    return l0 + (l1 - l0) * (progress - p0) / (p1 - p0)


def trailing_window(points: Sequence[tuple[float, float]], width: float) -> list[tuple[float, float]]:
    """The points within `width` percentage points of progress before the last one, the last one included."""
    end = points[-1][0]
    return [(p, loss) for p, loss in points if p >= end - width]


def smoothed_reference(points: Sequence[tuple[float, float]], at: Sequence[float]) -> float | None:
    """Mean of a best curve interpolated at the progress points `at`; None where it does not reach them all."""
    values = [loss_at(points, p) for p in at]
    return None if any(v is None for v in values) else statistics.fmean(values)


def should_prune(curve: Sequence[dict], best_curves: Sequence[Sequence[dict]], rule: PruneRule) -> Prune | None:
    """A Prune when the run's curve, judged at its latest finite point, is clearly worse than the best's
    curves at the same progress; None when it is not, or when there is not enough to judge by (before
    rule.min_progress_pct, at the end of the budget, no finite loss, no best curve reaching that far)."""
    points = finite_points(curve)
    if not points:
        return None
    progress = points[-1][0]
    if progress < rule.min_progress_pct or progress >= 100:
        return None   # too early to tell; at the end of the budget a prune saves nothing
    window = trailing_window(points, rule.smooth_pct)
    loss = statistics.fmean(loss for _, loss in window)
    references = [smoothed_reference(finite_points(best), [p for p, _ in window]) for best in best_curves]
    references = [r for r in references if r is not None]
    if not references:
        return None
    best_loss = statistics.fmean(references)
    spread = statistics.stdev(references) if len(references) > 1 else 0.0
    threshold = (best_loss + rule.spread_k * spread) * (1 + rule.margin)
    if loss <= threshold:
        return None
    reason = (f"training loss {loss:.4f} at {progress:.1f}% of the budget is above {threshold:.4f}: the best's "
              f"{len(references)} run(s) average {best_loss:.4f} there (stdev {spread:.4f}), "
              f"+{rule.spread_k:g} stdev and {100 * rule.margin:g} %")
    return Prune(reason=reason, progress_pct=progress, loss=loss, best_loss=best_loss, threshold=threshold)
