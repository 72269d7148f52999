"""Security against a real gateway: admin tokens (missing, wrong, expired), API keys for
inference, path traversal through names and the repository, what reaches the log, and an audit
trail the API cannot rewrite."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton  # type: ignore[import-untyped]
from tritonclient.utils import InferenceServerException  # type: ignore[import-untyped]

from gateway.demo import sample_inputs
from gateway.errors import Unauthorized
from gateway.http.auth import TokenAuth, key_check
from gateway.http.openapi import openapi_document
from gateway.settings import Settings, SettingsError, parse_credentials
from gateway.worker import SafeFormatter
from tests.support.server import ADMIN, ADMIN_TOKEN, GatewayServer, InProcessServer, Server

RETIRED = "retired-admin-token-0123456789"  # expired in 2020
LATER = "later-admin-token-0123456789"  # expires in 2099
KEY = "client-api-key-0123456789"
STALE_KEY = "stale-api-key-0123456789"  # expired in 2020
WRONG = "wrong-secret-attempt-0123456789"
SECRETS = [ADMIN_TOKEN, RETIRED, LATER, KEY, STALE_KEY, WRONG]
WITH_KEY = {"X-API-Key": KEY}


@pytest.fixture(scope="module")
def repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("secure") / "models"
    shutil.copytree(demo_repo, root)
    return root


ARGS = [
    "--admin-token", f"retired={RETIRED}@2020-01-01T00:00:00Z",
    "--admin-token", f"later={LATER}@2099-01-01T00:00:00+00:00",
    "--api-key", f"client={KEY}",
    "--api-key", f"stale={STALE_KEY}@2020-01-01T00:00:00Z",
    "--log-level", "debug",
]  # fmt: skip


@pytest.fixture(scope="module")
def gateway(repo: Path) -> Iterator[InProcessServer]:
    with InProcessServer(repo, args=ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def logged(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same gateway as a process, for what only a process's log shows: the warnings
    ``turnout serve`` writes at start, and its log format (debug level, escaped records)."""
    root = tmp_path_factory.mktemp("secure-logged") / "models"
    shutil.copytree(demo_repo, root)
    with Server(root, args=ARGS) as s:
        yield s


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_CLIENT: list[httpx.Client] = []


@pytest.fixture(scope="module", autouse=True)
def one_client() -> Iterator[None]:
    """One HTTP client for the module's hundreds of calls: a client per call costs about
    25 ms (its TLS context), most of the module's time against an in-process gateway."""
    with httpx.Client(timeout=30) as client:
        _CLIENT.append(client)
        yield
    _CLIENT.clear()


def call(gateway: GatewayServer, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return _CLIENT[0].request(method, gateway.url + path, **kwargs)


def fraud_body(rows: int = 2, **extra: Any) -> bytes:
    x = sample_inputs("fraud", rows, seed=rows)["input"]
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    return orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}], **extra})


def unauthorized(r: httpx.Response, message: str) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json() == {"error": message}


# -- admin tokens ---------------------------------------------------------------------------------

ADMIN_CALLS = [
    (method.upper(), path.replace("{model}", "fraud").replace("{action}", "pause"))
    for path, item in openapi_document()["paths"].items()
    for method, op in item.items()
    if method != "parameters" and op.get("security") == [{"bearer": []}]
]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing bearer token"),
        (bearer(WRONG), "invalid bearer token"),
        ({"Authorization": f"Basic {ADMIN_TOKEN}"}, "expected 'Authorization: Bearer <token>'"),
        (bearer(ADMIN_TOKEN + "x"), "invalid bearer token"),
        (bearer(RETIRED), "bearer token expired"),
        (bearer(KEY), "invalid bearer token"),  # an API key is not an admin token
    ],
    ids=["missing", "wrong", "wrong-scheme", "prefix-of-longer", "expired", "api-key"],
)
def test_every_admin_call_refuses_bad_tokens(
    gateway: GatewayServer, headers: dict[str, str], message: str
) -> None:
    assert len(ADMIN_CALLS) == 19
    for method, path in ADMIN_CALLS:
        unauthorized(call(gateway, method, path, headers=headers, json={"reason": "x"}), message)


