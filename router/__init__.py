"""Routing between model versions: pure policies, no I/O. Never imports gateway, starlette or
redis. ``router.stats`` (scipy) is imported on its own by the report endpoint."""

from __future__ import annotations

from router.bandit import Bandit, bandit_of, with_bandit
from router.policies import (
    ActionConflict,
    Arm,
    Decision,
    Policy,
    PolicyError,
    Shadow,
    Split,
    sticky_key,
)
from router.spec import (
    ACTIONS,
    Action,
    PolicyDoc,
    apply_action,
    build_policy,
    parse_policy,
    referenced_versions,
)

__all__ = [
    "ACTIONS",
    "Action",
    "ActionConflict",
    "Arm",
    "Bandit",
    "Decision",
    "Policy",
    "PolicyDoc",
    "PolicyError",
    "Shadow",
    "Split",
    "apply_action",
    "bandit_of",
    "build_policy",
    "parse_policy",
    "referenced_versions",
    "sticky_key",
    "with_bandit",
]
