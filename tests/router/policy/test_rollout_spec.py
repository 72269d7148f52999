"""Rollout templates as values: defaults, the normalised form stores keep (parsing it again gives
the same template), the canary a step stands for, and the bounded memory of versions tried."""

from __future__ import annotations

import pytest

from router.policy.policies import PolicyError
from router.policy.rollout_spec import MAX_TRIED, Rollout, RolloutTemplate, remember
from router.policy.spec import CanaryDoc, ShadowSpec, SingleDoc


def test_defaults_and_the_normalised_form_round_trip() -> None:
    template = RolloutTemplate.parse({})
    assert template.as_json() == {
        "shadow_s": 0.0, "steps": [0.05, 0.25, 0.5, 1.0], "step_s": 60.0, "approval": "auto",
        "approve_each_step": False,
    }  # fmt: skip
    full = RolloutTemplate.parse(
        {"shadow_s": 30, "steps": [0.1, 0.6], "step_s": 5, "approval": "required",
         "approve_each_step": True, "confirm_url": "https://ci.example/c",
         "sticky": "header:X-User", "salt": "s", "guards": {"max_error_ratio": 0.02}}
    )  # fmt: skip
    assert RolloutTemplate.parse(full.as_json()) == full
    assert full.sticky == "header:x-user"  # the canary parser's normalisation


def test_a_step_is_the_canary_the_template_describes() -> None:
    template = RolloutTemplate.parse({"steps": [0.1, 0.6], "guards": {"max_error_ratio": 0.02}})
    doc = template.canary("1", "2", 1, seed=7)
    assert doc == CanaryDoc(
        baseline="1", candidate="2", weight=0.6, steps=(0.1, 0.6), guards=template.guards, seed=7
    )


def test_the_shadow_leaves_the_quality_conditions_to_the_canary() -> None:
    """In the shadow they would judge the serving version, the one being replaced."""
    guards = {"max_error_ratio": 0.02, "min_labels": 50, "min_quality": {"recall": 0.7},
              "max_quality_drop_vs_baseline": {"roc_auc": 0.02}}  # fmt: skip
    template = RolloutTemplate.parse({"shadow_s": 60, "guards": guards})
    assert template.guards is not None and template.guards.judges_quality
    doc = template.shadow("1", "2", seed=7)
    assert doc == SingleDoc(version="1", shadow=ShadowSpec(("2",)), seed=7, guards=doc.guards)
    assert doc.guards is not None and not doc.guards.judges_quality
    assert doc.guards.max_error_ratio == 0.02 and doc.guards.min_labels == 50
    assert template.canary("1", "2", 0, seed=7).guards == template.guards
    plain = RolloutTemplate.parse({"guards": {"max_error_ratio": 0.02}})
    assert plain.shadow("1", "2", None).guards == plain.guards


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), True, None])
def test_durations_must_be_finite_numbers(bad: object) -> None:
    with pytest.raises(PolicyError) as raised:
        RolloutTemplate.parse({"step_s": bad})
    assert raised.value.field == "step_s"


def test_versions_tried_are_bounded_and_a_retried_one_moves_last() -> None:
    tried: tuple[str, ...] = ()
    for i in range(MAX_TRIED + 5):
        tried = remember(tried, f"{i}@x")
    assert len(tried) == MAX_TRIED and tried[0] == "5@x" and tried[-1] == f"{MAX_TRIED + 4}@x"
    assert remember(tried, "5@x")[-1] == "5@x" and len(remember(tried, "5@x")) == MAX_TRIED


def test_a_rollout_state_round_trips_through_json() -> None:
    rollout = Rollout(
        model="fraud", version="2", sha256="ab", baseline="1",
        template=RolloutTemplate().as_json(), template_revision=3, phase="canary", step=1,
        started_at=10.0, since=20.0, route_revision=9, why="step", tried=("2@ab",),
    )  # fmt: skip
    assert rollout.weight == 0.25
    assert Rollout.from_json(rollout.as_json()) == rollout
    assert rollout.moved(phase="promoted").weight == 1.0
    assert rollout.moved(phase="rolled_back").weight == 0.0
