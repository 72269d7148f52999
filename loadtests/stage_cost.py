"""Cost of each stage of one light inference request, in-process: parse, decode, run, encode (and
the bare handler's whole parse for comparison), the two header reads a request makes, the
default route's ``Registry.latest``, each beside what it replaced, and what a version with a
task adds on the request path (``Quality.served``: the response kept for the next flush, which
reads its score and, with an id, its prediction; the flush's own share is not in here). Best of
``repeats`` timeit runs, in µs; pin it to one CPU (``taskset -c 1``) on a shared machine.

Run: ``.venv/bin/python -m loadtests.stage_cost [-n 20000] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import timeit
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import orjson
from starlette.datastructures import Headers

from gateway.app import create_app
from gateway.background.quality import Quality
from gateway.demo import write_demo_repository
from gateway.http import codec
from gateway.http.inference import RequestHeaders
from gateway.serving.registry import Registry
from gateway.serving.repository import version_key
from gateway.serving.runtime import load_version
from gateway.settings import Settings
from loadtests.handler_cost import _scope, request_body
from router.state.outcomes import MemoryPredictions


def best_us(stage: Callable[[], object], n: int, repeats: int) -> float:
    return min(timeit.repeat(stage, number=n, repeat=repeats)) / n * 1e6


def stages(repo: Path, registry: Registry) -> dict[str, Callable[[], object]]:
    body = request_body(repo)
    settings = Settings(repo)
    info, runtime = load_version(
        "fraud", "2", repo / "fraud" / "2", settings, ThreadPoolExecutor(1)
    )
    envelope = codec.parse_request(body, None)
    request = codec.decode_inputs(envelope, info)
    names = codec.output_names(request, info)
    outputs = runtime.run_sync(request.inputs, names)
    specs = {spec.name: spec for spec in info.outputs}
    scope = _scope(body)
    versions = {v: None for v in registry.ready_versions("fraud")}
    quality = Quality(registry, MemoryPredictions(3600.0, 1, 1 << 20), window_s=3600)
    quality.max_pending = 1 << 30  # never flushed here: every call buffers
    served = registry.get("fraud", "2").info

    def bare_parse() -> object:
        doc = orjson.loads(body)
        return {
            t["name"]: np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
            for t in doc["inputs"]
        }

    def header_reads(kind: type[Headers]) -> Callable[[], object]:
        def read() -> object:
            headers = kind(scope=scope)
            return headers.get("content-length"), headers.get("inference-header-content-length")

        return read

    return {
        "parse_request": lambda: codec.parse_request(body, None),
        "decode_inputs": lambda: codec.decode_inputs(envelope, info),
        "run (SessionRuntime.run_sync)": lambda: runtime.run_sync(request.inputs, names),
        "encode_response": lambda: codec.encode_response(
            "fraud", "2", "id", outputs, request, specs
        ),
        "bare handler: loads + asarray": bare_parse,
        "two header reads, starlette Headers": header_reads(Headers),
        "two header reads, RequestHeaders": header_reads(RequestHeaders),
        "latest version, max over versions": lambda: max(versions, key=version_key),
        "latest version, Registry.latest": lambda: registry.latest("fraud"),
        "quality: served, no id": lambda: quality.served(served, outputs, None),
        "quality: served, with an id": lambda: quality.served(served, outputs, "request-0001"),
    }


async def _with_registry(repo: Path, n: int, repeats: int) -> dict[str, float]:
    app = create_app(Settings(repo))
    async with app.router.lifespan_context(app):
        while not app.state.endpoints.registry.started:
            await asyncio.sleep(0.05)
        registry: Registry = app.state.endpoints.registry
        return {name: best_us(f, n, repeats) for name, f in stages(repo, registry).items()}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.stage_cost", description=__doc__)
    p.add_argument("-n", type=int, default=20_000, help="calls per timeit run")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "models"
        write_demo_repository(repo, heavy=False)
        results = asyncio.run(_with_registry(repo, a.n, a.repeats))
    for name, us in results.items():
        print(f"{name:38s} {us:7.2f} µs (best of {a.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