def test_a_token_before_its_expiry_works_and_is_named_in_the_audit(gateway: GatewayServer) -> None:
    policy = {"policy": {"strategy": "single", "version": "1"}, "reason": "expiry test"}
    r = call(gateway, "PUT", "/admin/routes/risk", headers=bearer(LATER), json=policy)
    assert r.status_code == 200, r.text
    audit = call(gateway, "GET", "/admin/audit?model=risk", headers=ADMIN).json()["entries"]
    assert audit[0]["who"] == "later" and audit[0]["reason"] == "expiry test"


@pytest.mark.system
def test_expired_tokens_are_named_in_a_warning_at_start(logged: Server) -> None:
    log = logged.log()
    assert "admin token 'retired' expired at 2020-01-01T00:00:00+00:00" in log
    assert "API key 'stale' expired" in log


def test_token_expiry_follows_the_clock() -> None:
    now = [datetime(2030, 1, 1, tzinfo=UTC).timestamp() - 1]
    auth = TokenAuth(
        {"a": "aaaaaaaa1", "b": "bbbbbbbb2"},
        {"a": datetime(2030, 1, 1, tzinfo=UTC)},
        clock=lambda: now[0],
    )
    assert auth.authenticate("Bearer aaaaaaaa1") == "a"
    assert auth.expired() == []
    now[0] += 1
    with pytest.raises(Unauthorized, match=r"^bearer token expired$"):
        auth.authenticate("Bearer aaaaaaaa1")
    assert auth.authenticate("Bearer bbbbbbbb2") == "b"  # no expiry: never
    with pytest.raises(Unauthorized, match=r"^invalid bearer token$"):
        auth.authenticate("Bearer aaaaaaaa")
    assert auth.expired() == ["a"]


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("ops=s3cret-token@tomorrow", "ISO 8601"),
        ("ops=s3cret-token@2026-12-31", "time zone"),
        ("ops=s3cret-token@2026-12-31T00:00:00", "time zone"),
        ("ops=s3@2026-12-31T00:00:00Z", "shorter than 8"),
    ],
)
def test_malformed_expiry_is_refused_without_the_secret(raw: str, fragment: str) -> None:
    with pytest.raises(SettingsError, match=fragment) as info:
        parse_credentials("TURNOUT_ADMIN_TOKENS", raw)
    assert "s3cret" not in str(info.value) and "TURNOUT_ADMIN_TOKENS" in str(info.value)


def test_credentials_with_expiry_survive_the_trip_to_worker_processes() -> None:
    env = {
        "TURNOUT_MODEL_REPOSITORY": "/m",
        "TURNOUT_ADMIN_TOKENS": "ops=aaaaaaaa1@2026-12-31T01:00:00+01:00,ci=bbbbbbbb2",
        "TURNOUT_API_KEYS": "app=cccccccc3@2027-01-01T00:00:00Z",
    }
    s = Settings.from_env(env)
    assert dict(s.admin_tokens) == {"ops": "aaaaaaaa1", "ci": "bbbbbbbb2"}
    assert dict(s.admin_token_expiry) == {"ops": datetime(2026, 12, 31, tzinfo=UTC)}
    assert dict(s.api_keys) == {"app": "cccccccc3"}
    assert Settings.from_env(s.to_env()) == s


# -- API keys -------------------------------------------------------------------------------------

