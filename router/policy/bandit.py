"""Multi-armed bandit routing: Thompson sampling, epsilon-greedy and UCB1 with an exploration floor.

State is per-arm ``pulls`` (rewards observed) and ``reward_sum`` (rewards in [0, 1]); a request
that never reports a reward does not count against its arm. A ``Bandit`` is immutable: the
probability of choosing each arm is computed once when it is built (from its counts), and
``choose`` only draws from those cached probabilities, so the logged propensity is exactly the
probability the choice was made with. Rewards are accounted outside (``router.state.table``: joined
to the serving arm, summed over every replica in the state store); a background task swaps in
``bandit.with_counts(totals)``.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from router.policy.policies import Decision, Policy, PolicyError, Shadow

Algorithm = Literal["thompson", "epsilon_greedy", "ucb1"]
ALGORITHMS: tuple[Algorithm, ...] = ("thompson", "epsilon_greedy", "ucb1")
FloatArray = npt.NDArray[np.float64]
Counts = Mapping[str, tuple[float, float]]


def thompson_probabilities(
    pulls: FloatArray, rewards: FloatArray, rng: np.random.Generator, draws: int
) -> FloatArray:
    """Monte Carlo estimate of P(arm i has the largest draw) under Beta(1 + S_i, 1 + n_i - S_i)."""
    alpha = 1.0 + rewards
    beta = 1.0 + np.maximum(pulls - rewards, 0.0)
    samples = rng.beta(alpha, beta, size=(draws, len(pulls)))
    wins = np.bincount(np.argmax(samples, axis=1), minlength=len(pulls))
    return wins.astype(np.float64) / draws


def _argmax_share(scores: FloatArray) -> FloatArray:
    """Uniform over the arms tied at the maximum score (unpulled arms carry +inf)."""
    best = (scores == np.max(scores)).astype(np.float64)
    out: FloatArray = best / best.sum()
    return out


def _means(pulls: FloatArray, rewards: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pulls > 0.0, rewards / pulls, np.inf)


def choice_probabilities(
    algorithm: Algorithm,
    pulls: FloatArray,
    rewards: FloatArray,
    *,
    min_share: float,
    epsilon: float,
    rng: np.random.Generator,
    draws: int,
) -> FloatArray:
    """P(choose arm i) = min_share + (1 - K * min_share) * P_algorithm(i).

    That is the mixture "with probability K * min_share pick uniformly, else follow the
    algorithm", so every arm keeps at least ``min_share``. Exact for epsilon-greedy and UCB1
    (ties split evenly); a Monte Carlo estimate for Thompson sampling.
    """
    k = len(pulls)
    if algorithm == "thompson":
        algo = thompson_probabilities(pulls, rewards, rng, draws)
    elif algorithm == "epsilon_greedy":
        algo = epsilon / k + (1.0 - epsilon) * _argmax_share(_means(pulls, rewards))
    else:
        log_total = math.log(max(float(pulls.sum()), 1.0))
        bonus = np.sqrt(2.0 * log_total / np.maximum(pulls, 1.0))
        algo = _argmax_share(_means(pulls, rewards) + bonus)  # unpulled arms: mean +inf
    return min_share + (1.0 - k * min_share) * algo


@dataclass(frozen=True, slots=True, eq=False)  # arrays inside: identity, not value, equality
class Bandit:
    """Adaptive split over ``arms``; see the module docstring for the state's life cycle.

    ``pulls[i]`` and ``rewards[i]`` are arm i's counts (copied and made read-only). ``rng``
    drives the Thompson estimate (``draws`` samples, once per build), ``choice_rng`` the choices.
    """

    arms: tuple[str, ...]
    pulls: FloatArray
    rewards: FloatArray
    algorithm: Algorithm = "thompson"
    min_share: float = 0.0
    epsilon: float = 0.1
    draws: int = 1000
    rng: np.random.Generator = field(default_factory=np.random.default_rng, repr=False)
    choice_rng: random.Random = field(default_factory=random.Random, repr=False)
    probabilities: FloatArray = field(init=False)
    _index: dict[str, int] = field(init=False, repr=False)
    _cumulative: list[float] = field(init=False, repr=False)
    _decisions: tuple[Decision, ...] = field(init=False, repr=False)

    @classmethod
    def fresh(
        cls,
        arms: Sequence[str],
        algorithm: Algorithm = "thompson",
        *,
        min_share: float = 0.0,
        epsilon: float = 0.1,
        seed: int | None = None,
    ) -> Bandit:
        """A bandit with no rewards yet; ``seed`` makes both generators reproducible."""
        k = len(arms)
        return cls(
            tuple(arms),
            np.zeros(k),
            np.zeros(k),
            algorithm,
            min_share,
            epsilon,
            rng=np.random.default_rng(seed),
            choice_rng=random.Random(seed),
        )

    def __post_init__(self) -> None:
        k = len(self.arms)
        if k < 1 or len(set(self.arms)) != k:
            raise ValueError(f"bandit arms must be distinct and non-empty, got {self.arms}")
        if not 0.0 <= self.min_share * k <= 1.0:
            raise ValueError(f"min_share must be in [0, 1/{k}], got {self.min_share}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"unknown bandit algorithm {self.algorithm!r}")
        pulls = _read_only(self.pulls, k)
        rewards = _read_only(self.rewards, k)
        probs = _read_only(
            choice_probabilities(
                self.algorithm,
                pulls,
                rewards,
                min_share=self.min_share,
                epsilon=self.epsilon,
                rng=self.rng,
                draws=self.draws,
            ),
            k,
        )
        set_ = object.__setattr__
        set_(self, "pulls", pulls)
        set_(self, "rewards", rewards)
        set_(self, "probabilities", probs)
        set_(self, "_index", {arm: i for i, arm in enumerate(self.arms)})
        set_(self, "_cumulative", np.cumsum(probs).tolist())
        decisions = tuple(
            Decision(arm, propensity=float(p), arm_role="arm")
            for arm, p in zip(self.arms, probs, strict=True)
        )
        set_(self, "_decisions", decisions)

    @property
    def sticky(self) -> str | None:
        return None  # stickiness would freeze the exploration the bandit relies on

    def choose(self, key: str | None) -> Decision:
        i = bisect_right(self._cumulative, self.choice_rng.random())
        return self._decisions[min(i, len(self._decisions) - 1)]

    def shares(self) -> dict[str, float]:
        return {arm: float(p) for arm, p in zip(self.arms, self.probabilities, strict=True)}

    def versions(self) -> frozenset[str]:
        return frozenset(self.arms)

    def counts(self) -> dict[str, tuple[float, float]]:
        """Arm -> (pulls, reward_sum) this bandit decides from."""
        return {
            arm: (float(p), float(r))
            for arm, p, r in zip(self.arms, self.pulls, self.rewards, strict=True)
        }

    def with_counts(self, counts: Counts) -> Bandit:
        """A bandit deciding from ``counts`` (arm -> (pulls, reward_sum)), sharing this one's
        configuration and generators. Missing arms start at zero; unknown ones are ignored (an
        arm removed from the policy)."""
        pulls = np.array([counts.get(arm, (0.0, 0.0))[0] for arm in self.arms], dtype=np.float64)
        rewards = np.array([counts.get(arm, (0.0, 0.0))[1] for arm in self.arms], dtype=np.float64)
        # Summed floats may overshoot by rounding; anything beyond that is corrupt state.
        slack = 1e-9 * np.maximum(pulls, 1.0)
        if not (np.all(rewards >= 0.0) and np.all(rewards <= pulls + slack)):
            raise PolicyError("counts", "need 0 <= reward_sum <= pulls for every arm")
        return Bandit(
            self.arms,
            pulls,
            np.minimum(rewards, pulls),
            self.algorithm,
            self.min_share,
            self.epsilon,
            self.draws,
            self.rng,
            self.choice_rng,
        )


def _read_only(values: FloatArray, k: int) -> FloatArray:
    out = np.array(values, dtype=np.float64)
    if out.shape != (k,):
        raise ValueError(f"expected {k} values, got shape {out.shape}")
    out.flags.writeable = False
    return out


def bandit_of(policy: Policy) -> Bandit | None:
    """The bandit inside ``policy`` (possibly wrapped in a Shadow), if any."""
    if isinstance(policy, Shadow):
        policy = policy.primary
    return policy if isinstance(policy, Bandit) else None


def with_bandit(policy: Policy, bandit: Bandit) -> Policy:
    """``policy`` with its bandit replaced by ``bandit`` (keeping any Shadow wrapper)."""
    if isinstance(policy, Shadow):
        return Shadow(bandit, policy.shadows, policy.sample, policy.rng)
    return bandit
