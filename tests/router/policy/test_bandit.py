from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import integrate, stats

from router import Bandit, PolicyError, Shadow, bandit_of, parse_policy, with_bandit
from router.policy.bandit import ALGORITHMS, Algorithm

# Shares are proportions of n independent choices: sd = sqrt(p(1-p)/n); we allow 4.5 sd
# (a 7e-6 two-sided miss per check). Thompson's probabilities are themselves estimated from
# `draws` Monte Carlo samples, which adds sd sqrt(p(1-p)/draws) (the larger term).
Z = 4.5
ARMS = ("1", "2", "3")
TRUE_P = {"1": 0.1, "2": 0.2, "3": 0.3}


def simulate(algorithm: Algorithm, seed: int, steps: int = 20_000) -> tuple[Bandit, list[str]]:
    bandit = Bandit.fresh(ARMS, algorithm, min_share=0.05, seed=seed)
    u = np.random.default_rng(100 + seed).random(steps)
    totals = dict.fromkeys(ARMS, (0.0, 0.0))
    chosen = []
    for step in range(steps):
        arm = bandit.choose(None).version
        pulls, total = totals[arm]
        totals[arm] = (pulls + 1.0, total + float(u[step] < TRUE_P[arm]))
        chosen.append(arm)
        if step % 100 == 99:  # the gateway folds rewards in periodically, not per request
            bandit = bandit.with_counts(totals)
            assert np.all(bandit.probabilities >= 0.05 - 1e-12)
    return bandit, chosen


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_converges_to_the_best_arm_yet_keeps_the_floor(algorithm: Algorithm) -> None:
    bandit, chosen = simulate(algorithm, seed=1)
    # With a 0.05 floor on 3 arms the best arm can get at most 0.9; "converged" means the
    # algorithm's own part (0.85 of traffic) sits mostly on it: >= 0.8 overall.
    assert bandit.probabilities[2] >= 0.8
    last = Counter(chosen[-5000:])
    assert last["3"] / 5000 >= 0.8 - Z * math.sqrt(0.8 * 0.2 / 5000)
    total = Counter(chosen)
    for arm in ARMS:
        assert total[arm] / len(chosen) >= 0.05 - Z * math.sqrt(0.05 * 0.95 / len(chosen))
    pulls, rewards = bandit.pulls, bandit.rewards
    assert pulls.sum() == 20_000 and np.all(rewards <= pulls)


COUNTS = {"1": (50.0, 5.0), "2": (50.0, 10.0), "3": (50.0, 15.0)}


def expected_probabilities(algorithm: Algorithm, min_share: float, epsilon: float) -> list[float]:
    """Independent reference: the floor mixture over each algorithm's textbook choice rule."""
    pulls = np.array([c[0] for c in COUNTS.values()])
    sums = np.array([c[1] for c in COUNTS.values()])
    if algorithm == "epsilon_greedy":
        greedy = np.eye(3)[np.argmax(sums / pulls)]
        algo = epsilon / 3 + (1 - epsilon) * greedy
    elif algorithm == "ucb1":
        algo = np.eye(3)[np.argmax(sums / pulls + np.sqrt(2 * np.log(pulls.sum()) / pulls))]
    else:
        # P(arm i's Beta draw is the largest) = integral of f_i(x) * prod_{j != i} F_j(x) dx.
        dists = [stats.beta(1 + s, 1 + n - s) for n, s in COUNTS.values()]
        algo = np.array(
            [
                integrate.quad(
                    lambda x, i=i: (
                        dists[i].pdf(x) * math.prod(d.cdf(x) for j, d in enumerate(dists) if j != i)
                    ),
                    0,
                    1,
                )[0]
                for i in range(3)
            ]
        )
    return [min_share + (1 - 3 * min_share) * float(a) for a in algo]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_propensities_are_exact_and_match_choice_frequencies(algorithm: Algorithm) -> None:
    bandit = Bandit.fresh(ARMS, algorithm, min_share=0.1, epsilon=0.2, seed=5).with_counts(COUNTS)
    probs = bandit.probabilities
    assert probs.sum() == pytest.approx(1.0, abs=1e-12)
    reference = expected_probabilities(algorithm, 0.1, 0.2)
    draws = bandit.draws if algorithm == "thompson" else None
    for p, ref in zip(probs, reference, strict=True):
        tol = Z * math.sqrt(ref * (1 - ref) / draws) if draws else 1e-12
        assert abs(p - ref) <= tol + 1e-12
    n = 50_000
    decisions = [bandit.choose(None) for _ in range(n)]
    counts = Counter(d.version for d in decisions)
    for arm, p in zip(ARMS, probs, strict=True):
        assert {d.propensity for d in decisions if d.version == arm} == {p}
        assert abs(counts[arm] / n - p) <= Z * math.sqrt(p * (1 - p) / n)
    assert bandit.shares() == {arm: float(p) for arm, p in zip(ARMS, probs, strict=True)}


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_fresh_bandit_explores_uniformly(algorithm: Algorithm) -> None:
    probs = Bandit.fresh(ARMS, algorithm, seed=0).probabilities
    tol = Z * math.sqrt(2 / 9 / 1000) if algorithm == "thompson" else 1e-12
    assert np.allclose(probs, 1 / 3, atol=tol)


def test_with_counts_replaces_state_from_a_store() -> None:
    bandit = Bandit.fresh(ARMS, "ucb1", seed=0)
    replaced = bandit.with_counts({"1": (10.0, 1.0), "3": (4.0, 2.0), "retired": (9.0, 9.0)})
    assert replaced.counts() == {"1": (10.0, 1.0), "2": (0.0, 0.0), "3": (4.0, 2.0)}
    assert replaced.probabilities.tolist() == [0.0, 1.0, 0.0]  # unpulled arm "2" goes first
    with pytest.raises(ValueError):
        replaced.pulls[0] = 1.0  # read-only: the policy is immutable
    with pytest.raises(PolicyError, match="counts"):
        bandit.with_counts({"1": (1.0, 2.0)})


def test_constructor_rejects_impossible_floor() -> None:
    with pytest.raises(ValueError, match="min_share"):
        Bandit.fresh(ARMS, min_share=0.34)


def test_find_and_replace_the_bandit_inside_a_shadow() -> None:
    doc = {"strategy": "bandit", "arms": ["1", "2"], "shadow": {"versions": ["3"]}, "seed": 1}
    policy = parse_policy(doc).policy()
    assert isinstance(policy, Shadow)
    bandit = bandit_of(policy)
    assert bandit is not None and bandit.arms == ("1", "2")
    updated = with_bandit(policy, bandit.with_counts({"2": (100.0, 90.0), "1": (100.0, 10.0)}))
    assert isinstance(updated, Shadow) and updated.shadows == ("3",)
    assert updated.choose(None).shadows == ("3",)
    assert updated.shares()["2"] > 0.99
    assert bandit_of(parse_policy({"strategy": "single", "version": "1"}).policy()) is None