KEYED = [
    ("GET", "/v2/models", None),
    ("GET", "/v2/models/stats", None),
    ("GET", "/v2/models/fraud", None),
    ("GET", "/v2/models/fraud/config", None),
    ("GET", "/v2/models/fraud/stats", None),
    ("GET", "/v2/models/fraud/versions/1", None),
    ("GET", "/v2/models/fraud/versions/1/config", None),
    ("GET", "/v2/models/fraud/versions/1/stats", None),
    ("GET", "/v2/models/fraud/versions/1/drift", None),
    ("POST", "/v2/models/fraud/infer", fraud_body()),
    ("POST", "/v2/models/fraud/versions/2/infer", fraud_body()),
    ("POST", "/v2/models/fraud/feedback", b'{"id": "nope", "reward": 1}'),
]
OPEN = [
    "/v2/health/live",
    "/v2/health/ready",
    "/v2",
    "/metrics",
    "/openapi.json",
    "/v2/models/fraud/ready",
    "/v2/models/fraud/versions/1/ready",
]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key: send 'X-API-Key: <key>' or 'Authorization: Bearer <key>'"),
        ({"X-API-Key": WRONG}, "invalid API key"),
        (bearer(WRONG), "invalid API key"),
        ({"X-API-Key": STALE_KEY}, "API key expired"),
        ({"X-API-Key": ADMIN_TOKEN}, "invalid API key"),  # an admin token is not an API key
        ({"X-API-Key": WRONG, **bearer(KEY)}, "invalid API key"),  # X-API-Key wins
    ],
    ids=["missing", "wrong", "wrong-bearer", "expired", "admin-token", "both"],
)
def test_inference_needs_a_valid_key(
    gateway: GatewayServer, headers: dict[str, str], message: str
) -> None:
    for method, path, body in KEYED:
        unauthorized(call(gateway, method, path, headers=headers, content=body), message)


@pytest.mark.parametrize("headers", [WITH_KEY, bearer(KEY)], ids=["x-api-key", "bearer"])
def test_a_valid_key_in_either_header_is_let_in(
    gateway: GatewayServer, headers: dict[str, str]
) -> None:
    for method, path, body in KEYED:
        r = call(gateway, method, path, headers=headers, content=body)
        expected = 404 if path.endswith("feedback") else 200  # an unknown id, past the check
        assert r.status_code == expected, (path, r.text)


def request_series(gateway: GatewayServer) -> dict[tuple[str, ...], float]:
    """Every ``turnout_requests_total`` and in-flight sample, by metric and labels."""
    found = {}
    for line in call(gateway, "GET", "/metrics").text.splitlines():
        m = re.fullmatch(r"(turnout_requests_total|turnout_requests_in_flight)\{(.*)\} (\S+)", line)
        if m:
            found[(m.group(1), *sorted(re.findall(r'\w+="[^"]*"', m.group(2))))] = float(m.group(3))
    return found


def test_model_names_from_urls_never_become_label_values(gateway: GatewayServer) -> None:
    before = request_series(gateway)
    for i in range(2_000):  # a bogus name per request, keyed and anonymous
        headers = WITH_KEY if i % 2 else {}
        r = call(gateway, "POST", f"/v2/models/bogus-{i}/infer", headers=headers, content=b"{}")
        assert r.status_code == (404 if i % 2 else 401), r.text
    after = request_series(gateway)
    assert not [k for k in after if any("bogus" in label for label in k)]
    # the keyed 1,000 land in one bucket; the refused 1,000 were never counted
    added = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    unknown = ("turnout_requests_total", 'code="404"', 'model="_unknown"')
    assert {k: v for k, v in added.items() if k[0] == "turnout_requests_total"} == {
        (*unknown, 'role="unknown"', 'version=""'): 1_000.0
    }


def test_a_refused_request_counts_nothing(gateway: GatewayServer) -> None:
    before = request_series(gateway)
    for _ in range(50):
        r = call(gateway, "POST", "/v2/models/fraud/infer", content=fraud_body())
        assert r.status_code == 401, r.text
    assert request_series(gateway) == before


def test_health_and_server_metadata_stay_open(gateway: GatewayServer) -> None:
    for path in OPEN:
        assert call(gateway, "GET", path).status_code == 200, path


def test_tritonclient_sends_its_key_as_a_header(gateway: GatewayServer) -> None:
    client = triton.InferenceServerClient(gateway.url.removeprefix("http://"))
    x = sample_inputs("fraud", 3, seed=5)["input"]
    sent = triton.InferInput("input", list(x.shape), "FP32")
    sent.set_data_from_numpy(x, binary_data=True)
    result = client.infer("fraud", [sent], headers=dict(WITH_KEY))  # it adds to the dict
    assert result.as_numpy("probability").shape == (3, 1)
    with pytest.raises(InferenceServerException, match="missing API key"):
        client.infer("fraud", [sent])
    client.close()


