"""decide() and pooled_sigma(): pure functions over lists of val_bpb values, tested directly."""

import math

import pytest

from app.services.verdicts import CONFIRM, DEFAULT_POLICY, DISCARD, KEEP, POLICIES, RULES, decide, pooled_sigma

SIGMA = 0.0005
CONFIRMING = [policy for policy in POLICIES if policy != "single"]


def seed_decisions(values):
    """The seed's rule written out: keep iff strictly below the best so far; the first is kept."""
    best = None
    decisions = []
    for value in values:
        improved = best is None or value < best
        decisions.append(KEEP if improved else DISCARD)
        if improved:
            best = value
    return decisions


def single_decisions(values, sigma):
    best_runs = None
    decisions = []
    for value in values:
        verdict = decide([value], best_runs, sigma=sigma, policy="single", baseline_runs=3)
        decisions.append(verdict.action)
        if verdict.action == KEEP:
            best_runs = [value]
    return decisions


@pytest.mark.parametrize("sigma", [None, SIGMA])
def test_single_reproduces_the_seeds_decisions(sigma):
    # Ties, a value equal to the best, a regression and a new best after a discard.
    values = [1.010, 1.012, 1.010, 1.009, 1.0095, 1.009, 1.002, 1.0020001, 1.001]
    assert single_decisions(values, sigma) == seed_decisions(values)
    assert single_decisions(values, sigma) == [KEEP, DISCARD, DISCARD, KEEP, DISCARD, DISCARD, KEEP, DISCARD, KEEP]


def test_single_keeps_the_first_result_and_never_confirms():
    first = decide([1.2], None, sigma=None, policy="single", baseline_runs=3)
    assert (first.action, first.best, first.delta, first.z, first.runs, first.best_runs) == (KEEP, None, 0.0, None, 1, 0)
    worse = decide([1.0001], [1.0], sigma=SIGMA, policy="single")
    assert worse.action == DISCARD
    # It still reports the uncertainty when the noise floor is known.
    assert worse.sigma == SIGMA
    assert worse.z == pytest.approx(-0.0001 / (SIGMA * math.sqrt(2)))


def test_a_clear_gain_is_kept_with_z_above_two():
    best = [1.0000, 1.0004, 0.9996]
    candidate = [0.9980, 0.9984]
    for policy in POLICIES:
        verdict = decide(candidate, best, sigma=SIGMA, policy=policy)
        assert verdict.action == KEEP, policy
        assert verdict.z > 2
        assert verdict.estimate == pytest.approx(0.9982)
        assert verdict.best == pytest.approx(1.0)
        assert verdict.delta == pytest.approx(0.0018)
        assert verdict.z == pytest.approx(0.0018 / (SIGMA * math.sqrt(1 / 2 + 1 / 3)))
        assert (verdict.runs, verdict.best_runs) == (2, 3)


@pytest.mark.parametrize("policy", CONFIRMING)
def test_a_noise_level_first_run_asks_for_confirmation(policy):
    # A quarter sigma better than the best: promising, not clear.
    verdict = decide([1.0 - SIGMA / 4], [1.0, 1.0], sigma=SIGMA, policy=policy)
    assert verdict.action == CONFIRM
    assert 0 < verdict.z < 1


@pytest.mark.parametrize("policy", CONFIRMING)
def test_a_clearly_worse_first_run_is_discarded_at_once(policy):
    assert decide([1.0 + 2 * SIGMA], [1.0, 1.0], sigma=SIGMA, policy=policy).action == DISCARD


def test_confirm_decides_on_the_mean_after_one_confirmation():
    best = [1.0, 1.0]
    assert decide([0.9999, 0.9999], best, sigma=SIGMA, policy="confirm").action == KEEP
    assert decide([0.9999, 1.0002], best, sigma=SIGMA, policy="confirm").action == DISCARD
    # An exact tie is not an improvement, as in the seed.
    assert decide([0.9999, 1.0001], best, sigma=SIGMA, policy="confirm").action == DISCARD


