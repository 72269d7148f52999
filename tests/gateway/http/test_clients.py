"""The per-client volume ratio on a clock the test holds (gateway.http.clients)."""

from __future__ import annotations

import math

from gateway.http.clients import FAST_S, OTHER, SLOW_S, Clients, principal_of


def test_principal_is_the_key_name_else_the_client_address() -> None:
    assert principal_of("alpha", {"client": ("10.0.0.1", 5)}) == "alpha"
    assert principal_of(None, {"client": ("10.0.0.1", 5)}) == "addr:10.0.0.1"
    assert principal_of(None, {}) == "addr:-"


def test_labels_are_the_configured_keys_and_one_bucket() -> None:
    clients = Clients(["alpha"])
    assert [clients.label(p) for p in ("alpha", "addr:10.0.0.1", "beta")] == ["alpha", OTHER, OTHER]
    assert set(clients.by_label) == {"alpha", OTHER}


def test_volume_ratio_is_one_at_a_steady_rate_and_rises_with_a_surge() -> None:
    """At a steady 2 req/s for 4 hours both EWMAs sit at 2 (the slow one within
    exp(-4 h / 1 h) = 2 % of it): the ratio is 1. Ten times the rate for 10 minutes moves the
    5-minute EWMA to 2 + 18 * (1 - exp(-600 / 300)) = 17.6 and the hour's to
    2 + 18 * (1 - exp(-600 / 3600)) = 4.8: a ratio of about 3.7."""
    clients = Clients(["alpha"])
    alpha = clients.by_label["alpha"]
    now = 0.0
    clients.tick(now)
    for rate, seconds in ((2, 4 * 3600), (20, 600)):
        for _ in range(seconds):
            alpha.requests += rate
            now += 1.0
            clients.tick(now)
        if rate == 2:
            assert math.isclose(alpha.volume_ratio, 1.0, rel_tol=0.03)
    fast = 2 + 18 * (1 - math.exp(-600 / FAST_S))
    slow = 2 + 18 * (1 - math.exp(-600 / SLOW_S))
    assert math.isclose(alpha.volume_ratio, fast / slow, rel_tol=0.02)
    assert clients.by_label[OTHER].volume_ratio == 0.0  # no history, no ratio
