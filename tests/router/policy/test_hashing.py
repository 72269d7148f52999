from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from router.policy.hashing import arm_prefix, rendezvous, unit_hash

# Tolerances: an observed share of n independent keys has sd sqrt(p(1-p)/n); 4.5 sd bounds a
# two-sided miss at 7e-6 per check, so only a real bias fails (the inputs are fixed anyway).
Z = 4.5
KEYS = [f"user-{i}" for i in range(20_000)]


def test_hash_is_pinned_across_releases() -> None:
    # Changing these values reassigns every sticky user of every deployment: do it knowingly.
    assert unit_hash(arm_prefix("model", "1"), b"user-42") == 0.7015056042895076
    assert unit_hash(b"", b"") == 0.8931675160897388


def test_unit_hash_is_uniform_on_open_interval() -> None:
    u = np.array([unit_hash(b"salt\x1f1\x1f", k.encode()) for k in KEYS])
    assert np.all((u > 0.0) & (u < 1.0))
    assert stats.kstest(u, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.3, 0.5), (0.01, 0.99), (0.1,) * 10])
def test_rendezvous_honours_weights(weights: tuple[float, ...]) -> None:
    prefixes = [arm_prefix("m", str(i)) for i in range(len(weights))]
    counts = np.bincount([rendezvous(k, prefixes, weights) for k in KEYS], minlength=len(weights))
    for share, w in zip(counts / len(KEYS), weights, strict=True):
        assert abs(share - w) <= Z * math.sqrt(w * (1 - w) / len(KEYS))


def test_two_arms_is_the_ramp_candidate_iff_hash_below_weight() -> None:
    prefixes = [arm_prefix("m", "base"), arm_prefix("m", "cand")]
    for key in KEYS[:2000]:
        e_base, e_cand = (-math.log(unit_hash(p, key.encode())) for p in prefixes)
        ramp_hash = e_cand / (e_base + e_cand)
        for w in (0.05, 0.3, 0.77):
            on_candidate = rendezvous(key, prefixes, (1 - w, w)) == 1
            assert on_candidate == (ramp_hash < w)


def test_adding_an_arm_only_takes_keys_never_swaps_survivors() -> None:
    old = [arm_prefix("m", "1"), arm_prefix("m", "2")]
    new = [arm_prefix("m", "3"), *old]  # position must not matter: only names are hashed
    moved_between_survivors = 0
    for key in KEYS:
        before = rendezvous(key, old, (0.6, 0.4)) + 1
        after = rendezvous(key, new, (0.2, 0.6, 0.4))
        if after != 0 and after != before:
            moved_between_survivors += 1
    assert moved_between_survivors == 0