def test_the_key_check_is_open_without_keys_and_reads_either_header() -> None:
    assert key_check({}).check({}) is None
    keys = key_check({"app": "aaaaaaaa1"})
    assert keys.check({"x-api-key": "aaaaaaaa1"}) == "app"
    assert keys.check({"authorization": "Bearer aaaaaaaa1"}) == "app"
    with pytest.raises(Unauthorized, match="invalid API key"):
        keys.check({"x-api-key": "\ud800 not even text"})


# -- path traversal -------------------------------------------------------------------------------

TRAVERSALS = [
    "%2e%2e",
    "%2E%2E%2Fetc",
    "..%2f..%2fetc%2fpasswd",
    "%2e%2e%5c%2e%2e%5cwindows",
    "%E2%80%A4%E2%80%A4",  # U+2024 ONE DOT LEADER twice
    "%EF%BC%8E%EF%BC%8E",  # U+FF0E FULLWIDTH FULL STOP twice
    "%2Fetc%2Fpasswd",
    "fraud%00",
    "~root",
    ".",
    "...",
    "fraud%2F..%2F..%2Frisk",
]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_encoded_traversal_in_a_model_name_goes_nowhere(gateway: GatewayServer, name: str) -> None:
    calls = [
        ("POST", f"/v2/repository/models/{name}/load", ADMIN, None),
        ("POST", f"/v2/repository/models/{name}/unload", ADMIN, None),
        ("GET", f"/v2/models/{name}", WITH_KEY, None),
        ("GET", f"/v2/models/{name}/ready", WITH_KEY, None),
        ("POST", f"/v2/models/{name}/infer", WITH_KEY, fraud_body()),
        ("POST", f"/v2/models/fraud/versions/{name}/infer", WITH_KEY, fraud_body()),
    ]
    for method, path, headers, body in calls:
        r = call(gateway, method, path, headers=headers, content=body)
        if r.request.url.path == "/v2/models":  # the client removed "/." (RFC 3986, 5.2.4)
            assert r.json() == {"models": ["echo", "fraud", "risk"]}  # the listing, no more
            continue
        assert r.status_code in (400, 404, 405), (path, r.status_code, r.text)
        assert list(r.json()) == ["error"]
        assert "root:" not in r.text


@pytest.mark.parametrize(
    "versions", [["../1"], ["1/../2"], ["/etc"], ["%2e%2e"], ["１"], ["0"], ["-1"], ["1\x00"]]
)
def test_versions_in_repository_calls_are_plain_numbers(
    gateway: GatewayServer, versions: list[str]
) -> None:
    body = {"parameters": {"versions": versions}}
    r = call(gateway, "POST", "/v2/repository/models/fraud/load", headers=ADMIN, json=body)
    assert r.status_code == 400 and "versions are positive integers" in r.json()["error"], r.text


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    """A valid model version outside the repository, for symlinks to point at."""
    root = tmp_path_factory.mktemp("outside")
    shutil.copytree(demo_repo / "risk" / "1", root / "risk-copy")
    shutil.copytree(demo_repo / "risk" / "1", root / "model" / "1")
    return root


def test_a_version_folder_linked_outside_the_repository_is_refused(
    gateway: GatewayServer, repo: Path, outside: Path
) -> None:
    (repo / "risk" / "7").symlink_to(outside / "risk-copy", target_is_directory=True)
    body = {"parameters": {"versions": ["7"]}}
    r = call(gateway, "POST", "/v2/repository/models/risk/load", headers=ADMIN, json=body)
    assert r.status_code == 400 and "outside the repository" in r.json()["error"], r.text
    r = call(gateway, "GET", "/v2/models/risk/versions/7/ready")
    assert r.status_code in (404, 503), r.text


def test_a_model_folder_linked_outside_the_repository_is_refused(
    gateway: GatewayServer, repo: Path, outside: Path
) -> None:
    (repo / "linked").mkdir()
    (repo / "linked" / "1").symlink_to(outside / "risk-copy", target_is_directory=True)
    (repo / "elsewhere").symlink_to(outside / "model", target_is_directory=True)
    for model in ("linked", "elsewhere"):
        r = call(gateway, "POST", f"/v2/repository/models/{model}/load", headers=ADMIN)
        assert r.status_code == 400 and "outside the repository" in r.json()["error"], r.text
        assert call(gateway, "GET", f"/v2/models/{model}/ready").status_code != 200


