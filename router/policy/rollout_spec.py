"""Rollout templates and the state of a running rollout, as typed values. Pure: no I/O, no clock.

A template is the JSON object an operator puts on a model (``PUT /admin/routes/{m}/rollout``)::

    {"shadow_s": 300, "steps": [0.05, 0.25, 0.5, 1.0], "step_s": 600,
     "guards": {"max_error_ratio": 0.01}, "approval": "required",
     "approve_each_step": false, "confirm_url": "https://ci.example/confirm",
     "sticky": "principal", "salt": "exp-7"}

``RolloutTemplate.parse`` validates it once (every error a ``PolicyError`` naming the field,
``steps.2``, ``guards.max_p99_s``); ``as_json`` gives the normalised object stores keep. The
canary fields (``steps``, ``guards``, ``sticky``, ``salt``) are validated by the canary's own
parser, so the canary a rollout writes is valid by construction and a guard condition added to
``GuardSpec`` is accepted here as soon as it exists. ``guards.advance_after_s`` is refused: the
rollout paces the steps itself (``step_s``) and holds them for approval, which a guard's own
advance would bypass.

``Rollout`` is the state of one model's rollout, kept fleet-wide by the store; the engine
(gateway.background.rollout) moves it through the phases (docs/rollouts.md draws them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from router.policy.guard_spec import GuardSpec
from router.policy.policies import PolicyError
from router.policy.spec import DEFAULT_STEPS, CanaryDoc, ShadowSpec, SingleDoc, parse_policy

Approval = Literal["auto", "required"]
Phase = Literal[
    "shadow", "canary", "awaiting_approval", "confirming", "promoted", "rolled_back", "aborted"
]
PHASES: tuple[Phase, ...] = get_args(Phase)
ACTIVE: tuple[Phase, ...] = ("shadow", "canary", "awaiting_approval", "confirming")
Gate = Literal["step", "promotion"]
Decision = Literal["approved", "rejected"]

FIELDS = (
    "shadow_s", "steps", "step_s", "guards", "approval", "approve_each_step", "confirm_url",
    "sticky", "salt",
)  # fmt: skip
MAX_DURATION_S = 7 * 86_400.0  # shadow_s and step_s
MAX_URL_CHARS = 2048
DEFAULT_STEP_S = 60.0
MAX_TRIED = 32  # (version, artifact) pairs a model remembers as already rolled out
MAX_WHY_CHARS = 2000


@dataclass(frozen=True, slots=True)
class RolloutTemplate:
    shadow_s: float = 0.0
    steps: tuple[float, ...] = DEFAULT_STEPS
    step_s: float = DEFAULT_STEP_S
    guards: GuardSpec | None = None
    approval: Approval = "auto"
    approve_each_step: bool = False
    confirm_url: str | None = None
    sticky: str | None = None
    salt: str | None = None

    @classmethod
    def parse(cls, raw: Any) -> RolloutTemplate:
        if not isinstance(raw, Mapping):
            raise PolicyError("rollout", "must be a JSON object")
        unknown = [str(k) for k in raw if k not in FIELDS]
        if unknown:
            raise PolicyError(unknown[0], f"unknown field (allowed: {', '.join(FIELDS)})")
        canary: dict[str, Any] = {"strategy": "canary", "baseline": "1", "candidate": "2"}
        canary |= {k: raw[k] for k in ("steps", "guards", "sticky", "salt") if k in raw}
        doc = parse_policy(canary)  # errors name the same fields: steps.1, guards.window_s
        assert isinstance(doc, CanaryDoc)
        if doc.guards is not None and doc.guards.advance_after_s is not None:
            raise PolicyError(
                "guards.advance_after_s",
                "not in a rollout template: step_s paces the steps (and approval holds them)",
            )
        approval = raw.get("approval", "auto")
        if approval not in get_args(Approval):
            raise PolicyError("approval", f"must be one of {list(get_args(Approval))}")
        each = raw.get("approve_each_step", False)
        if not isinstance(each, bool):
            raise PolicyError("approve_each_step", f"must be true or false, got {each!r}")
        if each and approval != "required":
            raise PolicyError("approve_each_step", "applies only with approval 'required'")
        url = raw.get("confirm_url")
        if url is not None:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise PolicyError("confirm_url", "must be an http:// or https:// URL")
            if len(url) > MAX_URL_CHARS:
                raise PolicyError("confirm_url", f"at most {MAX_URL_CHARS} characters")
        return cls(
            shadow_s=_duration(raw, "shadow_s", 0.0),
            steps=doc.steps,
            step_s=_duration(raw, "step_s", DEFAULT_STEP_S),
            guards=doc.guards,
            approval=approval,
            approve_each_step=each,
            confirm_url=url,
            sticky=doc.sticky,
            salt=doc.salt,
        )

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shadow_s": self.shadow_s,
            "steps": list(self.steps),
            "step_s": self.step_s,
            "approval": self.approval,
            "approve_each_step": self.approve_each_step,
        }
        if self.guards is not None:
            out["guards"] = self.guards.as_doc()
        for name in ("confirm_url", "sticky", "salt"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def shadow(self, serving: str, candidate: str, seed: int | None) -> SingleDoc:
        """The shadow phase: ``serving`` answers, ``candidate`` gets copies. The guards are the
        template's without its quality conditions: here they would judge the serving version,
        the one the candidate is to replace, and a serving version under its quality floor
        (often the very reason for the new version) would hold its replacement in the shadow
        for good, with nothing a guard can do about it. The canary judges the candidate's
        quality on its own labels."""
        guards = self.guards
        if guards is not None and guards.judges_quality:
            guards = replace(guards, min_quality=(), max_quality_drop_vs_baseline=())
        return SingleDoc(version=serving, shadow=ShadowSpec((candidate,)), guards=guards, seed=seed)

    def canary(self, baseline: str, candidate: str, step: int, seed: int | None) -> CanaryDoc:
        """The canary at ``step`` (an index into ``steps``)."""
        return CanaryDoc(
            baseline=baseline, candidate=candidate, weight=self.steps[step], steps=self.steps,
            sticky=self.sticky, salt=self.salt, guards=self.guards, seed=seed,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Rollout:
    """One model's rollout. ``route_revision`` is the policy revision the rollout last wrote: a
    policy at any other revision was changed by someone else (a guard or a person). ``gate`` is
    what an approval or the webhook holds (the next step or the promotion); ``decision`` an
    approval given for it, not yet acted on. ``tried`` lists ``version@sha256`` pairs already
    rolled out (whatever the outcome), newest last, so none starts twice."""

    model: str
    version: str
    sha256: str
    baseline: str
    template: dict[str, Any]
    template_revision: int
    phase: Phase
    step: int  # index into the template's steps; -1 in the shadow phase
    started_at: float
    since: float  # when the current phase or step began
    route_revision: int
    why: str
    gate: Gate | None = None
    decision: Decision | None = None
    decided_by: str | None = None
    decision_reason: str | None = None
    ended_at: float | None = None
    tried: tuple[str, ...] = field(default=())

    @property
    def active(self) -> bool:
        return self.phase in ACTIVE

    @property
    def spec(self) -> RolloutTemplate:
        return RolloutTemplate.parse(self.template)

    @property
    def weight(self) -> float:
        steps = self.template.get("steps", DEFAULT_STEPS)
        if self.phase == "promoted":
            return 1.0
        if self.phase in ("rolled_back", "aborted") or self.step < 0:
            return 0.0
        return float(steps[self.step])

    def moved(self, **changes: Any) -> Rollout:
        why = changes.get("why")
        if isinstance(why, str):
            changes["why"] = why[:MAX_WHY_CHARS]
        return replace(self, **changes)

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "version": self.version, "sha256": self.sha256,
            "baseline": self.baseline, "template": self.template,
            "template_revision": self.template_revision, "phase": self.phase, "step": self.step,
            "weight": self.weight, "started_at": self.started_at, "since": self.since,
            "route_revision": self.route_revision, "why": self.why, "gate": self.gate,
            "decision": self.decision, "decided_by": self.decided_by,
            "decision_reason": self.decision_reason, "ended_at": self.ended_at,
            "tried": list(self.tried),
        }  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Rollout:
        fields = {k: v for k, v in raw.items() if k != "weight"}
        fields["tried"] = tuple(raw.get("tried", ()))
        return cls(**fields)


def tried_key(version: str, sha256: str) -> str:
    return f"{version}@{sha256}"


def remember(tried: tuple[str, ...], key: str) -> tuple[str, ...]:
    """``tried`` with ``key`` last, the oldest dropped beyond ``MAX_TRIED``."""
    kept = (*(k for k in tried if k != key), key)
    return kept[-MAX_TRIED:]


def _duration(raw: Mapping[str, Any], name: str, default: float) -> float:
    if name not in raw:
        return default
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PolicyError(name, f"must be a number of seconds, got {value!r}")
    if not 0.0 <= value <= MAX_DURATION_S:
        raise PolicyError(name, f"must be in [0, {MAX_DURATION_S:g}] seconds, got {value!r}")
    return float(value)
