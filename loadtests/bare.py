"""The floor Turnout is compared with: starlette + uvicorn, orjson, numpy and ``session.run``
called inline in the handler, with the gateway's onnxruntime options and server settings.

Run: ``python -m loadtests.bare --model-repository DIR --port P [--models fraud,heavy]``. Each
model serves its highest numeric version under ``POST /v2/models/{model}/infer``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

DTYPES: dict[str, type[np.generic]] = {
    "FP32": np.float32,
    "FP64": np.float64,
    "INT32": np.int32,
    "INT64": np.int64,
}
DATATYPES = {np.dtype(t): name for name, t in DTYPES.items()}


def session_options() -> Any:
    """The gateway's defaults: one intra-op and one inter-op thread, sequential, all graph
    optimizations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


def latest_model(repository: Path, model: str) -> tuple[str, Path]:
    versions = [p for p in (repository / model).iterdir() if p.name.isdigit()]
    if not versions:
        raise SystemExit(f"no numeric version folder under {repository / model}")
    folder = max(versions, key=lambda p: int(p.name))
    return folder.name, folder / "model.onnx"


def create_app(repository: Path, models: Sequence[str]) -> Starlette:
    sessions: dict[str, tuple[str, Any, list[str]]] = {}
    for model in models:
        version, path = latest_model(repository, model)
        session = ort.InferenceSession(
            str(path), sess_options=session_options(), providers=["CPUExecutionProvider"]
        )
        sessions[model] = (version, session, [o.name for o in session.get_outputs()])

    async def ready(request: Request) -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    async def infer(request: Request) -> Response:
        model = request.path_params["model"]
        if model not in sessions:
            return Response(b'{"error":"unknown model"}', status_code=404)
        version, session, names = sessions[model]
        try:
            body = orjson.loads(await request.body())
            feeds = {
                t["name"]: np.asarray(t["data"], dtype=DTYPES[t["datatype"]]).reshape(t["shape"])
                for t in body["inputs"]
            }
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            return Response(orjson.dumps({"error": str(exc)}), status_code=400)
        results = session.run(names, feeds)
        outputs = [
            {
                "name": name,
                "datatype": DATATYPES.get(value.dtype, "FP32"),
                "shape": list(value.shape),
                "data": value.ravel().tolist(),
            }
            for name, value in zip(names, results, strict=True)
        ]
        content = {"model_name": model, "model_version": version, "outputs": outputs}
        return Response(orjson.dumps(content), media_type="application/json")

    return Starlette(
        routes=[
            Route("/v2/health/ready", ready, methods=["GET"]),
            Route("/v2/models/{model}/infer", infer, methods=["POST"]),
        ]
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="loadtests.bare", description=__doc__)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--models", default="fraud,heavy", help="comma-separated model names")
    args = parser.parse_args(argv)
    app = create_app(args.model_repository, args.models.split(","))
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
