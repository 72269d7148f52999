"""Outcomes and quality over HTTP (docs/closed-loop.md):

- ``POST /v2/models/{m}/outcomes``: a batch of up to 10,000 labels, ``{"outcomes": [{"id",
  "label"}, ...]}``, each joined to the prediction its inference id was served with; answered
  with the count of each result and the first few offending ids. Authenticated as feedback is
  (feedback keys when configured, else API keys).
- ``GET /v2/models/{m}/versions/{v}/quality?window=window|all&scope=process|group|fleet``: the
  version's realized figures, the estimated ones (binary), label counts and join counters.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from gateway.background.quality import MAX_OUTCOMES, WHICH, Quality
from gateway.errors import BadRequest, PayloadTooLarge
from gateway.http.auth import KeyCheck
from gateway.http.responses import json_response, read_json_object

# 10,000 outcomes of 400-character ids and their labels take under 4.5 MB of JSON
MAX_OUTCOMES_BODY = 8 << 20
SCOPES = ("process", "group", "fleet")


class OutcomesEndpoints:
    def __init__(self, quality: Quality, keys: KeyCheck, feedback_keys: KeyCheck) -> None:
        self.quality = quality
        self.keys = keys
        self.feedback_keys = feedback_keys

    async def post(self, request: Request) -> Response:
        self.feedback_keys.check(request.headers)
        model = request.path_params["model"]
        task = self.quality.task_of(model)  # 404 / 400 before the body is read
        value = await read_json_object(request, MAX_OUTCOMES_BODY)
        items = value.get("outcomes")
        if isinstance(items, list) and len(items) > MAX_OUTCOMES:
            raise PayloadTooLarge(
                f"outcomes: at most {MAX_OUTCOMES} in one batch, got {len(items)}; send several"
            )
        answer, all_conflicts = await self.quality.take(model, value, task)
        return json_response(answer, 409 if all_conflicts else 200)

    async def report(self, request: Request) -> Response:
        self.keys.check(request.headers)
        which = request.query_params.get("window", "window")
        if which not in WHICH:
            raise BadRequest(f"window: one of {', '.join(WHICH)}")
        scope = request.query_params.get("scope", "fleet")
        if scope not in SCOPES:
            raise BadRequest(f"scope: one of {', '.join(SCOPES)}")
        model, version = request.path_params["model"], request.path_params["version"]
        report = await self.quality.report(model, version, which, scope)  # type: ignore[arg-type]
        return json_response(report)
