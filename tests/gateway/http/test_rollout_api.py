"""Rollout templates and approvals through a real gateway: CRUD, validation naming the field,
roles, If-Match and the audit trail; a version loaded through the repository API starts the
rollout by itself, waits for approval and is promoted once approved; metrics show it."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.server import ADMIN, InProcessServer, until

VIEWER = "viewer-token-0123456789"
OPERATOR = "operator-token-0123456789"
ARGS = [
    "--admin-token", f"alice:viewer={VIEWER}",
    "--admin-token", f"bob:operator={OPERATOR}",
]  # fmt: skip
TEMPLATE = {"shadow_s": 0, "steps": [0.5], "step_s": 0, "approval": "required"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository with fraud at version 1 only: version 2 arrives during a test."""
    root = tmp_path_factory.mktemp("rollout-api") / "models"
    shutil.copytree(demo_repo, root)
    shutil.rmtree(root / "fraud" / "2")
    return root


@pytest.fixture(scope="module")
def gateway(repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(repo, args=ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(gateway: InProcessServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        yield c


def put(client: httpx.Client, model: str, rollout: Any, token: str = OPERATOR) -> httpx.Response:
    body = {"rollout": rollout, "reason": "ramp new versions"}
    return client.put(f"/admin/routes/{model}/rollout", headers=bearer(token), json=body)


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ({"steps": [0.5, 0.2]}, "rollout.steps.1: steps must increase strictly"),
        ({"steps": [0.01 * i for i in range(1, 34)]}, "rollout.steps: at most 32 steps, got 33"),
        ({"step": 5}, "rollout.step: unknown field (allowed: shadow_s, steps, step_s, guards"),
        ({"shadow_s": -1}, "rollout.shadow_s: must be in [0, 604800] seconds, got -1"),
        ({"step_s": "5m"}, "rollout.step_s: must be a number of seconds, got '5m'"),
        ({"approval": "maybe"}, "rollout.approval: must be one of ['auto', 'required']"),
        ({"approve_each_step": True}, "rollout.approve_each_step: applies only with approval"),
        ({"confirm_url": "ftp://ci/confirm"}, "rollout.confirm_url: must be an http:// or https"),
        ({"confirm_url": "http://x/" + "a" * 2048}, "rollout.confirm_url: at most 2048 characters"),
        ({"guards": {"max_error_rate": 0.1}}, "rollout.guards.max_error_rate: unknown field"),
        ({"guards": {"advance_after_s": 5}}, "rollout.guards.advance_after_s: not in a rollout"),
        ({"sticky": "cookie:x"}, "rollout.sticky: must be 'header:<name>', 'parameter:<name>'"),
        ([1, 2], "rollout: must be a JSON object"),
    ],
)
def test_an_invalid_template_is_refused_naming_the_field(
    client: httpx.Client, rollout: Any, message: str
) -> None:
    r = put(client, "risk", rollout)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(message), r.text
    assert client.get("/admin/routes/risk/rollout", headers=ADMIN).status_code == 404


def test_template_crud_roles_if_match_and_audit(client: httpx.Client) -> None:
    viewer, operator = bearer(VIEWER), bearer(OPERATOR)
    r = client.get("/admin/routes/risk/rollout", headers=viewer)
    assert r.status_code == 404 and "no rollout template" in r.json()["error"]
    r = put(client, "risk", {"steps": [0.1, 1.0]}, token=VIEWER)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == (
        "PUT /admin/routes/{model}/rollout needs the operator role; token 'alice' is a viewer"
    )
    r = client.put("/admin/routes/risk/rollout", headers=operator, json={"rollout": {}})
    assert r.status_code == 400 and r.json()["error"].startswith("reason: required")
    r = put(client, "risk", {"steps": [0.1, 1.0], "guards": {"max_error_ratio": 0.01}})
    assert r.status_code == 200, r.text
    revision = r.json()["revision"]
    assert r.headers["ETag"] == f'"{revision}"'
    stored = {
        "shadow_s": 0.0, "steps": [0.1, 1.0], "step_s": 60.0, "approval": "auto",
        "approve_each_step": False,
        "guards": {"window_s": 60.0, "min_requests": 200, "interval_s": 2.0, "confidence": 0.95,
                   "on_breach": "rollback", "max_error_ratio": 0.01},
    }  # fmt: skip
    assert r.json()["template"] == stored
    seen = client.get("/admin/routes/risk/rollout", headers=viewer)
    assert seen.status_code == 200
    assert (seen.json()["template"], seen.json()["revision"]) == (stored, revision)
    stale = {"If-Match": f'"{revision - 1}"', **operator}
    r = client.put("/admin/routes/risk/rollout", headers=stale, json={"rollout": {}, "reason": "x"})
    assert r.status_code == 412, r.text
    entries = client.get("/admin/audit?model=risk", headers=viewer).json()["entries"]
    put_entry = next(e for e in entries if e["action"] == "rollout_put")
    assert (put_entry["who"], put_entry["reason"], put_entry["after"]) == (
        "bob", "ramp new versions", stored,
    )  # fmt: skip
    # risk had no policy: the template pins the version it serves, so none takes it unasked
    until(lambda: client.get("/admin/routes/risk", headers=viewer).status_code == 200)
    route = client.get("/admin/routes/risk", headers=viewer).json()
    assert route["policy"] == {"strategy": "single", "version": "1"}
    r = client.request(
        "DELETE", "/admin/routes/risk/rollout", headers=operator, json={"reason": "done"}
    )
    assert r.status_code == 200, r.text
    assert client.get("/admin/routes/risk/rollout", headers=viewer).status_code == 404
    r = client.request(
        "DELETE", "/admin/routes/risk/rollout", headers=operator, json={"reason": "done"}
    )
    assert r.status_code == 404
    r = put(client, "no-such-model", {})
    assert r.status_code == 404 and "unknown model" in r.json()["error"]


def test_approve_and_reject_need_something_awaiting_and_reject_needs_a_reason(
    client: httpx.Client,
) -> None:
    operator = bearer(OPERATOR)
    r = client.post("/admin/routes/echo/actions/approve", headers=operator, json={})
    assert r.status_code == 409 and "nothing of model 'echo' awaits approval" in r.json()["error"]
    r = client.post("/admin/routes/echo/actions/reject", headers=operator, json={})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("reason: required to reject")
    r = client.post("/admin/routes/echo/actions/reject", headers=bearer(VIEWER), json={})
    assert r.status_code == 403 and "needs the operator role" in r.json()["error"]
    r = client.post("/admin/routes/echo/actions/approve", headers=operator, json={"why": "x"})
    assert r.status_code == 400 and r.json()["error"].startswith("why: unknown field")


def rollout_of(client: httpx.Client, model: str) -> dict[str, Any] | None:
    r = client.get(f"/admin/routes/{model}/rollout", headers=ADMIN)
    rollout: dict[str, Any] | None = r.json()["rollout"]
    return rollout


def phase(client: httpx.Client, model: str) -> str | None:
    rollout = rollout_of(client, model)
    return None if rollout is None else str(rollout["phase"])


def test_a_version_loaded_through_the_api_is_rolled_out_and_promoted_once_approved(
    client: httpx.Client, gateway: InProcessServer, demo_repo: Path, repo: Path
) -> None:
    assert put(client, "fraud", TEMPLATE).status_code == 200
    until(lambda: client.get("/admin/routes/fraud", headers=ADMIN).status_code == 200)
    assert rollout_of(client, "fraud") is None  # version 1 only: nothing to roll out
    shutil.copytree(demo_repo / "fraud" / "2", repo / "fraud" / "2")
    r = client.post("/v2/repository/models/fraud/load", headers=ADMIN, json={})
    assert r.status_code == 200, r.text
    until(lambda: phase(client, "fraud") == "awaiting_approval")
    route = client.get("/admin/routes/fraud", headers=ADMIN).json()
    assert route["policy"]["strategy"] == "canary" and route["policy"]["weight"] == 0.5
    metrics = client.get("/metrics").text
    assert 'turnout_rollout_approvals_pending{model="fraud"} 1.0' in metrics
    assert 'turnout_rollout_state{model="fraud",state="awaiting_approval"} 1.0' in metrics
    assert 'turnout_rollout_weight{model="fraud",version="2"} 0.5' in metrics
    r = client.post(
        "/admin/routes/fraud/actions/approve", headers=bearer(OPERATOR), json={"reason": "ok"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["rollout"]["decision"] == "approved"
    until(lambda: phase(client, "fraud") == "promoted")
    route = client.get("/admin/routes/fraud", headers=ADMIN).json()
    assert route["policy"] == {"strategy": "single", "version": "2"}
    entries = client.get("/admin/audit?model=fraud", headers=ADMIN).json()["entries"]
    story = [(e["who"], e["action"]) for e in reversed(entries)]
    template = client.get("/admin/routes/fraud/rollout", headers=ADMIN).json()
    rollout = f"rollout:{template['revision']}"
    assert story == [
        ("bob", "rollout_put"), (rollout, "pin"), (rollout, "rollout_start"),
        ("bob", "approve"), (rollout, "promote"),
    ]  # fmt: skip
    assert 'turnout_rollout_approvals_pending{model="fraud"} 0.0' in client.get("/metrics").text


def test_guards_that_need_the_monitors_are_refused_without_them(repo: Path) -> None:
    with (
        InProcessServer(repo, args=[*ARGS, "--no-monitors"]) as s,
        httpx.Client(base_url=s.url, timeout=30) as client,
    ):
        r = put(client, "risk", {"guards": {"max_error_ratio": 0.01, "max_p99_s": 0.1}})
        assert r.status_code == 400, r.text
        assert r.json()["error"].startswith("rollout.guards.max_p99_s: needs the inline monitors")
        assert put(client, "risk", {"guards": {"max_error_ratio": 0.01}}).status_code == 200


def test_a_rollout_on_redis_survives_the_restart_of_its_gateway(
    demo_repo: Path, tmp_path: Path, prefix: str
) -> None:
    """Template and rollout state live in Redis: a gateway that starts on the same prefix
    finds the rollout awaiting approval, takes the lease over and promotes it once approved."""
    root = tmp_path / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    args = [*ARGS, "--redis-url", "redis://127.0.0.1:6379/0", "--redis-prefix", prefix]
    with (
        InProcessServer(root, args=args) as first,
        httpx.Client(base_url=first.url, timeout=30) as client,
    ):
        r = client.put(
            "/admin/routes/fraud", headers=ADMIN,
            json={"policy": {"strategy": "single", "version": "1"}, "reason": "serve 1"},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert put(client, "fraud", TEMPLATE).status_code == 200
        until(lambda: phase(client, "fraud") == "awaiting_approval")
    with (
        InProcessServer(root, args=args) as second,
        httpx.Client(base_url=second.url, timeout=30) as client,
    ):
        rollout = rollout_of(client, "fraud")
        assert rollout is not None
        assert (rollout["phase"], rollout["version"], rollout["baseline"]) == (
            "awaiting_approval", "2", "1",
        )  # fmt: skip
        r = client.post("/admin/routes/fraud/actions/approve", headers=bearer(OPERATOR), json={})
        assert r.status_code == 200, r.text
        until(lambda: phase(client, "fraud") == "promoted")  # once the old lease lapsed
        route = client.get("/admin/routes/fraud", headers=ADMIN).json()
        assert route["policy"] == {"strategy": "single", "version": "2"}