def test_a_refused_version_is_reported_failed(
    gateway: GatewayServer, repo: Path, outside: Path
) -> None:
    (repo / "risk" / "6").symlink_to(outside / "risk-copy", target_is_directory=True)
    body = {"parameters": {"versions": ["6"]}}
    call(gateway, "POST", "/v2/repository/models/risk/load", headers=ADMIN, json=body)
    index = call(gateway, "POST", "/v2/repository/index", headers=ADMIN).json()
    (entry,) = [e for e in index if (e["name"], e["version"]) == ("risk", "6")]
    assert entry["state"] == "FAILED" and "outside the repository" in entry["reason"]


def test_a_model_file_linked_outside_the_repository_is_refused(
    gateway: GatewayServer, repo: Path, outside: Path
) -> None:
    folder = repo / "risk" / "8"
    folder.mkdir()
    for item in (outside / "risk-copy").iterdir():
        (folder / item.name).symlink_to(item)
    body = {"parameters": {"versions": ["8"]}}
    r = call(gateway, "POST", "/v2/repository/models/risk/load", headers=ADMIN, json=body)
    assert r.status_code == 400 and "links outside the model repository" in r.text, r.text


# -- logs -----------------------------------------------------------------------------------------

FORGED = "\n2026-01-01 00:00:00,000 turnout CRITICAL forged line\x1b[31m\x9b2J\u2028red\r"
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+ (DEBUG|INFO|WARNING|ERROR) ")


@pytest.mark.system
def test_client_values_reach_the_log_escaped_and_secrets_never(logged: Server) -> None:
    """Debug logging on: request ids, paths and failed credentials are sent with newlines,
    ANSI escapes and Unicode line separators; the log keeps one record per line."""
    r = call(logged, "POST", "/v2/models/fraud/infer", headers=WITH_KEY,
             content=fraud_body(id=FORGED))  # fmt: skip
    assert r.status_code == 200 and r.json()["id"] == FORGED  # echoed in JSON, escaped there
    r = call(logged, "POST", "/v2/models/fraud/feedback", headers=WITH_KEY,
             json={"id": FORGED, "reward": 1})  # fmt: skip
    assert r.status_code == 404  # an unknown id: logged at debug with its message
    for path in ["/admin/routes/%1b[31mx%0a", "/admin/audit"]:
        call(logged, "GET", path, headers=bearer(WRONG))
        call(logged, "GET", path, headers=bearer(RETIRED))
    call(logged, "POST", "/v2/models/fraud/infer", headers={"X-API-Key": WRONG})
    call(logged, "POST", "/v2/models/fraud/infer", headers=bearer(STALE_KEY))
    call(logged, "GET", "/admin/routes", headers=ADMIN)

    log = logged.log()
    assert "\\x1b[31m" in log and "\\n2026-01-01" in log  # the values were logged, escaped
    assert "refused GET /admin/routes/\\x1b[31mx" in log
    for raw in ["\x1b", "\x9b", "\u2028", "\r"]:
        assert raw not in log, repr(raw)
    for line in log.splitlines():
        assert LINE.match(line), line  # no forged or continuation lines
    for secret in SECRETS:
        assert secret not in log


def test_the_formatter_keeps_one_record_per_line() -> None:
    formatter = SafeFormatter("%(levelname)s %(message)s")
    try:
        raise ValueError("bad\nvalue\x1b[0m")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "t", logging.ERROR, __file__, 1, "id %s", ("a\nb\x00\x7f\x85\u2029",), exc_info
    )
    text = formatter.format(record)
    assert "\n" not in text and "\x1b" not in text
    assert text.startswith("ERROR id a\\nb\\x00\\x7f\\x85\\u2029\\nTraceback")
    assert text.endswith("ValueError: bad\\nvalue\\x1b[0m")


# -- audit trail ----------------------------------------------------------------------------------


