"""Repository extension: index, load and unload under traffic, failed versions, auth."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from gateway.demo import sample_inputs
from tests.support.server import ADMIN, GatewayServer, InProcessServer


@pytest.fixture
def repo(demo_repo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo repository, with one deliberately broken version."""
    root = tmp_path / "models"
    shutil.copytree(demo_repo, root, ignore=shutil.ignore_patterns("echo", "risk"))
    broken = root / "fraud" / "7"
    broken.mkdir()
    (broken / "model.onnx").write_bytes(b"this is not an onnx model")
    (root / ".hidden").mkdir()
    (root / "notes.txt").write_text("ignored")
    return root


@pytest.fixture
def gateway(repo: Path) -> Iterator[InProcessServer]:
    """A fresh gateway per test: the tests load, unload and break versions."""
    with InProcessServer(repo) as s:
        yield s


def infer_body(n: int = 1) -> bytes:
    x = sample_inputs("fraud", n, seed=1)["input"]
    return orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    )


def test_a_broken_version_is_reported_and_does_not_stop_the_others(gateway: GatewayServer) -> None:
    index = httpx.post(gateway.url + "/v2/repository/index", headers=ADMIN).json()
    states = {(e["name"], e["version"]): e for e in index}
    assert set(states) == {("fraud", "1"), ("fraud", "2"), ("fraud", "7")}
    assert states[("fraud", "7")]["state"] == "FAILED"
    assert "onnxruntime could not load" in states[("fraud", "7")]["reason"]
    assert states[("fraud", "1")]["state"] == states[("fraud", "2")]["state"] == "READY"
    r = httpx.post(gateway.url + "/v2/models/fraud/infer", content=infer_body())
    assert r.json()["model_version"] == "2"
    failed = httpx.post(gateway.url + "/v2/models/fraud/versions/7/infer", content=infer_body())
    assert failed.status_code == 503 and "failed" in failed.json()["error"]
    ready_only = httpx.post(
        gateway.url + "/v2/repository/index", headers=ADMIN, json={"ready": True}
    ).json()
    assert {e["version"] for e in ready_only} == {"1", "2"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token-000000"}, {"Authorization": "Basic abc"}],
    ids=["missing", "wrong", "wrong-scheme"],
)
def test_repository_calls_need_an_admin_token(
    gateway: GatewayServer, headers: dict[str, str]
) -> None:
    for path in [
        "/v2/repository/index",
        "/v2/repository/models/fraud/load",
        "/v2/repository/models/fraud/unload",
    ]:
        r = httpx.post(gateway.url + path, headers=headers)
        assert r.status_code == 401, path
        assert r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["error"]
    assert httpx.get(gateway.url + "/v2/models/fraud/ready").status_code == 200


@pytest.mark.parametrize("name", ["..", ".hidden", "a/b", "..%2Fx"])
def test_repository_refuses_path_traversal(gateway: GatewayServer, name: str) -> None:
    r = httpx.post(gateway.url + f"/v2/repository/models/{name}/load", headers=ADMIN)
    assert r.status_code in (400, 404), r.text
    assert "error" in r.json()


def test_load_of_unknown_model_or_version(gateway: GatewayServer) -> None:
    r = httpx.post(gateway.url + "/v2/repository/models/ghost/load", headers=ADMIN)
    assert r.status_code == 404 and "ghost" in r.json()["error"]
    r = httpx.post(
        gateway.url + "/v2/repository/models/fraud/load",
        headers=ADMIN,
        json={"parameters": {"versions": ["5"]}},
    )
    assert r.status_code == 404 and "5" in r.json()["error"]
    r = httpx.post(
        gateway.url + "/v2/repository/models/fraud/load",
        headers=ADMIN,
        json={"parameters": {"versions": "5"}},
    )
    assert r.status_code == 400


def test_load_and_unload_under_traffic_lose_no_request(gateway: GatewayServer, repo: Path) -> None:
    shutil.rmtree(repo / "fraud" / "7")
    shutil.copytree(repo / "fraud" / "1", repo / "fraud" / "3")

    async def scenario() -> tuple[Counter[tuple[int, str]], Counter[int]]:
        routed: Counter[tuple[int, str]] = Counter()
        pinned: Counter[int] = Counter()
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:

            async def traffic() -> None:
                while not stop.is_set():
                    r = await client.post("/v2/models/fraud/infer", content=infer_body(64))
                    routed[(r.status_code, r.json().get("model_version", ""))] += 1

            async def pinned_traffic() -> None:
                while not stop.is_set():
                    r = await client.post(
                        "/v2/models/fraud/versions/1/infer", content=infer_body(2000)
                    )
                    pinned[r.status_code] += 1

            workers = [asyncio.create_task(traffic()) for _ in range(6)]
            workers += [asyncio.create_task(pinned_traffic()) for _ in range(2)]
            await asyncio.sleep(0.5)
            load = await client.post(
                "/v2/repository/models/fraud/load",
                headers=ADMIN,
                json={"parameters": {"versions": ["3"]}},
            )
            assert load.status_code == 200, load.text
            await asyncio.sleep(0.5)
            unload = await client.post(
                "/v2/repository/models/fraud/unload",
                headers=ADMIN,
                json={"parameters": {"versions": ["1"]}},
            )
            assert unload.status_code == 200, unload.text
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
        return routed, pinned

    routed, pinned = asyncio.run(scenario())
    assert {status for status, _ in routed} == {200}, routed
    assert {version for _, version in routed} == {"2", "3"}
    assert routed[(200, "3")] > 0
    # Pinned requests admitted before the unload completed; later ones are told the version is gone.
    assert set(pinned) <= {200, 503} and pinned[200] > 0 and pinned[503] > 0, pinned
    index = {
        e["version"]: e["state"]
        for e in httpx.post(gateway.url + "/v2/repository/index", headers=ADMIN).json()
    }
    assert index == {"1": "UNAVAILABLE", "2": "READY", "3": "READY", "7": "FAILED"}


def test_reloading_a_model_picks_up_new_and_removed_versions(
    gateway: GatewayServer, repo: Path
) -> None:
    shutil.rmtree(repo / "fraud" / "7")
    shutil.rmtree(repo / "fraud" / "1")
    shutil.copytree(repo / "fraud" / "2", repo / "fraud" / "4")
    r = httpx.post(gateway.url + "/v2/repository/models/fraud/load", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert httpx.get(gateway.url + "/v2/models/fraud").json()["versions"] == ["2", "4"]
    index = {
        e["version"]: e["state"]
        for e in httpx.post(gateway.url + "/v2/repository/index", headers=ADMIN).json()
    }
    assert index == {"2": "READY", "4": "READY"}  # 1 left the repository: unloaded, then forgotten
    assert (
        httpx.post(gateway.url + "/v2/models/fraud/infer", content=infer_body()).json()[
            "model_version"
        ]
        == "4"
    )
    r = httpx.post(gateway.url + "/v2/repository/models/fraud/unload", headers=ADMIN)
    assert r.status_code == 200
    gone = httpx.post(gateway.url + "/v2/models/fraud/infer", content=infer_body())
    assert gone.status_code == 503 and "no ready version" in gone.json()["error"]
