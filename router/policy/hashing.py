"""Stable hashing for sticky assignment.

Everything here must give the same answer on every replica, after restarts and across Python
versions, so it is built on blake2b (never ``hash()``, which is salted per process).

Weighted rendezvous hashing: for a key and arms with weights w_i > 0, let u_i be a uniform hash
of (salt, arm, key) in (0, 1) and score_i = -ln(u_i) / w_i; the key goes to the arm with the
smallest score. Each -ln(u_i) is an Exp(1) variable, so score_i ~ Exp(w_i), and the minimum of
independent exponentials falls on arm i with probability w_i / sum(w): the split honours the
weights. A key on arm i under weights w moves under new weights w' only if some arm j now
beats it, which needs w'_j / w'_i > w_j / w_i: keys leave an arm only for arms that gained
weight relative to it. When one arm's weight changes and the others keep their ratios (a
canary ramp, an arm added, removed or resized), exactly the total-variation distance
(1/2) sum |w_i - w'_i| of keys moves: the least any assignment can move. Changes that shift
weight among several arms at once can move somewhat more (a key may hop between two arms whose
ratio changed). With two arms, arm b wins iff E_b / (E_a + E_b) < w_b, and that ratio is
uniform on (0, 1): a two-arm split is exactly the ramp "candidate iff hash(key) < weight".
Because u_i hashes the arm's name, not its position, reordering, adding or removing other arms
never disturbs a key's comparison between two surviving arms.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

_SEP = b"\x1f"
_TWO_POW_MINUS_53 = 2.0**-53


def arm_prefix(salt: str, arm: str) -> bytes:
    """The bytes hashed before the key for one (salt, arm) pair."""
    return salt.encode() + _SEP + arm.encode() + _SEP


def unit_hash(prefix: bytes, key: bytes) -> float:
    """A stable hash of prefix + key, uniform on the open interval (0, 1)."""
    digest = hashlib.blake2b(prefix + key, digest_size=8).digest()
    # The top 53 bits fill a double's mantissa; +0.5 keeps u away from 0 so -ln(u) is finite.
    return ((int.from_bytes(digest, "big") >> 11) + 0.5) * _TWO_POW_MINUS_53


def rendezvous(key: str, prefixes: Sequence[bytes], weights: Sequence[float]) -> int:
    """Index of the arm that ``key`` goes to under weighted rendezvous hashing.

    ``prefixes[i]`` is ``arm_prefix(salt, arm_i)``; every weight must be > 0.
    """
    key_bytes = key.encode()
    best = 0
    best_score = math.inf
    for i, prefix in enumerate(prefixes):
        score = -math.log(unit_hash(prefix, key_bytes)) / weights[i]
        if score < best_score:
            best, best_score = i, score
    return best
