"""Access roles against a real gateway: each role on each admin route (the REQUIRED table), model
scopes, ``name=token`` as an unscoped admin, start-up errors for bad configuration, and feedback
keys that an API key cannot stand in for."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.routing import Route

from gateway.app import create_app
from gateway.cli import main, serve_settings
from gateway.demo import sample_inputs
from gateway.http.access import REQUIRED, AdminRoute
from gateway.http.openapi import openapi_document
from gateway.settings import ROLES, Grant, Settings, SettingsError
from tests.support.server import ADMIN, InProcessServer

OPS = "ops-old-syntax-token-0123"  # NAME=TOKEN, as configured before roles: an unscoped admin
TOKENS = {
    "viewer": "viewer-token-0123456789",
    "operator": "operator-token-0123456789",
    "admin": "admin-token-0123456789ab",
}
FRAUD_OPERATOR = "fraud-operator-token-0123"  # operator, for fraud only
FRAUD_ADMIN = "fraud-admin-token-01234567"  # admin, for fraud and echo
KEY = "client-api-key-0123456789"
FEEDBACK = "scorer-feedback-key-0123456"

ARGS = [
    "--admin-token", f"ops={OPS}",
    "--admin-token", f"alice:viewer={TOKENS['viewer']}",
    "--admin-token", f"bob:operator={TOKENS['operator']}@2099-01-01T00:00:00Z",
    "--admin-token", f"carol:admin={TOKENS['admin']}",
    "--admin-token", f"dora:operator:fraud={FRAUD_OPERATOR}",
    "--admin-token", f"erin:admin:fraud+echo={FRAUD_ADMIN}",
]  # fmt: skip


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("roles") / "models"
    shutil.copytree(demo_repo, root)
    return root


@pytest.fixture(scope="module")
def gateway(repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(repo, args=ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def client(gateway: InProcessServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as c:
        yield c


def concrete(path: str, model: str = "fraud") -> str:
    return path.replace("{model}", model).replace("{version}", "1").replace("{action}", "pause")


# Bodies that every handler refuses with 400 once access is granted: a granted call changes
# nothing, so each role meets each route in any order.
INVALID = {
    ("PUT", "/admin/routes/{model}"): {"policy": {"strategy": "single", "version": "1"}},
    ("DELETE", "/admin/routes/{model}"): {},
    ("POST", "/admin/routes/{model}/actions/{action}"): {},
    ("POST", "/v2/repository/index"): {"ready": "yes"},
    ("POST", "/v2/repository/models/{model}/load"): {"parameters": {"versions": []}},
    ("POST", "/v2/repository/models/{model}/unload"): {"parameters": {"versions": []}},
}


@pytest.mark.parametrize("role", [*ROLES, "old-syntax"])
def test_each_role_against_each_admin_route(client: httpx.Client, role: str) -> None:
    token = OPS if role == "old-syntax" else TOKENS[role]
    held = "admin" if role == "old-syntax" else role
    for (method, path), needed in REQUIRED.items():
        r = client.request(
            method, concrete(path), headers=bearer(token), json=INVALID.get((method, path))
        )
        if ROLES.index(held) >= ROLES.index(needed):
            assert r.status_code not in (401, 403), (role, method, path, r.text)
            assert r.status_code < 500, (role, method, path, r.text)
        else:
            assert r.status_code == 403, (role, method, path, r.text)
            assert f"needs the {needed} role" in r.json()["error"], r.text
            assert f"is a {held}" in r.json()["error"], r.text


def test_an_operator_changes_routing_and_the_audit_names_the_token(client: httpx.Client) -> None:
    canary = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.1}
    body = {"policy": canary, "reason": "roles test"}
    r = client.put("/admin/routes/fraud", headers=bearer(FRAUD_OPERATOR), json=body)
    assert r.status_code == 200, r.text
    r = client.post("/admin/routes/fraud/actions/advance", headers=bearer(TOKENS["operator"]),
                    json={"reason": "roles test"})  # fmt: skip
    assert r.status_code == 200, r.text
    seen = client.get("/admin/routes/fraud", headers=bearer(TOKENS["viewer"]))
    assert seen.status_code == 200 and seen.json()["policy"]["weight"] > 0.1
    reason = {"reason": "roles test"}
    viewer = bearer(TOKENS["viewer"])
    r = client.request("DELETE", "/admin/routes/fraud", headers=viewer, json=reason)
    assert r.status_code == 403 and "needs the operator role" in r.json()["error"]
    r = client.request("DELETE", "/admin/routes/fraud", headers=ADMIN, json=reason)
    assert r.status_code == 200, r.text
    entries = client.get("/admin/audit?model=fraud", headers=bearer(FRAUD_OPERATOR)).json()
    # The audit trail records the token's bare name: never its role or scope.
    assert [e["who"] for e in entries["entries"][:3]] == ["tester", "bob", "dora"]


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "/admin/routes/risk", "token 'dora' may not act on model 'risk': scoped to fraud"),
        ("PUT", "/admin/routes/risk", "token 'dora' may not act on model 'risk'"),
        ("POST", "/admin/routes/risk/actions/pause", "may not act on model 'risk'"),
        ("GET", "/admin/routes/risk/report", "may not act on model 'risk'"),
        ("GET", "/admin/routes/no-such-model/guards", "may not act on model 'no-such-model'"),
        ("GET", "/admin/audit?model=risk", "may not act on model 'risk'"),
        ("GET", "/admin/routes", "GET /admin/routes is not about one model: it needs an unscoped"),
        ("GET", "/admin/audit", "GET /admin/audit is not about one model"),
        ("POST", "/v2/repository/index", "POST /v2/repository/index is not about one model"),
    ],
)
def test_a_model_scoped_token_acts_on_its_models_only(
    client: httpx.Client, method: str, path: str, message: str
) -> None:
    r = client.request(method, path, headers=bearer(FRAUD_OPERATOR), json={"reason": "scope"})
    assert r.status_code == 403, r.text
    assert message in r.json()["error"]


def test_a_scoped_token_is_let_in_on_its_models(client: httpx.Client) -> None:
    for method, path in [
        ("GET", "/admin/routes/fraud/guards"),
        ("GET", "/admin/audit?model=fraud"),
        ("POST", "/admin/routes/fraud/actions/pause"),  # no reason: 400, past access
    ]:
        r = client.request(method, path, headers=bearer(FRAUD_OPERATOR), json={})
        assert r.status_code not in (401, 403), (path, r.text)
    # A role is checked before the scope: the operator cannot load even its own model.
    r = client.post("/v2/repository/models/fraud/load", headers=bearer(FRAUD_OPERATOR))
    assert r.status_code == 403 and "needs the admin role" in r.json()["error"]
    # A scoped admin loads its models, and only them.
    empty: dict[str, Any] = {"parameters": {"versions": []}}
    ok = client.post("/v2/repository/models/echo/load", headers=bearer(FRAUD_ADMIN), json=empty)
    assert ok.status_code == 400 and "versions" in ok.json()["error"], ok.text
    no = client.post("/v2/repository/models/risk/unload", headers=bearer(FRAUD_ADMIN), json=empty)
    assert no.status_code == 403 and "may not act on model 'risk'" in no.json()["error"]


def test_unknown_and_expired_tokens_are_still_401(repo: Path) -> None:
    args = [*ARGS, "--admin-token", "old:operator=retired-token-0123456@2020-01-01T00:00:00Z"]
    with InProcessServer(repo, args=args) as s:
        for token, message in [("retired-token-0123456", "bearer token expired"),
                               ("never-issued-0123456", "invalid bearer token")]:  # fmt: skip
            r = httpx.get(s.url + "/admin/routes/fraud", headers=bearer(token))
            assert r.status_code == 401 and r.json() == {"error": message}


# -- the table covers every admin route -------------------------------------------------------


def test_every_admin_route_of_the_app_has_its_role_in_the_table(repo: Path) -> None:
    app = create_app(Settings(repo, admin_tokens={"t": "tttttttt1"}))
    routes = [r for r in app.routes if isinstance(r, Route)]
    admin = {r.key for r in routes if isinstance(r, AdminRoute)}
    assert admin == set(REQUIRED)
    # Every route that takes an admin token is an AdminRoute: the API has no other way in.
    for r in routes:
        assert isinstance(r, AdminRoute) or not r.path.startswith(("/admin", "/v2/repository"))


def test_only_the_routes_in_the_table_ask_for_an_admin_token(
    gateway: InProcessServer, client: httpx.Client
) -> None:
    """Called without credentials, a route answers 'missing bearer token' if and only if it is
    in REQUIRED: a route that checked an admin token any other way would show up here."""
    app = create_app(Settings(gateway.repository))
    for route in (r for r in app.routes if isinstance(r, Route)):
        for method in sorted((route.methods or set()) - {"HEAD"}):
            r = client.request(method, concrete(route.path), content=b"{}")
            asks = r.status_code == 401 and r.json() == {"error": "missing bearer token"}
            assert asks == ((method, route.path) in REQUIRED), (method, route.path, r.text)
            assert r.status_code < 500, (method, route.path, r.text)


def test_the_openapi_document_names_each_routes_role() -> None:
    paths = openapi_document()["paths"]
    for (method, path), role in REQUIRED.items():
        op = paths[path][method.lower()]
        assert op["x-turnout-role"] == role and "403" in op["responses"]


# -- configuration ---------------------------------------------------------------------------


def test_name_equals_token_is_an_unscoped_admin_and_roles_survive_to_workers() -> None:
    raw = "ops=aaaaaaaa1,v:viewer=bbbbbbbb2@2099-01-01T00:00:00Z,f:operator:fraud+risk=cccccccc3"
    s = Settings.from_env({"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_ADMIN_TOKENS": raw})
    assert dict(s.admin_tokens) == {"ops": "aaaaaaaa1", "v": "bbbbbbbb2", "f": "cccccccc3"}
    assert dict(s.admin_token_grants) == {
        "v": Grant("viewer"),
        "f": Grant("operator", frozenset({"fraud", "risk"})),
    }
    assert set(s.admin_token_expiry) == {"v"}
    assert Settings.from_env(s.to_env()) == s


SECRET = "s3cret-token-value"


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (f"ops:root={SECRET}", "the role of 'ops' must be one of viewer, operator, admin (got 'ro"),
        (f"ops:={SECRET}", "the role of 'ops' must be one of viewer, operator, admin (got '')"),
        (f":viewer={SECRET}", "an entry ':viewer' has no token name before ':'"),
        (f"ops:viewer:={SECRET}", "the models of 'ops' must be names joined by '+'"),
        (f"ops:viewer:fraud++risk={SECRET}", "(got 'fraud++risk')"),
        (f"ops:viewer:fraud:risk={SECRET}", "(got 'fraud:risk')"),
        (f"ops:viewer={SECRET},ops:admin={SECRET}x", "token name 'ops' given twice"),
    ],
)
def test_bad_roles_and_scopes_fail_at_start_naming_the_setting(entry: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as env_error:
        Settings.from_env({"TURNOUT_MODEL_REPOSITORY": "/m", "TURNOUT_ADMIN_TOKENS": entry})
    assert str(env_error.value).startswith("TURNOUT_ADMIN_TOKENS: ")
    assert fragment in str(env_error.value) and SECRET not in str(env_error.value)
    flags = [f for e in entry.split(",") for f in ("--admin-token", e)]
    with pytest.raises(SettingsError) as flag_error:
        serve_settings(["--model-repository", "/m", *flags], {})
    # Each flag is checked on its own, then all together: a name given twice in two flags is
    # found in the joined variable.
    prefix = "TURNOUT_ADMIN_TOKENS: " if "," in entry else "--admin-token: "
    assert str(flag_error.value).startswith(prefix) and fragment in str(flag_error.value)


def test_turnout_serve_refuses_a_bad_role_before_it_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--model-repository", "/m", "--admin-token", "ops:boss=aaaaaaaa1"]) == 2
    err = capsys.readouterr().err
    assert "turnout: --admin-token: the role of 'ops' must be one of" in err
    assert "aaaaaaaa1" not in err
    code = main(["serve", "--model-repository", "/m", "--feedback-key", "scorer=short"])
    assert code == 2
    assert "--feedback-key: the token for 'scorer' is shorter than 8 characters" in (
        capsys.readouterr().err
    )


# -- feedback keys ---------------------------------------------------------------------------


def fraud_request() -> bytes:
    x = sample_inputs("fraud", 1, seed=1)["input"]
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})


def served_id(base: str, headers: dict[str, str]) -> str:
    r = httpx.post(base + "/v2/models/fraud/infer", content=fraud_request(), headers=headers)
    assert r.status_code == 200, r.text
    request_id: str = r.json()["id"]
    return request_id


def ab_policy(base: str) -> None:
    policy: dict[str, Any] = {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}}
    r = httpx.put(base + "/admin/routes/fraud", headers=ADMIN,
                  json={"policy": policy, "reason": "feedback keys"})  # fmt: skip
    assert r.status_code == 200, r.text


def test_feedback_keys_replace_api_keys_for_feedback(repo: Path) -> None:
    args = ["--api-key", f"client={KEY}", "--feedback-key", f"scorer={FEEDBACK}"]
    with InProcessServer(repo, args=args) as s:
        ab_policy(s.url)
        request_id = served_id(s.url, {"X-API-Key": KEY})
        url = s.url + "/v2/models/fraud/feedback"
        body = {"id": request_id, "reward": 1.0}
        for headers, message in [
            ({"X-API-Key": KEY}, "invalid feedback key"),  # an API key is not enough
            (bearer(KEY), "invalid feedback key"),
            ({}, "missing feedback key: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'"),
            (ADMIN, "invalid feedback key"),
        ]:
            r = httpx.post(url, json=body, headers=headers)
            assert r.status_code == 401 and r.json() == {"error": message}, r.text
        ok = httpx.post(url, json=body, headers={"X-API-Key": FEEDBACK})
        assert ok.status_code == 200, ok.text
        # A feedback key is for feedback only: it does not open inference.
        r = httpx.post(s.url + "/v2/models/fraud/infer", content=fraud_request(),
                       headers={"X-API-Key": FEEDBACK})  # fmt: skip
        assert r.status_code == 401 and r.json() == {"error": "invalid API key"}
        document = httpx.get(s.url + "/openapi.json").json()
        assert document["paths"]["/v2/models/{model}/feedback"]["post"]["security"]


def test_feedback_keys_alone_leave_inference_open(repo: Path) -> None:
    with InProcessServer(repo, args=["--feedback-key", f"scorer={FEEDBACK}"]) as s:
        ab_policy(s.url)
        request_id = served_id(s.url, {})
        url = s.url + "/v2/models/fraud/feedback"
        refused = httpx.post(url, json={"id": request_id, "reward": 0.0})
        assert refused.status_code == 401, refused.text
        ok = httpx.post(url, json={"id": request_id, "reward": 0.0}, headers=bearer(FEEDBACK))
        assert ok.status_code == 200, ok.text


def test_without_feedback_keys_feedback_takes_an_api_key(repo: Path) -> None:
    with InProcessServer(repo, args=["--api-key", f"client={KEY}"]) as s:
        ab_policy(s.url)
        request_id = served_id(s.url, {"X-API-Key": KEY})
        url = s.url + "/v2/models/fraud/feedback"
        refused = httpx.post(url, json={"id": request_id, "reward": 1.0})
        assert refused.status_code == 401 and "missing API key" in refused.json()["error"]
        ok = httpx.post(url, json={"id": request_id, "reward": 1.0}, headers={"X-API-Key": KEY})
        assert ok.status_code == 200, ok.text
