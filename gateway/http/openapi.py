"""The OpenAPI 3.0 description of every endpoint the gateway serves (GET /openapi.json)."""

from __future__ import annotations

from typing import Any

from gateway.http.access import REQUIRED

_DATATYPES = [
    "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip
_CONFIG_TYPES = [t if t != "BYTES" else "STRING" for t in _DATATYPES]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "error")
_MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
# processes whose counts a view adds up (drift, statistics)
_SCOPE = {
    "name": "scope",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "enum": ["process", "group", "fleet"]},
}
_REASON = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["reason"],
                "properties": {"reason": {"type": "string"}},
            }
        }
    },
}
_ADMIN: list[dict[str, list[str]]] = [{"bearer": []}]
# With API keys configured (--api-key), these operations need one; health and metadata of the
# server stay open.
_KEYED = [
    "/v2/models",
    "/v2/models/stats",
    "/v2/models/{model}",
    "/v2/models/{model}/config",
    "/v2/models/{model}/stats",
    "/v2/models/{model}/versions/{version}/config",
    "/v2/models/{model}/versions/{version}/stats",
    "/v2/models/{model}/infer",
    "/v2/models/{model}/versions/{version}",
    "/v2/models/{model}/versions/{version}/infer",
    "/v2/models/{model}/versions/{version}/drift",
    "/v2/models/{model}/feedback",
    "/v2/models/{model}/outcomes",
    "/v2/models/{model}/versions/{version}/quality",
]
# with feedback keys (--feedback-key): their own keys
_FEEDBACK = ["/v2/models/{model}/feedback", "/v2/models/{model}/outcomes"]
_KEY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
    "apiKeyBearer": {"type": "http", "scheme": "bearer", "description": "an API key"},
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERROR for code in codes}


def _get(summary: str, schema: dict[str, Any], *codes: int, **extra: Any) -> dict[str, Any]:
    return {
        "get": {
            "summary": summary,
            "responses": {"200": _json(schema, "ok"), **_errors(*codes)},
            **extra,
        }
    }