def audit(gateway: GatewayServer) -> list[dict[str, Any]]:
    """The whole trail, page after page."""
    entries: list[dict[str, Any]] = []
    query = "?limit=1000"
    while True:
        r = call(gateway, "GET", "/admin/audit" + query, headers=ADMIN)
        assert r.status_code == 200, r.text
        entries += r.json()["entries"]
        if r.json()["next"] is None:
            return entries
        query = f"?limit=1000&cursor={r.json()['next']}"


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_the_audit_trail_has_no_write_method(gateway: GatewayServer, method: str) -> None:
    before = audit(gateway)
    for path in ["/admin/audit", "/admin/audit?model=fraud"]:
        r = call(gateway, method, path, headers=ADMIN, json={"entries": [], "reason": "x"})
        assert r.status_code == 405, r.text
        assert set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
        assert "error" in r.json()
    r = call(gateway, method, "/admin/audit/1", headers=ADMIN, json={"reason": "x"})
    assert r.status_code == 404
    assert audit(gateway) == before


def test_entries_stay_identical_through_every_other_admin_call(gateway: GatewayServer) -> None:
    canary = {"strategy": "canary", "baseline": "1", "candidate": "2", "weight": 0.05}
    r = call(gateway, "PUT", "/admin/routes/fraud", headers=ADMIN,
             json={"policy": canary, "reason": "start"})  # fmt: skip
    assert r.status_code == 200, r.text
    seen = audit(gateway)
    reason = {"reason": "audit test"}
    calls: list[tuple[str, str, dict[str, str], Any]] = [
        ("GET", "/admin/routes", ADMIN, None),
        ("GET", "/admin/routes/fraud", ADMIN, None),
        ("GET", "/admin/routes/fraud/report", ADMIN, None),
        ("GET", "/admin/routes/fraud/guards", ADMIN, None),
        ("PUT", "/admin/routes/fraud?dry_run=true", ADMIN, {"policy": canary, "reason": "dry"}),
        ("PUT", "/admin/routes/fraud", {**ADMIN, "If-Match": '"1"'}, {"policy": canary, **reason}),
        ("POST", "/admin/routes/fraud/actions/pause", ADMIN, reason),
        ("POST", "/admin/routes/fraud/actions/advance", ADMIN, reason),  # paused: 409
        ("POST", "/admin/routes/fraud/actions/resume", ADMIN, reason),
        ("POST", "/admin/routes/fraud/actions/advance", ADMIN, reason),
        ("POST", "/admin/routes/fraud/actions/promote", bearer(RETIRED), reason),  # 401
        ("DELETE", "/admin/routes/fraud", bearer(WRONG), reason),  # 401
        ("POST", "/v2/repository/index", ADMIN, None),
        ("POST", "/v2/repository/models/fraud/load", ADMIN, {"parameters": {"versions": ["2"]}}),
        ("POST", "/v2/repository/models/fraud/unload", ADMIN, None),  # named by the policy: 409
        ("POST", "/admin/routes/fraud/actions/rollback", ADMIN, reason),
        ("DELETE", "/admin/routes/fraud", ADMIN, reason),
    ]
    for method, path, headers, body in calls:
        r = call(gateway, method, path, headers=headers, json=body)
        assert r.status_code < 500, (path, r.text)
        now = audit(gateway)
        assert now[len(now) - len(seen) :] == seen, (method, path)  # newest first: old at the end
        added = now[: len(now) - len(seen)]
        assert all(e["revision"] > seen[0]["revision"] for e in added)
        writes = method != "GET" and path.startswith("/admin/") and "dry_run" not in path
        assert len(added) == (1 if writes and r.status_code == 200 else 0), (path, r.text)
        seen = now
    assert [e["action"] for e in seen[:5]] == ["delete", "rollback", "advance", "resume", "pause"]


def test_audit_entries_are_unchanged_by_reads_with_odd_parameters(gateway: GatewayServer) -> None:
    before = audit(gateway)
    for query in ["?limit=1", "?model=fraud", "?model=%00", "?limit=0", "?revision=1&delete=1"]:
        call(gateway, "GET", "/admin/audit" + query, headers=ADMIN)
    assert audit(gateway) == before
    assert np.all(np.diff([e["revision"] for e in before]) < 0)  # newest first, no gaps filled
