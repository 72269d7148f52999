"""Routing between model versions. ``router.policy`` is pure (no I/O, no clock); ``router.state``
holds the stores and the route table, the only I/O. Neither imports ``gateway`` or starlette.
This package re-exports the policy layer."""

from __future__ import annotations

from router.policy.bandit import Bandit, bandit_of, with_bandit
from router.policy.policies import (
    ActionConflict,
    Arm,
    Decision,
    Policy,
    PolicyError,
    Shadow,
    Split,
    sticky_key,
)
from router.policy.spec import (
    ACTIONS,
    ABDoc,
    Action,
    BanditDoc,
    BlueGreenDoc,
    CanaryDoc,
    PolicyDoc,
    ShadowSpec,
    SingleDoc,
    parse_policy,
)

__all__ = [
    "ACTIONS",
    "ABDoc",
    "Action",
    "ActionConflict",
    "Arm",
    "Bandit",
    "BanditDoc",
    "BlueGreenDoc",
    "CanaryDoc",
    "Decision",
    "Policy",
    "PolicyDoc",
    "PolicyError",
    "Shadow",
    "ShadowSpec",
    "SingleDoc",
    "Split",
    "bandit_of",
    "parse_policy",
    "sticky_key",
    "with_bandit",
]