_INFER = {
    "post": {
        "summary": "Run inference (JSON, or the binary tensor data extension)",
        "parameters": [
            {
                "name": "Inference-Header-Content-Length",
                "in": "header",
                "required": False,
                "schema": {"type": "integer", "minimum": 0},
                "description": "length of the JSON header; 0: the body is the one input's raw bytes",
            },
            {
                "name": "Content-Encoding",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "enum": ["gzip", "x-gzip", "deflate", "identity"]},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": _ref("InferRequest")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "description": "inference result",
                "content": {
                    "application/json": {"schema": _ref("InferResponse")},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_errors(400, 404, 413, 415, 429, 500, 503, 504),
        },
    }
}


def _repo_body(**extra: Any) -> dict[str, Any]:
    """A repository call's body: ``parameters.versions`` and ``extra``; any other parameter is
    refused by name (400)."""
    versions = {"versions": {"type": "array", "items": {"type": "string"}}}
    parameters = {"type": "object", "properties": {**versions, **extra}}
    schema = {"type": "object", "properties": {"parameters": parameters}}
    return {"required": False, "content": {"application/json": {"schema": schema}}}


def openapi_document(api_keys: bool = False, feedback_keys: bool = False) -> dict[str, Any]:
    """The document; ``api_keys`` says whether this gateway requires them for inference,
    ``feedback_keys`` whether feedback needs keys of its own."""
    tensor = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "datatype": {"type": "string", "enum": _DATATYPES},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
    }
    spec = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": _DATATYPES},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    config_tensor = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "data_type": {"type": "string", "enum": [f"TYPE_{t}" for t in _CONFIG_TYPES]},
            "dims": {"type": "array", "items": {"type": "integer"}},
        },
    }
    duration = {
        "type": "object",
        "properties": {"count": {"type": "integer"}, "ns": {"type": "integer"}},
    }
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "Tensor": tensor,
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": _ref("Tensor")},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "parameters": {"type": "object"},
                        },
                    },
                },
            },
        },
        "InferResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "outputs": {"type": "array", "items": _ref("Tensor")},
            },
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": spec},
                "outputs": {"type": "array", "items": spec},
                "turnout": {"type": "object"},
            },
        },
        "ModelConfig": {
            "type": "object",
            "description": "Triton's JSON model configuration, from what the gateway loaded",
            "required": ["name", "platform", "backend", "max_batch_size", "input", "output"],
            "properties": {
                "name": {"type": "string"},
                "platform": {"type": "string", "enum": ["onnxruntime_onnx"]},
                "backend": {"type": "string", "enum": ["onnxruntime"]},
                "max_batch_size": {"type": "integer", "minimum": 0},
                "version_policy": {"type": "object"},
                "input": {"type": "array", "items": config_tensor},
                "output": {"type": "array", "items": config_tensor},
                "dynamic_batching": {"type": "object"},
                "instance_group": {"type": "array", "items": {"type": "object"}},
                "parameters": {"type": "object"},
            },
        },
        "ModelStatistics": {
            "type": "object",
            "required": ["model_stats"],
            "properties": {
                "model_stats": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": [
                            "name",
                            "version",
                            "last_inference",
                            "inference_count",
                            "execution_count",
                            "inference_stats",
                            "batch_stats",
                        ],
                        "properties": {
                            "name": {"type": "string"},
                            "version": {"type": "string"},
                            "last_inference": {
                                "type": "integer",
                                "description": "ms since the epoch, 0: none yet",
                            },
                            "inference_count": {"type": "integer"},
                            "execution_count": {"type": "integer"},
                            "inference_stats": {
                                "type": "object",
                                "properties": {
                                    k: duration
                                    for k in (
                                        "success",
                                        "fail",
                                        "queue",
                                        "compute_input",
                                        "compute_infer",
                                        "compute_output",
                                        "cache_hit",
                                        "cache_miss",
                                    )
                                },
                            },
                            "batch_stats": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "properties": {
                                        "batch_size": {"type": "integer"},
                                        "compute_input": duration,
                                        "compute_infer": duration,
                                        "compute_output": duration,
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
        "Feedback": {
            "type": "object",
            "required": ["id", "reward"],
            "properties": {"id": {"type": "string"}, "reward": {"type": "number"}},
        },
        "Outcomes": {
            "type": "object",
            "required": ["outcomes"],
            "properties": {
                "outcomes": {
                    "type": "array",
                    "maxItems": 10_000,
                    "items": {
                        "type": "object",
                        "required": ["id", "label"],
                        "properties": {
                            "id": {"type": "string", "maxLength": 400},
                            "label": {
                                "oneOf": [
                                    {"type": "number"},
                                    {"type": "boolean"},
                                    {"type": "string"},
                                ]
                            },
                        },
                    },
                }
            },
        },
        "OutcomesResult": {
            "type": "object",
            "properties": {
                **{
                    k: {"type": "integer"}
                    for k in ("accepted", "duplicate", "conflict", "unknown", "expired", "invalid")
                },
                "ids": {
                    "type": "object",
                    "description": "the first few offending ids of each result",
                },
            },
        },
        "PolicyChange": {
            "type": "object",
            "required": ["policy", "reason"],
            "properties": {"policy": {"type": "object"}, "reason": {"type": "string"}},
        },
        "Route": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "revision": {"type": "integer"},
                "policy": {"type": "object"},
                "shares": {"type": "object"},
            },
        },
        "AuditEntry": {
            "type": "object",
            "properties": {
                k: {"type": t}
                for k, t in [
                    ("revision", "integer"),
                    ("at", "number"),
                    ("who", "string"),
                    ("model", "string"),
                    ("action", "string"),
                    ("reason", "string"),
                    ("artifacts", "object"),
                    ("details", "object"),
                ]
            },
        },
        "Guards": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "strategy": {"type": "string"},
                "revision": {"type": "integer"},
                "guards": {"type": "object", "description": "the normalised guards object"},
                "thresholds": {"type": "object", "additionalProperties": {"type": "number"}},
                "leader": {
                    "type": "boolean",
                    "description": "this replica holds the lease and acts",
                },
                "healthy_for_s": {"type": "number", "nullable": True},
                "verdict": {"type": "string", "enum": ["pass", "insufficient", "breach"]},
                "checks": {"type": "array", "items": {"type": "object"}},
                "window": {
                    "type": "object",
                    "properties": {"window_s": {"type": "number"}, "covered_s": {"type": "number"}},
                },
                "versions": {"type": "object"},
                "shadows": {"type": "object"},
                "last_action": {"allOf": [_ref("AuditEntry")], "nullable": True},
            },
        },
        "Drift": {
            "type": "object",
            "properties": {
                "model": {"type": "string"},
                "version": {"type": "string"},
                "scope": {"type": "string", "enum": ["process", "group", "fleet"]},
                "processes": {
                    "type": "integer",
                    "description": "processes whose counts are merged",
                },
                "window_s": {"type": "number"},
                "features": {"type": "array"},
                "outputs": {"type": "array"},
                "latency": {"type": "object"},
                "cumulative": {"type": "object"},
            },
        },
        "IndexEntry": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {
                    "type": "string",
                    "enum": ["LOADING", "READY", "UNLOADING", "UNAVAILABLE", "FAILED"],
                },
                "reason": {"type": "string"},
            },
        },
    }
    ready = {
        "type": "object",
        "properties": {"ready": {"type": "boolean"}, "name": {"type": "string"}},
    }
    repo_result = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": _ref("IndexEntry")},
        },
    }

    def repo(
        summary: str, schema: dict[str, Any], body: dict[str, Any], *codes: int
    ) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": _ADMIN,
                "requestBody": body,
                "responses": {"200": _json(schema, "ok"), **_errors(400, 401, 404, *codes)},
            }
        }

    paths: dict[str, Any] = {
        "/v2/health/live": _get("Server liveness", {"type": "object", "properties": {"live": {"type": "boolean"}}}),
        "/v2/health/ready": _get("Server readiness", ready, 503),
        "/v2": _get("Server metadata", {"type": "object"}),
        "/v2/models/{model}": {**_get("Model metadata (routed version)", _ref("ModelMetadata"), 400, 404, 503), "parameters": [_MODEL]},
        "/v2/models/{model}/ready": {**_get("Model readiness", ready, 400, 404, 503), "parameters": [_MODEL]},
        "/v2/models/{model}/infer": {**_INFER, "parameters": [_MODEL]},
        "/v2/models/{model}/versions/{version}": {**_get("Model version metadata", _ref("ModelMetadata"), 400, 404, 503), "parameters": [_MODEL, _VERSION]},
        "/v2/models/{model}/versions/{version}/ready": {**_get("Model version readiness", ready, 400, 404, 503), "parameters": [_MODEL, _VERSION]},
        "/v2/models/{model}/versions/{version}/infer": {**_INFER, "parameters": [_MODEL, _VERSION]},
        "/v2/models": _get("KServe's model listing: the models with a ready version", {"type": "object", "required": ["models"], "properties": {"models": {"type": "array", "items": {"type": "string"}}}}),
        "/v2/models/stats": _get("Statistics of every loaded version (Triton's statistics extension)", _ref("ModelStatistics"), 400, parameters=[_SCOPE]),
        "/v2/models/{model}/stats": {**_get("Statistics of the model's ready versions", _ref("ModelStatistics"), 400, 404, 503, parameters=[_SCOPE]), "parameters": [_MODEL]},
        "/v2/models/{model}/versions/{version}/stats": {**_get("Statistics of one version", _ref("ModelStatistics"), 400, 404, 503, parameters=[_SCOPE]), "parameters": [_MODEL, _VERSION]},
        "/v2/models/{model}/config": {**_get("Triton model configuration of the version unpinned requests go to without a policy", _ref("ModelConfig"), 400, 404, 503), "parameters": [_MODEL]},
        "/v2/models/{model}/versions/{version}/config": {**_get("Triton model configuration of one version", _ref("ModelConfig"), 400, 404, 503), "parameters": [_MODEL, _VERSION]},
        "/v2/repository/index": {
            "post": {
                "summary": "Repository index: every model version and its state",
                "security": _ADMIN,
                "requestBody": {"required": False, "content": {"application/json": {"schema": {"type": "object", "properties": {"ready": {"type": "boolean"}}}}}},
                "responses": {"200": _json({"type": "array", "items": _ref("IndexEntry")}, "ok"), **_errors(400, 401)},
            }
        },
        "/v2/repository/models/{model}/load": {**repo("Load (or reload) a model's versions; Triton's config and file: parameters are refused (400)", repo_result, _repo_body()), "parameters": [_MODEL]},
        "/v2/repository/models/{model}/unload": {**repo("Unload a model's versions after in-flight requests finish (409 while its routing policy names them)", repo_result, _repo_body(unload_dependents={"type": "boolean"}), 409), "parameters": [_MODEL]},
        "/openapi.json": _get("This document", {"type": "object"}),
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
        "/v2/models/{model}/versions/{version}/drift": {**_get("Drift and latency of a version: current window and since load", _ref("Drift"), 400, 404, 503,
                                                               parameters=[_SCOPE]),
                                                         "parameters": [_MODEL, _VERSION]},
        "/v2/models/{model}/feedback": {
            "parameters": [_MODEL],
            "post": {
                "summary": "Join a reward or outcome to the version that served an inference id",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Feedback")}}},
                "responses": {"200": _json({"type": "object"}, "joined"), **_errors(400, 404, 413, 503)},
            },
        },
        "/v2/models/{model}/outcomes": {
            "parameters": [_MODEL],
            "post": {
                "summary": "Join up to 10,000 labels to the versions that served their inference ids (409: every one a conflict)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("Outcomes")}}},
                "responses": {"200": _json(_ref("OutcomesResult"), "taken"), **_errors(400, 404, 409, 413, 503)},
            },
        },
        "/v2/models/{model}/versions/{version}/quality": {**_get("Quality of a version: realized and estimated figures with intervals, labels, join counts", {"type": "object"}, 400, 404, 503,
                                                                 parameters=[{"name": "window", "in": "query", "required": False, "schema": {"type": "string", "enum": ["window", "all"]}},
                                                                             {"name": "scope", "in": "query", "required": False, "schema": {"type": "string", "enum": ["process", "group", "fleet"]}}]),
                                                           "parameters": [_MODEL, _VERSION]},
        "/admin/routes": {"get": {"summary": "Every routing policy and the current revision", "security": _ADMIN, "responses": {"200": _json({"type": "object"}, "ok"), **_errors(401, 503)}}},
        "/admin/routes/{model}": {
            "parameters": [_MODEL],
            "get": {"summary": "One model's policy (ETag: its revision)", "security": _ADMIN, "responses": {"200": _json(_ref("Route"), "ok"), **_errors(401, 404, 503)}},
            "put": {
                "summary": "Replace the policy (If-Match: revision; ?dry_run=true)",
                "security": _ADMIN,
                "parameters": [
                    {"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}},
                    {"name": "dry_run", "in": "query", "required": False, "schema": {"type": "boolean"}},
                ],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref("PolicyChange")}}},
                "responses": {"200": _json(_ref("Route"), "applied (or, with dry_run, what would be)"), **_errors(400, 401, 404, 412, 413, 503)},
            },
            "delete": {"summary": "Remove the policy", "security": _ADMIN, "requestBody": _REASON, "responses": {"200": _json({"type": "object"}, "removed"), **_errors(400, 401, 404, 412, 503)}},
        },
        "/admin/routes/{model}/actions/{action}": {
            "parameters": [_MODEL, {"name": "action", "in": "path", "required": True, "schema": {"type": "string", "enum": ["advance", "pause", "resume", "promote", "rollback", "switch"]}}],
            "post": {"summary": "Apply an action to the policy", "security": _ADMIN, "requestBody": _REASON, "responses": {"200": _json(_ref("Route"), "applied"), **_errors(400, 401, 404, 409, 412, 503)}},
        },
        "/admin/routes/{model}/rollout": {
            "parameters": [_MODEL],
            "get": {"summary": "The model's rollout template (ETag: its revision) and its latest rollout (docs/rollouts.md)", "security": _ADMIN, "responses": {"200": _json({"type": "object"}, "ok"), **_errors(401, 404, 503)}},
            "put": {
                "summary": "Replace the rollout template (If-Match: revision)",
                "security": _ADMIN,
                "parameters": [{"name": "If-Match", "in": "header", "required": False, "schema": {"type": "string"}}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "required": ["rollout", "reason"], "properties": {"rollout": {"type": "object"}, "reason": {"type": "string"}}}}}},
                "responses": {"200": _json({"type": "object"}, "stored"), **_errors(400, 401, 404, 412, 413, 503)},
            },
            "delete": {"summary": "Remove the rollout template (a running rollout finishes)", "security": _ADMIN, "requestBody": _REASON, "responses": {"200": _json({"type": "object"}, "removed"), **_errors(400, 401, 404, 412, 503)}},
        },
        "/admin/routes/{model}/actions/approve": {
            "parameters": [_MODEL],
            "post": {"summary": "Approve what the model's rollout awaits (the next step or the promotion); reason optional", "security": _ADMIN, "responses": {"200": _json({"type": "object"}, "recorded; the rollout acts at its next tick"), **_errors(400, 401, 404, 409, 503)}},
        },
        "/admin/routes/{model}/actions/reject": {
            "parameters": [_MODEL],
            "post": {"summary": "Reject what the model's rollout awaits: it rolls back (reason required)", "security": _ADMIN, "requestBody": _REASON, "responses": {"200": _json({"type": "object"}, "recorded; the rollout rolls back at its next tick"), **_errors(400, 401, 404, 409, 503)}},
        },
        "/admin/routes/{model}/guards": {**_get("Rollout guards: the verdict on this replica's windows, the figures and thresholds behind it, the last guard action", _ref("Guards"), 401, 404, 503, security=_ADMIN), "parameters": [_MODEL]},
        "/admin/routes/{model}/report": {**_get("Per-version counts, feedback, SRM check, sequential test, shadow divergence", {"type": "object"}, 401, 404, 503, security=_ADMIN), "parameters": [_MODEL]},
        "/admin/audit": {**_get("The audit trail, newest first, a page at a time (up to `limit` entries and about 1 MiB); `next` is the cursor of the following page, null after the last",
                                {"type": "object", "required": ["entries", "next"], "properties": {"entries": {"type": "array", "items": _ref("AuditEntry")}, "next": {"type": "string", "nullable": True}}}, 400, 401, 503, security=_ADMIN),
                         "parameters": [{"name": "model", "in": "query", "required": False, "schema": {"type": "string"}},
                                        {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                                        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}, "description": "`next` of the previous page (opaque)"}]},
        "/admin/events": {**_get("The recent events (CloudEvents 1.0, docs/events.md), newest first, a page at a time; `next` is the cursor of the following page, null after the last",
                                 {"type": "object", "required": ["events", "next"], "properties": {"events": {"type": "array", "items": {"type": "object", "required": ["specversion", "id", "source", "type", "time", "data"]}}, "next": {"type": "string", "nullable": True}}}, 400, 401, 503, security=_ADMIN),
                          "parameters": [{"name": "kind", "in": "query", "required": False, "schema": {"type": "string", "maxLength": 64}, "description": "an event kind (`drift.changed`) or a pattern of kinds (`model.*`)"},
                                         {"name": "limit", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                                         {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"}, "description": "`next` of the previous page (opaque)"}]},
        "/admin/limits": {
            **_get("The rate-limits document in force (null: none)", {"type": "object", "required": ["limits"], "properties": {"limits": {"type": "object", "nullable": True}}}, 401, security=_ADMIN),
            "put": {
                "summary": "Replace the rate-limits document (audited under model _limits)",
                "security": _ADMIN,
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object", "required": ["limits", "reason"], "properties": {"limits": {"type": "object"}, "reason": {"type": "string"}}}}}},
                "responses": {"200": _json({"type": "object", "required": ["limits"], "properties": {"limits": {"type": "object"}}}, "in force"), **_errors(400, 401, 413, 503)},
            },
        },
    }  # fmt: skip
    for (method, path), role in REQUIRED.items():  # copies, as below
        item = paths[path] = dict(paths[path])
        op = item[method.lower()]
        responses = {**op["responses"], "403": _ERROR}
        item[method.lower()] = {**op, "x-turnout-role": role, "responses": responses}
    schemes: dict[str, Any] = {"bearer": {"type": "http", "scheme": "bearer"}}
    keyed = [*(_KEYED if api_keys else []), *(_FEEDBACK if feedback_keys and not api_keys else [])]
    if keyed:
        schemes.update(_KEY_SCHEMES)
        for path in keyed:
            item = paths[path] = dict(paths[path])
            for method in ("get", "post"):
                if method in item:  # copies: the operation objects are shared module constants
                    op = item[method]
                    item[method] = {
                        **op,
                        "security": [{"apiKey": []}, {"apiKeyBearer": []}],
                        "responses": {**op["responses"], "401": _ERROR},
                    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "Turnout", "version": "0.1.0", "description": "Open Inference Protocol (KServe V2 REST) gateway"},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": schemes,
        },
    }  # fmt: skip
