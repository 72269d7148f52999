"""Schemathesis against a live gateway's /openapi.json: every operation, with valid credentials
(admin token or API key) and without any. No answer is a 5xx, every answer is documented
(status, content type, headers, body schema), and authentication is enforced where declared.

Run with ``-s`` to see how many requests each operation received, by status.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from gateway.demo import sample_inputs
from gateway.http.openapi import openapi_document
from tests.support.server import ADMIN, GatewayServer, InProcessServer

# Thousands of generated requests: the schema-driven generation itself takes most of half a
# minute, whichever gateway answers. Long by design: make test runs it, make check does not.
pytestmark = pytest.mark.slow

API_KEY = "fuzz-api-key-0123456789"
BUDGET = 20  # examples per operation, credentials and kind of input
SEED = 20261122
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,  # re-sends a successful call without and with wrong credentials: must be 401
]
# Real names, so generated requests also reach the handlers behind the 404 of unknown models.
KNOWN = [{"model": m, "version": "1"} for m in ("fraud", "risk", "echo")]
# A policy, so the route, action, guard and report operations have something to act on
# (guards that only alert: nothing changes on its own during the run).
CANARY: dict[str, Any] = {
    "policy": {
        "strategy": "canary",
        "baseline": "1",
        "candidate": "2",
        "weight": 0.25,
        "guards": {"window_s": 60, "min_requests": 200, "on_breach": "alert"},
    },
    "reason": "fuzzing",
}
DOCUMENT = openapi_document(api_keys=True)
DATATYPES = {"float32": "FP32", "int64": "INT64", "bool": "BOOL"}


def infer_body(model: str, rows: int, binary_output: bool) -> dict[str, Any]:
    """A valid request, so 200 answers (JSON and binary) are checked against the schema too."""
    inputs = sample_inputs(model, rows, seed=rows)
    return {
        "id": f"fuzz-{model}-{rows}",
        "parameters": {"binary_data_output": binary_output},
        "inputs": [
            {"name": n, "shape": list(a.shape), "datatype": DATATYPES[a.dtype.name],
             "data": a.ravel().tolist()}
            for n, a in inputs.items()
        ],
    }  # fmt: skip


VALID_POLICIES = [
    CANARY,
    {"policy": {"strategy": "single", "version": "2"}, "reason": "fuzzing"},
    {"policy": {"strategy": "blue_green", "active": "2", "standby": "1"}, "reason": "fuzzing"},
    {"policy": {"strategy": "ab", "arms": {"1": 0.5, "2": 0.5}}, "reason": "fuzzing"},
]
VALID_INFER = [
    ({"model": model, "version": "1"}, infer_body(model, rows, binary))
    for model in ("fraud", "risk")
    for rows in (0, 1, 5)
    for binary in (False, True)
]


def operations() -> list[Any]:
    params = []
    for path, item in DOCUMENT["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            modes = ["valid", "none"] if "security" in op else ["open"]
            for mode in modes:
                label = f"{method.upper()} {path} {mode}"
                params.append(pytest.param(path, method, mode, id=label))
    return params


@pytest.fixture(scope="module")
def gateway(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessServer]:
    """A private gateway: the fuzzer writes policies and unloads models."""
    root = tmp_path_factory.mktemp("fuzz") / "models"
    shutil.copytree(demo_repo, root)
    with (
        InProcessServer(root, args=["--api-key", f"fuzzer={API_KEY}"]) as s,
        requests.Session() as session,
    ):
        restore(session, s.url)
        yield s


@pytest.fixture(scope="module")
def tally() -> Iterator[Counter[int]]:
    """Generated requests by status, over the module (the checks' probes not included)."""
    counts: Counter[int] = Counter()
    yield counts
    print(f"\nfuzzing: {counts.total()} generated requests, by status: {sorted(counts.items())}")


@pytest.fixture(scope="module")
def schema(gateway: GatewayServer) -> BaseSchema:
    return schemathesis.openapi.from_url(gateway.url + "/openapi.json")


def test_the_live_document_is_the_one_fuzzed(gateway: GatewayServer) -> None:
    assert requests.get(gateway.url + "/openapi.json", timeout=10).json() == DOCUMENT


def credentials(op: dict[str, Any], mode: str) -> dict[str, str] | None:
    if mode != "valid":
        return None
    if op["security"] == [{"bearer": []}]:
        return dict(ADMIN)
    return {"X-API-Key": API_KEY}


def refused(response: schemathesis.Response) -> bool:
    """Without credentials: 401, or a 404 from routing when the generated path matches no route."""
    if response.status_code == 401:
        return response.headers.get("www-authenticate") == ["Bearer"]
    return response.status_code == 404 and "no route for" in response.json()["error"]


def kinds(operation: Any, path: str, method: str) -> dict[str, st.SearchStrategy[Case[Any]]]:
    """The inputs tried on one operation, each kind with its own budget (hypothesis's one_of
    would favour some branches and starve others)."""
    out = {
        "positive": operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        "negative": operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    }
    known = [{k: v for k, v in p.items() if f"{{{k}}}" in path} for p in KNOWN if "{" in path]
    if known:
        out["known names"] = st.sampled_from(known).flatmap(
            lambda p: operation.as_strategy(path_parameters=p)
        )
    # Valid bodies, with the other parts generated, so handlers also get past validation.
    valid: list[tuple[dict[str, str], dict[str, Any]]] = []
    if path.endswith("/infer"):
        valid = [({k: v for k, v in p.items() if f"{{{k}}}" in path}, b) for p, b in VALID_INFER]
    elif path == "/admin/routes/{model}" and method == "put":
        valid = [({"model": "fraud"}, b) for b in VALID_POLICIES]
    if valid:
        out["valid bodies"] = st.sampled_from(valid).flatmap(
            lambda pb: operation.as_strategy(
                path_parameters=pb[0], body=pb[1], media_type="application/json"
            )
        )
    return out


@pytest.mark.parametrize(("path", "method", "mode"), operations())
def test_fuzz_operation(
    gateway: GatewayServer,
    schema: BaseSchema,
    tally: Counter[int],
    path: str,
    method: str,
    mode: str,
) -> None:
    operation = schema[path][method.upper()]
    headers = credentials(DOCUMENT["paths"][path][method], mode)
    statuses: Counter[tuple[str, int]] = Counter()

    def exercise(
        kind: str, strategy: st.SearchStrategy[Case[Any]], session: requests.Session
    ) -> None:
        @settings(
            max_examples=BUDGET,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],
            suppress_health_check=list(HealthCheck),
        )
        @seed(SEED)
        @given(strategy)
        def run(case: Case[Any]) -> None:
            response = case.call(base_url=gateway.url, session=session, headers=headers)
            statuses[(kind, response.status_code)] += 1
            if mode == "none":
                assert refused(response), (response.status_code, response.text)
            if response.status_code == 200 and method in ("post", "delete"):
                restore(session, gateway.url)
            case.validate_response(
                response,
                checks=CHECKS,
                headers=headers,
                transport_kwargs={"base_url": gateway.url, "session": session, "headers": headers},
            )

        try:
            run()
        except Unsatisfiable:
            # Nothing to break: no parameters, or only path strings, which any text satisfies.
            assert kind == "negative", kind

    with requests.Session() as session:
        for kind, strategy in kinds(operation, path, method).items():
            exercise(kind, strategy, session)
    for (_, status), n in statuses.items():
        tally[status] += n
    print(f"\n{method.upper()} {path} [{mode}]: {statuses.total()} requests", end="")
    for kind in dict.fromkeys(k for k, _ in statuses):
        counts = dict(sorted((c, n) for (k, c), n in statuses.items() if k == kind))
        print(f"; {kind} {counts}", end="")
    assert statuses  # every operation was called


def restore(session: requests.Session, url: str) -> None:
    """Every model loaded and the fraud canary in place, whatever the last call unloaded or
    removed, so each operation meets the same gateway."""
    index = session.post(f"{url}/v2/repository/index", headers=ADMIN, timeout=30).json()
    for model in sorted({e["name"] for e in index if e["state"] != "READY"}):
        r = session.post(f"{url}/v2/repository/models/{model}/load", headers=ADMIN, timeout=30)
        assert r.status_code == 200, r.text
    if session.get(f"{url}/admin/routes/fraud", headers=ADMIN, timeout=30).status_code == 404:
        r = session.put(f"{url}/admin/routes/fraud", headers=ADMIN, json=CANARY, timeout=30)
        assert r.status_code == 200, r.text
