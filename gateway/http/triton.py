"""Triton's model configuration and statistics extensions, and KServe's model listing: what a
model looks like to Triton's tools (``tritonclient.get_model_config``, perf_analyzer) and what it
has done (``get_inference_statistics``). Everything here is read from what Turnout loaded and
counted (gateway.serving); nothing is a default Triton would have filled in for a model it ran.
"""

from __future__ import annotations

from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response

from gateway.background.fleet import CountsExchange, Scope
from gateway.errors import BadRequest, NotFound, NotReady
from gateway.http.auth import KeyCheck, OpenAccess
from gateway.http.responses import json_response
from gateway.serving.batcher import BatchingRuntime
from gateway.serving.registry import Loaded, Registry
from gateway.serving.statistics import Figures
from gateway.serving.types import TensorSpec
from gateway.settings import Settings

PLATFORM = "onnxruntime_onnx"
BACKEND = "onnxruntime"
MODEL_FILE = "model.onnx"
# The protocol's datatype -> Triton's model-configuration data type (BYTES is TYPE_STRING there).
CONFIG_TYPES = {
    "BOOL": "TYPE_BOOL",
    "INT8": "TYPE_INT8",
    "INT16": "TYPE_INT16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "UINT8": "TYPE_UINT8",
    "UINT16": "TYPE_UINT16",
    "UINT32": "TYPE_UINT32",
    "UINT64": "TYPE_UINT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}
_NS = 1e9
SCOPES = ("process", "group", "fleet")


class Triton:
    """``GET /v2/models[/{m}[/versions/{v}]]/stats``, ``GET /v2/models/{m}[/versions/{v}]/config``
    and ``GET /v2/models``. With API keys configured each needs one, as model metadata does."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        keys: KeyCheck | None = None,
        exchange: CountsExchange | None = None,
    ) -> None:
        """``exchange``: statistics add up the processes of the asked scope (``?scope=``,
        ``group`` by default, as ``/metrics``); without one they are this process's."""
        self.settings = settings
        self.registry = registry
        self.keys: KeyCheck = keys or OpenAccess()
        self.exchange = exchange

    async def models(self, request: Request) -> Response:
        """KServe's listing: the models with at least one ready version."""
        self.keys.check(request.headers)
        return json_response({"models": sorted({lv.info.model for lv in self.registry.loaded()})})

    async def config(self, request: Request) -> Response:
        self.keys.check(request.headers)
        return json_response(model_config(self._version(request), self.settings))

    async def stats(self, request: Request) -> Response:
        self.keys.check(request.headers)
        model = request.path_params.get("model")
        scope = request.query_params.get("scope", "group")
        if scope not in SCOPES:
            raise BadRequest("scope: one of process, group, fleet")
        if request.path_params.get("version") is not None:
            chosen = [self._version(request)]
        elif model is not None:
            self._version(request)  # unknown model: 404; no ready version: 503
            chosen = [self.registry.get(model, v) for v in self.registry.ready_versions(model)]
        else:
            chosen = sorted(
                self.registry.loaded(), key=lambda lv: (lv.info.model, int(lv.info.version))
            )
        runtimes: dict[tuple[str, str], Figures] = {}
        if self.exchange is not None:
            runtimes = (await self.exchange.view(cast(Scope, scope))).runtimes
        entries = [model_stats(lv, runtimes.get((lv.info.model, lv.info.version))) for lv in chosen]
        return json_response({"model_stats": entries})

    def _version(self, request: Request) -> Loaded:
        """The version the path names, or the one unpinned requests go to without a policy."""
        model = request.path_params["model"]
        version = request.path_params.get("version")
        try:
            return self.registry.get(model, version) if version else self.registry.latest(model)
        except NotFound:
            if not self.registry.started:  # the start-up load may not have reached it yet
                raise NotReady("the gateway is still loading its models; retry shortly") from None
            raise


def _batching(loaded: Loaded) -> BatchingRuntime | None:
    runtime = loaded.runtime
    return runtime if isinstance(runtime, BatchingRuntime) else None


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    """Triton's dims: without the batch axis when the model batches (max_batch_size > 0)."""
    if batched and spec.shape and spec.shape[0] == -1:
        return list(spec.shape[1:])
    return list(spec.shape)


def model_config(loaded: Loaded, settings: Settings) -> dict[str, Any]:
    """Triton's JSON model configuration of one loaded version: its tensors as onnxruntime read
    them from the file, the batching its runtime applies, the session options it was built with.
    ``max_batch_size`` is 0 when requests are not merged (batching off in config.json or in the
    settings, or an input without a dynamic first axis); dims then keep every axis."""
    info = loaded.info
    runtime = _batching(loaded)
    batched = runtime is not None and runtime.merging
    config: dict[str, Any] = {
        "name": info.model,
        "platform": PLATFORM,
        "backend": BACKEND,
        "runtime": "",
        # Turnout loads every version folder of the repository (docs/model-repository.md).
        "version_policy": {"all": {}},
        "max_batch_size": runtime.config.max_batch_size if runtime is not None and batched else 0,
        "input": [
            {
                "name": spec.name,
                "data_type": CONFIG_TYPES[spec.datatype],
                "format": "FORMAT_NONE",
                "dims": _dims(spec, batched),
                "is_shape_tensor": False,
                "allow_ragged_batch": False,
                "optional": False,
            }
            for spec in info.inputs
        ],
        "output": [
            {
                "name": spec.name,
                "data_type": CONFIG_TYPES[spec.datatype],
                "dims": _dims(spec, batched),
                "label_filename": "",
                "is_shape_tensor": False,
            }
            for spec in info.outputs
        ],
        "default_model_filename": MODEL_FILE,
        "parameters": {
            # what the session was built with (gateway.serving.runtime.session_options)
            "intra_op_thread_count": {"string_value": str(settings.intra_op_threads)},
            "inter_op_thread_count": {"string_value": str(settings.inter_op_threads)},
            "execution_mode": {"string_value": "0"},  # ORT_SEQUENTIAL
            "graph_optimization": {"string_value": settings.graph_optimization},
        },
    }
    if runtime is not None:
        batch = runtime.config
        # One session per version, run by at most max_concurrent_batches threads at once.
        config["instance_group"] = [
            {
                "name": f"{info.model}_0",
                "kind": "KIND_CPU",
                "count": batch.max_concurrent_batches,
                "gpus": [],
            }
        ]
    if runtime is not None and batched:
        batch = runtime.config
        timeout_s = runtime.default_timeout_s
        config["dynamic_batching"] = {
            # Turnout fills a batch up to max_batch_size: no size is preferred over another.
            "preferred_batch_size": [],
            "max_queue_delay_microseconds": batch.max_queue_delay_us,
            "preserve_ordering": False,
            "priority_levels": 0,
            "default_priority_level": 0,
            "default_queue_policy": {
                "timeout_action": "REJECT",
                "default_timeout_microseconds": round(timeout_s * 1e6) if timeout_s else 0,
                "allow_timeout_override": True,  # the request's parameters.timeout
                "max_queue_size": batch.max_queue,
            },
            "priority_queue_policy": {},
        }
    return config


def _duration(count: int, seconds: float) -> dict[str, int]:
    return {"count": count, "ns": round(seconds * _NS)}


def model_stats(loaded: Loaded, figures: Figures | None = None) -> dict[str, Any]:
    """Triton's statistics of one loaded version: ``figures`` (a view's, several processes
    added up), else its runtime's in this process; since the version was loaded."""
    runtime = _batching(loaded)
    if figures is None:
        figures = runtime.stats.figures() if runtime is not None else Figures()
    batched = runtime is not None and runtime.merging
    ok = figures.succeeded
    sizes: dict[int, list[float]] = {}
    for rows, entry in figures.sizes.items():
        # a model that is not batched runs one request at a time: Triton's batch size 1
        merged = sizes.setdefault(rows if batched else 1, [0, 0.0, 0.0, 0.0])
        for i, value in enumerate(entry):
            merged[i] += value
    return {
        "name": loaded.info.model,
        "version": loaded.info.version,
        "last_inference": figures.last_ms,
        "inference_count": figures.inferences if batched else ok,
        "execution_count": figures.executions,
        "inference_stats": {
            "success": _duration(ok, figures.succeeded_s),
            "fail": _duration(figures.fail, figures.fail_s),
            "queue": _duration(ok, figures.queue_s),
            "compute_input": _duration(ok, figures.input_s),
            "compute_infer": _duration(ok, figures.infer_s),
            "compute_output": _duration(ok, figures.output_s),
            "cache_hit": _duration(0, 0.0),
            "cache_miss": _duration(0, 0.0),
        },
        "batch_stats": [
            {
                "batch_size": rows,
                "compute_input": _duration(int(runs), input_s),
                "compute_infer": _duration(int(runs), infer_s),
                "compute_output": _duration(int(runs), output_s),
            }
            for rows, (runs, input_s, infer_s, output_s) in sorted(sizes.items())
        ],
        "memory_usage": [],
    }
