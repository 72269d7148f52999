"""Who sent a request (its principal), and what each client does: the attribution and the
model-extraction signal behind ``turnout_client_*`` (docs/operations.md says how to read it).

The principal is the API key's name when a key was presented (``KeyCheck.check`` returns it),
else ``addr:<client address>``. Metric labels never take a client value: a principal that is
not a configured key's name is counted under ``OTHER``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

OTHER = "_other"
# The two horizons of the volume ratio: a principal's recent request rate over its own
# longer history (both exponentially weighted, in seconds).
FAST_S = 300.0
SLOW_S = 3600.0


def principal_of(key_name: str | None, scope: Mapping[str, Any]) -> str:
    """The API key's name, else ``addr:<client host>`` (``addr:-`` when the server gives none)."""
    if key_name is not None:
        return key_name
    client = scope.get("client")
    return "addr:" + (client[0] if client else "-")


@dataclass(slots=True)
class Client:
    """One metric label's figures."""

    requests: int = 0
    checked: int = 0  # requests whose inputs were compared with the reference range
    outside: int = 0  # of those, requests with a value outside it
    fast: float = 0.0  # requests/s, EWMA over FAST_S
    slow: float = 0.0  # requests/s, EWMA over SLOW_S
    _seen: int = 0  # requests at the last tick

    @property
    def volume_ratio(self) -> float:
        return self.fast / self.slow if self.slow > 0 else 0.0


@dataclass(slots=True)
class Clients:
    """Per-label counters: one label per configured key name, and ``OTHER``."""

    keys: Collection[str]
    by_label: dict[str, Client] = field(default_factory=dict)
    _last_tick: float | None = None

    def __post_init__(self) -> None:
        self.by_label = {name: Client() for name in (*self.keys, OTHER)}

    def label(self, principal: str) -> str:
        return principal if principal in self.by_label else OTHER

    def inspect(self, label: str, values: np.ndarray | None, bounds: Any) -> None:
        """Count one request's inputs (rows, features) against the reference's per-feature
        (minimum, maximum); nothing when the version has no reference or the shapes differ."""
        if values is None or bounds is None:
            return
        low, high = bounds
        if values.ndim != 2 or values.shape[1] != low.shape[0]:
            return
        client = self.by_label[label]
        client.checked += 1
        if (values < low).any() or (values > high).any():
            client.outside += 1

    def tick(self, now: float) -> None:
        """Fold the requests since the last tick into each label's two rates."""
        last, self._last_tick = self._last_tick, now
        if last is None or now <= last:
            return
        dt = now - last
        fast, slow = 1.0 - math.exp(-dt / FAST_S), 1.0 - math.exp(-dt / SLOW_S)
        for client in self.by_label.values():
            rate = (client.requests - client._seen) / dt
            client._seen = client.requests
            client.fast += fast * (rate - client.fast)
            client.slow += slow * (rate - client.slow)
