"""Quality per version: served predictions remembered for the outcome join, labels joined to
them, and the accumulators (monitors.quality) that turn both into figures.

- The request path (``served``) hands each routed response of a version with a task; it is
  kept as it is (one append) until the next flush reads it: the one value per row its task
  reads (gateway.serving.task) goes to the estimated quality (binary: every served score,
  CBPE), and, for a one-row request that carries an id, becomes a prediction to remember.
  Nothing on the request path waits on a store.
- Every ``flush_s`` the buffered scores fold into the version's windows and the predictions go
  to the prediction store in one batch (router.state.outcomes: the process's bounded memory, or
  Redis for the fleet). Predictions waiting for a store that is down are bounded
  (``max_pending``; the oldest dropped and counted).
- ``outcomes`` takes a batch of labels: checks each, claims each id's one label in the store,
  and feeds the joined (value, label) pairs to the version's windows, slotted at their arrival.
- Figures: this process's accumulators merged with the other members' last publish (the
  counts exchange carries them as bytes beside the monitors), for the quality endpoint, the
  metrics and the quality guards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gateway.background.fleet import CountsExchange, Scope
from gateway.background.tasks import stop_task
from gateway.errors import BadRequest, GatewayError, NotFound
from gateway.serving.registry import Registry
from gateway.serving.task import Task, TaskError
from gateway.serving.types import Emit, ModelVersion, emit_nothing
from monitors.quality import (
    BinaryQuality,
    Figure,
    MulticlassQuality,
    QualityWindows,
    RegressionQuality,
    drop_bound,
)
from router.policy.guard_spec import QUALITY_METRICS, GuardSpec
from router.policy.guards import Evaluation, QualityFigure, QualityWindow
from router.policy.spec import PolicyDoc
from router.state.join import MAX_ID_CHARS
from router.state.outcomes import CLAIM_CHUNK, RESULTS, PredictionStore, Served
from router.state.store import StoreUnavailable

log = logging.getLogger("turnout.quality")

Accumulator = BinaryQuality | RegressionQuality | MulticlassQuality
Which = Literal["window", "all"]
WHICH: tuple[Which, ...] = ("window", "all")
MAX_OUTCOMES = 10_000  # labels in one batch
EXAMPLES = 5  # offending ids reported per result
_PREFIX = "quality/"
_DECODE: dict[str, type[Accumulator]] = {
    "binary": BinaryQuality,
    "regression": RegressionQuality,
    "multiclass": MulticlassQuality,
}
RESULT_KINDS = (*RESULTS, "invalid")


def accumulator(task: Task) -> Accumulator:
    if task.type == "binary":
        return BinaryQuality(task.threshold)
    if task.type == "multiclass":
        return MulticlassQuality(task.classes)
    return RegressionQuality()


@dataclass(slots=True)
class _Version:
    task: Task
    windows: QualityWindows[Any]
    # binary: served scores waiting to fold into the windows (the estimate), one-row responses
    # as floats, others as arrays
    singles: list[float] = field(default_factory=list)
    arrays: list[np.ndarray] = field(default_factory=list)
    labelled_at: float = 0.0  # monotonic time of the last labels (a version not loaded here)


# A routed response waiting for the next drain: its version, its task's output, the client's id
Response = tuple[ModelVersion, np.ndarray | None, str | None]


class Quality:
    def __init__(
        self,
        registry: Registry,
        store: PredictionStore,
        *,
        window_s: float,
        flush_s: float = 0.2,
        max_pending: int = 100_000,
        exchange: CountsExchange | None = None,
        emit: Emit = emit_nothing,
    ) -> None:
        self.registry = registry
        self.store = store
        self.window_s = window_s
        self.flush_s = flush_s
        self.max_pending = max_pending
        self.exchange = exchange
        self.emit = emit
        self._versions: dict[tuple[str, str], _Version] = {}
        # the request path's shortcut: id(ModelVersion) -> (that object, its state), pruned of
        # versions no longer loaded at each flush
        self._bound: dict[int, tuple[ModelVersion, _Version]] = {}
        self._responses: list[Response] = []
        self._pending: list[Served] = []
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()
        # counters for /metrics: outcomes by (model, result); predictions dropped while the
        # store was away; responses whose task output was missing or misshapen
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.dropped = 0
        self.unshaped = 0
        self.store_failures = 0
        self._breached: dict[tuple[str, str, str], bool] = {}
        self._serialized: dict[str, bytes] = {}
        if exchange is not None:
            exchange.sources.append(self.blobs)

    # -- request path ---------------------------------------------------------------------------
    def served(
        self, info: ModelVersion, outputs: Mapping[str, np.ndarray], request_id: str | None
    ) -> None:
        """A routed response of a version with a task (``info.task`` is not None): kept as it
        is (the version, its task's output alone, the client's id) until the next flush reads
        it, so the request pays one lookup and one append (loadtests.stage_cost)."""
        if len(self._responses) < self.max_pending:
            self._responses.append((info, outputs.get(info.task.output), request_id))  # type: ignore[union-attr]
        else:
            self.dropped += 1

    def _drain(self, now: float) -> None:
        """Read the responses buffered since the last drain: each row's value into its version's
        scores (binary: the estimate), each one-row response with an id into the predictions
        for the join's store; then fold the scores into the windows."""
        responses, self._responses = self._responses, []
        if responses:
            wall = time.time()  # when they were served, within a flush period
            pending, bound = self._pending, self._bound
            for info, array, request_id in responses:
                task = info.task
                assert task is not None
                if array is None:  # the client asked for other outputs
                    self.unshaped += 1
                    continue
                known = bound.get(id(info))
                if known is None or known[0] is not info:
                    known = bound[id(info)] = (info, self._state(info.model, info.version, task))
                state = known[1]
                if array.ndim and array.shape[0] == 1:
                    value = task.one(array)
                    if value is None:
                        self.unshaped += 1
                        continue
                    if task.type == "binary":
                        state.singles.append(value)
                    if request_id is not None:
                        pending.append(Served(info.model, request_id, info.version, value, wall))
                    continue
                # several rows: no prediction to remember (one id, several rows)
                values = task.values({task.output: array})
                if values is None:
                    self.unshaped += 1
                elif task.type == "binary":
                    state.arrays.append(values)
            over = len(pending) - self.max_pending
            if over > 0:  # the store has been away: the oldest go
                self.dropped += over
                del pending[:over]
        for state in self._versions.values():
            self._fold(state, now)

    def _state(self, model: str, version: str, task: Task) -> _Version:
        state = self._versions.get((model, version))
        if state is None or state.task != task:

            def make() -> Accumulator:
                return accumulator(task)

            state = _Version(task, QualityWindows(make, self.window_s))
            self._versions[(model, version)] = state
        return state

    @staticmethod
    def _fold(state: _Version, now: float) -> None:
        singles, arrays = state.singles, state.arrays
        if not singles and not arrays:
            return
        state.singles, state.arrays = [], []
        parts = [np.asarray(singles, np.float64), *arrays] if singles else arrays
        merged = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=None)
        state.windows.slot(now).observe_unlabelled(merged)

    # -- background -----------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="quality flush")

    async def stop(self) -> None:
        await stop_task(self._task)
        try:
            await self.flush()
        except StoreUnavailable as exc:
            log.warning("%d predictions not remembered at shutdown: %s", len(self._pending), exc)
        await self.store.close()

    async def _flush_loop(self) -> None:
        exchange = self.exchange
        publish_s = exchange.interval_s if exchange is not None and exchange.shared else None
        serialized = -math.inf
        while True:
            await asyncio.sleep(self.flush_s)
            try:
                await self.flush()
            except StoreUnavailable as exc:
                log.warning("predictions not remembered (kept for the next try): %s", exc)
            except Exception:  # a bug in one flush must not end the flushes for good
                log.exception("quality flush failed")
            now = time.monotonic()
            if publish_s is not None and now - serialized >= publish_s:
                serialized = now
                try:
                    await self.serialize(now)
                except Exception:
                    log.exception("quality accumulators not serialized for the fleet")

    async def serialize(self, now: float) -> None:
        """Prepare what ``blobs`` publishes: the accumulators merged here, on the event loop
        (tens of µs each), their bytes on a worker thread (zlib: milliseconds for a busy binary
        version, which would otherwise hold the loop once a second)."""
        merged: dict[str, Accumulator] = {}
        for (model, version), state in self._versions.items():
            self._fold(state, now)
            merged[f"{_PREFIX}{model}/{version}/window"] = state.windows.window(now)
            merged[f"{_PREFIX}{model}/{version}/all"] = state.windows.cumulative()

        def encode() -> dict[str, bytes]:
            return {name: acc.to_bytes() for name, acc in merged.items()}

        self._serialized = await asyncio.to_thread(encode)

    async def flush(self) -> None:
        """Fold buffered scores into the windows; send buffered predictions to the store (on
        failure they are kept, within ``max_pending``, and StoreUnavailable raised)."""
        now = time.monotonic()
        self._drain(now)
        self._prune(now)
        async with self._flushing:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                await self.store.remember(batch)
            except StoreUnavailable:
                self.store_failures += 1
                kept = batch + self._pending
                over = len(kept) - self.max_pending
                if over > 0:  # the oldest go
                    self.dropped += over
                    kept = kept[over:]
                self._pending = kept
                raise

    # -- outcomes -------------------------------------------------------------------------------
    def task_of(self, model: str) -> Task:
        """The task of the model's newest ready version that declares one."""
        versions = self.registry.ready_versions(model)
        if not versions and not self.registry.known(model):
            raise NotFound(f"unknown model {model[:100]!r}")
        for version in reversed(versions):
            task = self.registry.get(model, version).info.task
            if task is not None:
                return task
        raise BadRequest(
            f'model {model!r} declares no task (metadata.json "task"): its outcomes cannot be '
            "judged; see docs/model-repository.md"
        )

    async def take(
        self, model: str, body: Mapping[str, Any], task: Task | None = None
    ) -> tuple[dict[str, Any], bool]:
        """A batch of labels (``{"outcomes": [{"id", "label"}, ...]}``) checked against
        ``task`` (default: ``task_of(model)``): the answer, and whether every outcome in it
        was a conflict. StoreUnavailable when the store cannot say."""
        task = task or self.task_of(model)
        items = body.get("outcomes")
        if not isinstance(items, list):
            raise BadRequest('outcomes: required, a list of {"id": ..., "label": ...}')
        if not items:
            raise BadRequest("outcomes: must not be empty")
        if len(items) > MAX_OUTCOMES:
            raise BadRequest(f"outcomes: at most {MAX_OUTCOMES} in one batch, got {len(items)}")
        counts = dict.fromkeys(RESULT_KINDS, 0)
        # the first few offending ids of each kind (an accepted or duplicate label is fine)
        examples: dict[str, list[Any]] = {
            k: [] for k in ("conflict", "unknown", "expired", "invalid")
        }
        labels: list[tuple[str, float]] = []
        for index, item in enumerate(items):
            try:
                labels.append(_outcome(item, task))
            except TaskError as exc:
                counts["invalid"] += 1
                if len(examples["invalid"]) < EXAMPLES:
                    examples["invalid"].append({"index": index, "error": str(exc)})
        if labels:
            # this process's latest predictions join too; the claim says if the store answers
            with contextlib.suppress(StoreUnavailable):
                await self.flush()
        now = time.time()
        for start in range(0, len(labels), CLAIM_CHUNK):
            chunk = labels[start : start + CLAIM_CHUNK]
            claims = await self.store.claim(model, chunk, now)
            joined: dict[str, tuple[list[float], list[float]]] = {}
            for (request_id, label), claim in zip(chunk, claims, strict=True):
                counts[claim.result] += 1
                if claim.result == "accepted":
                    assert claim.version is not None and claim.value is not None
                    values, taken = joined.setdefault(claim.version, ([], []))
                    values.append(claim.value)
                    taken.append(label)
                elif claim.result in examples and len(examples[claim.result]) < EXAMPLES:
                    examples[claim.result].append(request_id)
            for version, (values, taken) in joined.items():  # as each chunk is taken: a 503
                self._observe(model, version, task, values, taken)  # later loses none of it
        for kind, n in counts.items():
            if n:
                self.outcomes[(model, kind)] += n
        answer: dict[str, Any] = {"model": model, **counts}
        answer["ids"] = {kind: ids for kind, ids in examples.items() if ids}
        return answer, counts["conflict"] == len(items)

    def _prune(self, now: float) -> None:
        """Forget versions no longer loaded here once a quality window has passed without
        labels for them (labels for a version another replica serves still count meanwhile),
        and the request path's shortcuts to unloaded versions."""
        loaded = self.registry.loaded()
        if self._bound:
            ids = {id(lv.info) for lv in loaded}
            for key in [k for k in self._bound if k not in ids]:
                del self._bound[key]
        names = {(lv.info.model, lv.info.version) for lv in loaded}
        for name, state in list(self._versions.items()):
            if name not in names and now - state.labelled_at > self.window_s:
                del self._versions[name]

    def _observe(
        self, model: str, version: str, task: Task, values: list[float], labels: list[float]
    ) -> None:
        try:
            own = self.registry.get(model, version).info.task
        except GatewayError:  # not loaded here: the model's task
            own = None
        state = self._state(model, version, own or task)
        now = time.monotonic()
        state.labelled_at = now
        slot = state.windows.slot(now)
        slot.observe(np.asarray(values, np.float64), np.asarray(labels, np.float64))

    # -- views ----------------------------------------------------------------------------------
    def blobs(self, now: float) -> dict[str, bytes]:
        """This process's accumulators for the fleet (the window and everything, per version),
        as ``serialize`` last prepared them: the counts exchange publishes them."""
        return self._serialized

    def local(self, model: str, version: str, which: Which, now: float) -> Accumulator | None:
        self._drain(now)
        state = self._versions.get((model, version))
        if state is None:
            return None
        merged: Accumulator = (
            state.windows.window(now) if which == "window" else state.windows.cumulative()
        )
        return merged

    async def view(
        self, which: Which, scope: Scope, keys: Iterable[tuple[str, str]] | None = None
    ) -> tuple[dict[tuple[str, str], Accumulator], int]:
        """Accumulators per (model, version) of ``scope`` (of ``keys`` only, when given), and
        the processes they come from. Versions this process has no task for are left out."""
        now = time.monotonic()
        self._drain(now)
        wanted = None if keys is None else set(keys)
        out: dict[tuple[str, str], Accumulator] = {}
        for key in self._versions:
            if wanted is None or key in wanted:
                local = self.local(*key, which, now)
                if local is not None:
                    out[key] = local
        if self.exchange is None:
            return out, 1
        others, members = await self.exchange.others(scope)
        suffix = f"/{which}"
        for blobs in others:
            for name, blob in blobs.items():
                if not (name.startswith(_PREFIX) and name.endswith(suffix)):
                    continue
                model, _, version = name[len(_PREFIX) : -len(suffix)].rpartition("/")
                key = (model, version)
                if wanted is not None and key not in wanted:
                    continue
                task = self._task_here(model, version)
                if task is None:
                    continue
                try:
                    found = _DECODE[task.type].from_bytes(blob)
                    mine = out.get(key)
                    if mine is None:
                        mine = out[key] = accumulator(task)
                    mine.merge(found)  # type: ignore[arg-type]
                except ValueError as exc:
                    log.warning("quality counters %r of a member skipped: %s", name, exc)
        return out, members

    def _task_here(self, model: str, version: str) -> Task | None:
        state = self._versions.get((model, version))
        if state is not None:
            return state.task
        try:
            return self.registry.get(model, version).info.task
        except GatewayError:
            return None

    async def report(self, model: str, version: str, which: Which, scope: Scope) -> dict[str, Any]:
        """GET /v2/models/{m}/versions/{v}/quality."""
        info = self.registry.get(model, version).info
        task = info.task
        if task is None:
            raise NotFound(
                f'model {model!r} version {version} declares no task (metadata.json "task")'
            )
        found, members = await self.view(which, scope, [(model, version)])
        acc = found.get((model, version)) or accumulator(task)
        realized = {name: f.as_json() for name, f in acc.realized().items()}
        out: dict[str, Any] = {
            "model": model,
            "version": version,
            "task": task.as_json(),
            "window": which,
            "window_s": self.window_s if which == "window" else None,
            "scope": scope,
            "processes": members,
            "confidence": 0.95,
            "labels": acc.labelled,
            "rejected": acc.rejected,
            "realized": realized,
        }
        if isinstance(acc, BinaryQuality):
            realized_counts = acc.realized()
            positives = int((realized_counts["tp"].value or 0) + (realized_counts["fn"].value or 0))
            out["label_counts"] = {"1": positives, "0": acc.labelled - positives}
            out["served"] = acc.unlabelled
            out["estimated"] = {name: f.as_json() for name, f in acc.estimated().items()}
        elif isinstance(acc, MulticlassQuality):
            per_class = acc.per_class()
            names = task.names or tuple(str(i) for i in range(task.classes))
            out["per_class"] = {
                name: {k: f.as_json() for k, f in figures.items()}
                for name, figures in zip(names, per_class, strict=True)
            }
            out["label_counts"] = {
                name: figures["recall"].n for name, figures in zip(names, per_class, strict=True)
            }
        out["join"] = {kind: self.outcomes[(model, kind)] for kind in RESULT_KINDS}
        return out

    # -- guards ---------------------------------------------------------------------------------
    async def guard_windows(
        self, model: str, doc: PolicyDoc, spec: GuardSpec
    ) -> dict[str, QualityWindow]:
        """Each subject's quality, fleet-wide over the quality window, for the quality guards."""
        subjects = doc.subjects()
        keys = {(model, s.version) for s in subjects} | {
            (model, s.baseline) for s in subjects if s.baseline is not None
        }
        found, _ = await self.view("window", "fleet", keys)
        metrics = {m for m, _ in spec.min_quality} | {
            m for m, _ in spec.max_quality_drop_vs_baseline
        }
        out: dict[str, QualityWindow] = {}
        for subject in subjects:
            acc = found.get((model, subject.version))
            if acc is None:
                out[subject.version] = QualityWindow()
                continue
            figures = _realized(acc, spec.confidence)
            drops: dict[str, float | None] = {}
            base_labels = 0
            base = found.get((model, subject.baseline)) if subject.baseline else None
            if base is not None and type(base) is type(acc):
                base_labels = base.labelled
                base_figures = _realized(base, spec.confidence)
                for metric, _ in spec.max_quality_drop_vs_baseline:
                    if metric in figures and metric in base_figures:
                        try:
                            drops[metric] = drop_bound(
                                figures[metric], base_figures[metric], spec.confidence
                            )
                        except ValueError:
                            drops[metric] = None
            out[subject.version] = QualityWindow(
                labels=acc.labelled,
                figures={
                    m: QualityFigure(f.value, f.low, f.high, f.n)
                    for m, f in figures.items()
                    if m in metrics
                },
                drops=drops,
                baseline_labels=base_labels,
            )
        return out

    def judged(self, model: str, evaluation: Evaluation) -> None:
        """Emit quality.breached / quality.recovered when a ``min_quality`` check of a version
        changes between breach and pass (the guard leader judges; its checks are the fleet's)."""
        for check in evaluation.checks:
            if not check.guard.startswith("min_quality.") or check.status not in ("breach", "pass"):
                continue
            metric = check.guard.removeprefix("min_quality.")
            key = (model, check.version, metric)
            breached = check.status == "breach"
            if self._breached.get(key, False) == breached:
                continue
            if breached or key in self._breached:
                kind = "quality.breached" if breached else "quality.recovered"
                data = {
                    "metric": metric,
                    "value": check.detail.get("value"),
                    "bound": check.value,
                    "floor": check.threshold,
                }
                self.emit(kind, f"{model}/{check.version}", data)
            self._breached[key] = breached

    # -- metrics --------------------------------------------------------------------------------
    def join_stats(self) -> dict[str, Any]:
        entries = getattr(self.store, "entries", None)
        return {
            "entries": entries,
            "bytes": getattr(self.store, "bytes", None),
            "evictions": dict(getattr(self.store, "evictions", {})),
            "pending": len(self._pending) + len(self._responses),
        }


def _realized(acc: Accumulator, confidence: float) -> dict[str, Figure]:
    return {m: f for m, f in acc.realized(confidence).items() if m in QUALITY_METRICS}


def _outcome(item: Any, task: Task) -> tuple[str, float]:
    if not isinstance(item, Mapping):
        raise TaskError('an outcome is an object {"id": ..., "label": ...}')
    request_id = item.get("id")
    if not isinstance(request_id, str) or not request_id:
        raise TaskError("id: required, the id of an inference request")
    if len(request_id) > MAX_ID_CHARS:
        raise TaskError(f"id: at most {MAX_ID_CHARS} characters, got {len(request_id)}")
    if "label" not in item:
        raise TaskError(f"label: required for id {request_id[:40]!r}")
    try:
        return request_id, task.label(item["label"])
    except TaskError as exc:
        raise TaskError(f"label of id {request_id[:40]!r}: {exc}") from None
