"""should_prune: the early-stopping decision over progress curves as the runs table stores them."""

import math

import pytest

from app.services.pruning import DEFAULT_RULE, Prune, PruneRule, should_prune

RULE = PruneRule(margin=0.03, min_progress_pct=30.0, smooth_pct=5.0, spread_k=2.0)


def loss_curve(offset=0.0, scale=1.0, until=100.0, every=2.0):
    """A decaying training-loss curve (about 9 nats at the start, 3.5 at the end), one point every `every` %."""
    points, progress, step = [], 0.0, 0
    while progress <= until + 1e-9:
        loss = scale * (3.5 + 5.5 * math.exp(-progress / 15.0)) + offset
        points.append({"step": step, "progress_pct": round(progress, 1), "loss": loss, "tokens_per_sec": 1000.0})
        progress += every
        step += 1
    return points


BEST = [loss_curve(offset=-0.02), loss_curve(), loss_curve(offset=0.02)]


def test_a_run_clearly_worse_after_min_progress_is_pruned():
    prune = should_prune(loss_curve(scale=1.2, until=40.0), BEST, RULE)
    assert isinstance(prune, Prune)
    assert prune.progress_pct == 40.0
    assert prune.loss > prune.threshold > prune.best_loss
    assert prune.best_loss == pytest.approx(3.5 + 5.5 * math.exp(-38.0 / 15.0), rel=0.02)   # the window's mean
    assert "40.0%" in prune.reason


def test_a_run_as_good_as_the_best_is_not_pruned():
    assert should_prune(loss_curve(offset=0.01, until=60.0), BEST, RULE) is None


def test_a_run_within_the_best_spread_is_not_pruned_but_would_be_without_it():
    spread_best = [loss_curve(offset=-0.3), loss_curve(), loss_curve(offset=0.3)]   # stdev 0.3 nats
    run = loss_curve(offset=0.4, until=60.0)   # about 10 % above the best's mean at 60 %
    assert should_prune(run, spread_best, PruneRule(margin=0.03, min_progress_pct=30.0, spread_k=2.0)) is None
    assert should_prune(run, spread_best, PruneRule(margin=0.03, min_progress_pct=30.0, spread_k=0.0)) is not None


def test_never_judged_before_min_progress():
    worse = loss_curve(scale=2.0)
    before = [point for point in worse if point["progress_pct"] < RULE.min_progress_pct]
    assert before and should_prune(before, BEST, RULE) is None
    at = [point for point in worse if point["progress_pct"] <= RULE.min_progress_pct]
    assert should_prune(at, BEST, RULE) is not None


def test_the_end_of_the_budget_is_never_pruned():
    assert should_prune(loss_curve(scale=2.0), BEST, RULE) is None   # its last point is at 100 %


def test_one_noisy_point_does_not_prune_a_good_run():
    run = loss_curve(until=50.0)
    run[-1] = {**run[-1], "loss": run[-1]["loss"] * 1.10}   # 10 % spike, averaged with the window's other points
    assert should_prune(run, BEST, PruneRule(margin=0.05, min_progress_pct=30.0, smooth_pct=10.0)) is None
    assert should_prune(run, BEST, PruneRule(margin=0.05, min_progress_pct=30.0, smooth_pct=0.0)) is not None


def test_nan_and_missing_losses_are_skipped():
    run = loss_curve(scale=1.2, until=44.0)
    run.append({"step": 99, "progress_pct": 46.0, "loss": float("nan"), "tokens_per_sec": 1000.0})
    run.append({"step": 100, "progress_pct": 48.0, "loss": None, "tokens_per_sec": None})
    holey_best = [[{**p, "loss": float("nan")} if i % 3 == 0 else p for i, p in enumerate(curve)] for curve in BEST]
    prune = should_prune(run, holey_best, RULE)
    assert prune is not None and prune.progress_pct == 44.0   # judged at the last finite point
    assert math.isfinite(prune.best_loss) and math.isfinite(prune.threshold)

    all_nan = [{**p, "loss": float("nan")} for p in loss_curve(scale=1.2, until=60.0)]
    assert should_prune(all_nan, BEST, RULE) is None
    assert should_prune(loss_curve(scale=1.2, until=60.0), [all_nan], RULE) is None   # no usable best curve


def test_no_judgement_without_best_curves_reaching_that_far():
    assert should_prune(loss_curve(scale=1.5, until=60.0), [], RULE) is None
    short_best = [loss_curve(until=40.0)]
    assert should_prune(loss_curve(scale=1.5, until=60.0), short_best, RULE) is None
    assert should_prune(loss_curve(scale=1.5, until=40.0), short_best, RULE) is not None


def test_rules_out_of_range_are_refused():
    for bad in (dict(margin=-0.01, min_progress_pct=30.0), dict(margin=0.03, min_progress_pct=100.0),
                dict(margin=0.03, min_progress_pct=30.0, smooth_pct=-1.0)):
        with pytest.raises(ValueError):
            PruneRule(**bad)
    assert DEFAULT_RULE.min_progress_pct > 0