def test_the_sequential_policy_stops():
    best = [1.0, 1.0, 1.0]
    # Always a tenth of a sigma better: never clear, never worse; it must still end at max_runs.
    runs = []
    for _ in range(10):
        runs.append(1.0 - SIGMA / 10)
        verdict = decide(runs, best, sigma=SIGMA, policy="sequential")
        if verdict.action != CONFIRM:
            break
    assert verdict.action == KEEP
    assert len(runs) == RULES["sequential"].max_runs
    # A clear gain stops early, at the second run.
    assert decide([1.0 - 2 * SIGMA] * 2, best, sigma=SIGMA, policy="sequential").action == KEEP
    # A mean that turns worse stops it too.
    assert decide([0.9999, 1.0004], best, sigma=SIGMA, policy="sequential").action == DISCARD
    # max_runs overrides the policy's own limit.
    assert decide([1.0 - SIGMA / 10] * 2, best, sigma=SIGMA, policy="sequential", max_runs=2).action == KEEP


@pytest.mark.parametrize("policy", CONFIRMING)
def test_the_baseline_is_replicated_before_it_is_kept(policy):
    assert decide([1.0], None, sigma=None, policy=policy, baseline_runs=3).action == CONFIRM
    assert decide([1.0, 1.001], [], sigma=None, policy=policy, baseline_runs=3).action == CONFIRM
    verdict = decide([1.0, 1.001, 1.002], None, sigma=None, policy=policy, baseline_runs=3)
    assert (verdict.action, verdict.estimate, verdict.runs) == (KEEP, pytest.approx(1.001), 3)


@pytest.mark.parametrize("sigma", [None, 0.0])
@pytest.mark.parametrize("policy", CONFIRMING)
def test_without_a_noise_floor_the_confirming_policies_use_the_seeds_comparison(policy, sigma):
    best = [1.0]
    assert decide([1.0], best, sigma=sigma, policy=policy).action == DISCARD
    better = [0.99999]
    while (verdict := decide(better, best, sigma=sigma, policy=policy)).action == CONFIRM:
        better.append(0.99999)
    assert verdict.action == KEEP
    assert len(better) == RULES[policy].max_runs
    turned_worse = decide([0.99999, 1.00002], best, sigma=sigma, policy=policy)
    assert (turned_worse.action, turned_worse.z, turned_worse.sigma) == (DISCARD, None, sigma)


def test_the_default_policy_is_one_of_the_policies():
    assert DEFAULT_POLICY in POLICIES


def test_bad_input_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="unknown verdict policy 'greedy'; choose one of single, confirm"):
        decide([1.0], None, sigma=None, policy="greedy")
    with pytest.raises(ValueError, match="at least one finished run"):
        decide([], [1.0], sigma=None, policy="single")
    with pytest.raises(ValueError, match="sigma must be None or at least 0"):
        decide([1.0], [1.0], sigma=-1.0, policy="confirm")
    with pytest.raises(ValueError, match="max_runs must be at least 1"):
        decide([1.0], [1.0], sigma=SIGMA, policy="confirm", max_runs=0)


def test_pooled_sigma_on_known_data():
    # Deviations from each group's own mean: (-1, 1) and (-2, 0, 2): 10 squared over 1 + 2 degrees of freedom.
    sigma, runs = pooled_sigma([[1.0, 3.0], [10.0, 12.0, 14.0], [7.0]])
    assert sigma == pytest.approx(math.sqrt(10 / 3))
    assert runs == 5
    # Groups differing only by their true score pool to the same spread.
    assert pooled_sigma([[0.0, 2.0], [100.0, 102.0]]) == (pytest.approx(math.sqrt(2)), 4)


def test_pooled_sigma_is_unknown_without_two_runs_of_one_experiment():
    assert pooled_sigma([]) == (None, 0)
    assert pooled_sigma([[1.0], [2.0]]) == (None, 0)
