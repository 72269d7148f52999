"""Cost of one routing decision: microseconds per ``policy.choose()`` for each strategy.

Run: ``.venv/bin/python loadtests/routing_cost.py`` (median of 5 timeit runs per case).
"""

from __future__ import annotations

import statistics
import timeit
from collections.abc import Callable
from functools import partial
from typing import Any

from router import parse_policy, sticky_key

NUMBER = 100_000
REPEATS = 5
VERSIONS = ["1", "2", "3"]
SHADOW = {"shadow": {"versions": ["4"], "sample": 0.1}}

CASES: list[tuple[str, dict[str, Any], str | None]] = [
    ("single", {"strategy": "single", "version": "1"}, None),
    ("blue_green", {"strategy": "blue_green", "active": "1", "standby": "2"}, None),
    ("canary random", {"strategy": "canary", "baseline": "1", "candidate": "2"}, None),
    (
        "canary sticky",
        {"strategy": "canary", "baseline": "1", "candidate": "2", "sticky": "header:x-user-id"},
        "user-1234",
    ),
    ("ab random", {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}}, None),
    ("ab sticky 2 arms", {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}}, "user-1234"),
    ("ab sticky 3 arms", {"strategy": "ab", "arms": {"1": 0.2, "2": 0.3, "3": 0.5}}, "user-1234"),
    ("bandit thompson", {"strategy": "bandit", "arms": VERSIONS}, None),
    ("bandit ucb1", {"strategy": "bandit", "arms": VERSIONS, "algorithm": "ucb1"}, None),
    ("ab random + shadow", {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}, **SHADOW}, None),
]


def microseconds(fn: Callable[[], object]) -> float:
    runs = timeit.repeat(fn, number=NUMBER, repeat=REPEATS)
    return statistics.median(runs) / NUMBER * 1e6


def main() -> None:
    print(f"{'strategy':<22} {'µs/choose':>10}")
    for name, doc, key in CASES:
        policy = parse_policy({**doc, "seed": 0}).policy(salt="model")
        print(f"{name:<22} {microseconds(partial(policy.choose, key)):>10.3f}")
    headers = {"content-type": "application/json", "x-user-id": "user-1234"}
    cost = microseconds(partial(sticky_key, "header:x-user-id", headers, {}))
    print(f"{'sticky_key(header)':<22} {cost:>10.3f}")


if __name__ == "__main__":
    main()
