"""The inference path in front of starlette (gateway.http.inference): it must answer exactly what
the starlette routes would, and account for every request."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import httpx
import orjson
from hypothesis import given
from hypothesis import strategies as st
from starlette.datastructures import Headers
from starlette.routing import Match, Route

from gateway.app import create_app
from gateway.demo import sample_inputs
from gateway.http.inference import RequestHeaders, infer_target
from gateway.settings import Settings
from tests.support.load import metric_sum
from tests.support.server import GatewayServer, until

ROUTES = [
    Route("/v2/models/{model}/infer", lambda r: None, methods=["POST"]),
    Route("/v2/models/{model}/versions/{version}/infer", lambda r: None, methods=["POST"]),
]
SEGMENTS = st.sampled_from(["v2", "models", "versions", "infer", "fraud", "1", "", "a b", "é"])


def starlette_target(path: str) -> tuple[str, str | None] | None:
    scope = {"type": "http", "method": "POST", "path": path, "root_path": ""}
    for route in ROUTES:
        match, child = route.matches(scope)
        if match is Match.FULL:
            params = child["path_params"]
            return params["model"], params.get("version")
    return None


@given(st.lists(SEGMENTS, max_size=7))
def test_the_front_recognises_exactly_the_paths_starlette_routes_to_inference(
    segments: list[str],
) -> None:
    path = "/" + "/".join(segments)
    assert infer_target(path) == starlette_target(path)


NAMES = st.sampled_from(
    [
        "Content-Length",
        "content-length",
        "X-Turnout-Version",
        "inference-header-content-length",
        "Host",
    ]
)


@given(st.lists(st.tuples(NAMES, st.text(max_size=3)), max_size=6), NAMES)
def test_request_headers_get_answers_as_starlette_headers(
    pairs: list[tuple[str, str]], key: str
) -> None:
    raw = [(n.lower().encode(), v.encode("utf-8")) for n, v in pairs]
    for asked in (key, key.upper()):
        got = RequestHeaders(scope={"headers": raw}).get(asked, "absent")
        assert got == Headers(scope={"headers": raw}).get(asked, "absent")


def fraud_body() -> bytes:
    (row,) = sample_inputs("fraud", 1, seed=3).values()
    tensor = {"name": "input", "shape": list(row.shape), "datatype": "FP32", "data": row.tolist()}
    return orjson.dumps({"id": "same", "inputs": [tensor]})


def test_behind_a_root_path_the_starlette_route_serves_the_same_answer(demo_repo: Path) -> None:
    # A root_path sends requests through starlette's router instead of the front.
    app = create_app(Settings(model_repository=demo_repo))

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with app.router.lifespan_context(app):
            while not app.state.endpoints.registry.started:
                await asyncio.sleep(0.05)
            front = httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t")
            routed = httpx.AsyncClient(
                transport=httpx.ASGITransport(app, root_path="/gw"), base_url="http://t"
            )
            async with front, routed:
                direct = await front.post("/v2/models/fraud/versions/2/infer", content=fraud_body())
                via = await routed.post(
                    "/gw/v2/models/fraud/versions/2/infer", content=fraud_body()
                )
                wrong = await routed.post("/gw/v2/models/fraud/versions/9/infer", content=b"{}")
        return direct, via, wrong

    direct, via, wrong = asyncio.run(run())
    assert direct.status_code == via.status_code == 200
    assert direct.json() == via.json()
    assert direct.headers["content-type"] == via.headers["content-type"] == "application/json"
    assert wrong.status_code == 404 and "version '9'" in wrong.json()["error"]


def test_other_methods_on_an_inference_path_are_405_in_the_protocol_format(
    server: GatewayServer,
) -> None:
    r = httpx.get(server.url + "/v2/models/fraud/infer")
    assert r.status_code == 405
    assert "GET /v2/models/fraud/infer" in r.json()["error"]


def test_a_client_that_leaves_mid_body_is_counted_apart_from_failures(
    server: GatewayServer,
) -> None:
    def counted(code: str) -> float:
        return metric_sum(server.url, "turnout_requests_total", model="fraud", code=code)

    before_closed, before_failed = counted("499"), counted("500")
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v2/models/fraud/infer HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"inputs": ['
        )
        # the gateway is now waiting for the rest of the body
        until(lambda: metric_sum(server.url, "turnout_requests_in_flight", model="fraud") == 1)
    until(lambda: counted("499") != before_closed)  # the abandoned request is counted
    assert counted("499") == before_closed + 1
    assert counted("500") == before_failed
    # and the gateway serves the next request as usual
    after = httpx.post(server.url + "/v2/models/fraud/infer", content=fraud_body())
    assert after.status_code == 200
