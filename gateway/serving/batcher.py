"""Dynamic batching behind the Runtime seam: one ``BatchingRuntime`` per model version.

Rules: all state is owned by the event-loop thread (``run``, ``close`` and every callback run
there); the executor thread only runs ``_execute``, which reads its arguments and returns.
Merging assumes the model is row-independent along axis 0; a model that is not can opt out with
``{"enabled": false}`` in its ``config.json`` (it then keeps the queue limit and deadlines).
A request never fails because of what it was merged with: when a merged run fails, each of its
requests runs again alone, so only the ones that fail by themselves get the error.
A request whose caller leaves while it waits in the queue is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from time import monotonic as _clock
from typing import Protocol

import numpy as np

from gateway.errors import (
    BadRequest,
    ClientGone,
    GatewayError,
    ModelError,
    NotReady,
    Overloaded,
    Timeout,
)
from gateway.serving.statistics import Figures
from gateway.serving.types import Receive, TensorSpec

log = logging.getLogger("turnout.batcher")

Arrays = dict[str, np.ndarray]
_EWMA = 0.2  # weight of the newest batch in the Retry-After estimate
# Distinct batch sizes a version's statistics keep: merged runs take at most max_batch_size rows,
# but a request above it runs alone at the size its client chose.
MAX_BATCH_SIZES = 128


class BlockingRuntime(Protocol):
    """What the batcher wraps: a session that runs on the calling thread (``SessionRuntime``)."""

    def run_sync(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchConfig:
    enabled: bool = True
    max_batch_size: int = 64  # rows per merged run; a larger request runs alone
    max_queue_delay_us: int = 0  # how long the oldest request may wait for a batch to fill
    max_queue: int = 256  # requests waiting (not running) before Overloaded
    max_concurrent_batches: int = 1
    # rows (first axis) one request may have; None: only the gateway's --max-batch-rows
    max_rows_per_request: int | None = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "enabled":
                if not isinstance(value, bool):
                    raise ValueError(f"'enabled' must be true or false, got {value!r}")
                continue
            if f.name == "max_rows_per_request" and value is None:
                continue
            least = 0 if f.name == "max_queue_delay_us" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                kind = "a non-negative" if least == 0 else "a positive"
                raise ValueError(f"{f.name!r} must be {kind} integer, got {value!r}")

    @classmethod
    def from_file(cls, path: Path, defaults: BatchConfig | None = None) -> BatchConfig:
        """``defaults`` overridden by the keys of the JSON object in ``path`` (absent file: the
        defaults). Raises ValueError naming the file and the offending key."""
        base = cls() if defaults is None else defaults
        try:
            text = path.read_text()
        except FileNotFoundError:
            return base
        except OSError as exc:
            raise ValueError(f"cannot read {path.name}: {exc.strerror or exc}") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{path.name} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"{path.name} must hold a JSON object")
        known = [f.name for f in dataclasses.fields(cls)]
        for key in doc:
            if key not in known:
                raise ValueError(f"{path.name}: unknown key {key!r}; expected any of {known}")
        try:
            return dataclasses.replace(base, **doc)
        except ValueError as exc:
            raise ValueError(f"{path.name}: {exc}") from None


@dataclass(slots=True)
class BatchStats:
    """Counters since construction, for export. ``rows / batches`` is the mean batch size.

    A request run at once on the event loop (alone, the light path) touches only the ``lone*``
    fields and its batch size's entry; the totals below add them up when read (a few fewer
    counters on the path every light request takes: loadtests/batcher_cost.py)."""

    queued_requests: int = 0  # accepted into the queue
    queued_batches: int = 0  # inner runs of queued requests (merged, alone, or reruns)
    queued_rows: int = 0  # rows over those runs, a failed merged run included
    rejected: int = 0  # Overloaded (429)
    timed_out: int = 0  # Timeout (504)
    failed: int = 0  # requests failed by a model error (their own: see ``isolated``)
    isolated: int = 0  # merged runs that failed and were rerun one request at a time
    cancelled: int = 0  # abandoned by the caller
    abandoned: int = 0  # dropped from the queue unrun: the client left (ClientGone, 499)
    merged_inline: int = 0  # queued runs made on the event loop (light requests merged)
    unready: int = 0  # requests failed with 503: the version was unloaded while they waited
    # Requests run at once on the loop: how many, their rows, their seconds in the session; of
    # them, the ones that failed (counted in ``failed`` too) and their rows.
    lone: int = 0
    lone_rows: int = 0
    lone_s: float = 0.0
    lone_failed: int = 0
    lone_failed_rows: int = 0
    # Triton's statistics extension (gateway.http.triton), for queued requests that got their
    # outputs: their count, seconds in the runtime (queue to outputs), queued, concatenating
    # inputs, in the session and slicing outputs (a merged run's times count once per request
    # it holds), their rows; ``fail_s``: the seconds of every request that failed (429, 504,
    # 500, 503 on unload); ``last``: the monotonic time of the latest success.
    queued_succeeded: int = 0
    queued_succeeded_s: float = 0.0
    queue_s: float = 0.0
    input_s: float = 0.0
    queued_infer_s: float = 0.0
    output_s: float = 0.0
    queued_inferences: int = 0
    fail_s: float = 0.0
    last: float = 0.0
    # successful inner runs by rows: [runs, input seconds, run seconds, output seconds]; at
    # most MAX_BATCH_SIZES sizes (the first ones seen), runs of other sizes go to ``unlisted``
    sizes: dict[int, list[float]] = field(default_factory=dict)
    unlisted: list[float] = field(default_factory=lambda: [0, 0.0, 0.0, 0.0])

    def size(self, rows: int) -> list[float]:
        """The entry of inner runs of ``rows`` rows (the shared unlisted one past the cap)."""
        entry = self.sizes.get(rows)
        if entry is None:
            if len(self.sizes) >= MAX_BATCH_SIZES:
                return self.unlisted
            entry = self.sizes[rows] = [0, 0.0, 0.0, 0.0]
        return entry

    @property
    def requests(self) -> int:
        return self.queued_requests + self.lone

    @property
    def batches(self) -> int:
        """Inner runs."""
        return self.queued_batches + self.lone

    @property
    def rows(self) -> int:
        """Rows over all inner runs, failed ones included."""
        return self.queued_rows + self.lone_rows

    @property
    def inline(self) -> int:
        """Inner runs on the event loop: light requests, alone or merged."""
        return self.lone + self.merged_inline

    @property
    def succeeded(self) -> int:
        """Requests that got their outputs."""
        return self.queued_succeeded + self.lone - self.lone_failed

    @property
    def succeeded_s(self) -> float:
        return self.queued_succeeded_s + self.lone_s

    @property
    def infer_s(self) -> float:
        return self.queued_infer_s + self.lone_s

    @property
    def inferences(self) -> int:
        """Rows of the requests that got their outputs."""
        return self.queued_inferences + self.lone_rows - self.lone_failed_rows

    @property
    def fail(self) -> int:
        """Requests the runtime failed: 429, 504, 500, 503."""
        return self.rejected + self.timed_out + self.failed + self.unready

    def figures(self) -> Figures:
        """The statistics extension's figures now (a copy: the counters move on)."""
        last_ms = 0
        if self.last:
            last_ms = int((time.time() - (time.monotonic() - self.last)) * 1000)
        return Figures(
            succeeded=self.succeeded,
            succeeded_s=self.succeeded_s,
            fail=self.fail,
            fail_s=self.fail_s,
            queue_s=self.queue_s,
            input_s=self.input_s,
            infer_s=self.infer_s,
            output_s=self.output_s,
            inferences=self.inferences,
            executions=self.batches,
            last_ms=last_ms,
            unlisted=int(self.unlisted[0]),
            sizes={rows: list(entry) for rows, entry in self.sizes.items()},
        )


@dataclass(slots=True, eq=False)  # identity hash: requests are members of an ordered set
class _Request:
    inputs: Mapping[str, np.ndarray]
    outputs: tuple[str, ...]
    rows: int
    key: Hashable | None  # requests merge only with an equal key; None never merges
    deadline: float | None
    future: asyncio.Future[Arrays]
    enqueued: float = field(default_factory=time.monotonic)
    timer: asyncio.TimerHandle | None = None
    watch: asyncio.Task[None] | None = None  # waits for the client to leave while queued


# (rows, seconds concatenating inputs, seconds in the session, seconds slicing outputs)
_Run = tuple[int, float, float, float]


@dataclass(frozen=True, slots=True)
class _Outcome:
    # per request: its outputs, its own model error, or None (skipped: deadline passed or
    # caller gone)
    results: list[Arrays | GatewayError | None]
    rows: int  # over all inner runs, a failed merged run included
    seconds: float
    runs: int = 1
    isolated: bool = False
    started: float = 0.0  # time.monotonic() when the batch left the queue
    # the inner runs that produced outputs: one merged run that every result comes from
    # (``shared``), or one run per request that ran alone
    made: tuple[_Run, ...] = ()
    shared: bool = False


class BatchingRuntime:
    """Merges concurrent requests to one version into one run of ``inner`` on ``executor``.

    No background task: the queue is pumped when a request arrives, when a batch finishes and
    when a queue-delay timer fires, so construction needs no event loop (loaders run on
    threads). ``on_batch(rows, seconds)`` is called on the loop after every inner run.
    """

    def __init__(
        self,
        inner: BlockingRuntime,
        inputs: Sequence[TensorSpec],
        executor: Executor,
        config: BatchConfig | None = None,
        *,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
        inline_rows: int = 0,
        busy: Callable[[], bool] = lambda: False,
        default_timeout_s: float | None = None,
    ) -> None:
        """``inline_rows``: a request of at most this many rows that finds the queue empty, the
        session idle and the server not ``busy`` (gateway.serving.backlog) runs right away on the
        event loop thread, skipping the thread hop (for models that take microseconds, the hop
        costs more than the run; when requests wait behind it, merging them costs less).
        ``default_timeout_s``: the deadline of a queued request that brought none (one run
        inline starts at once: it needs none, and pays no clock read for it)."""
        self.config = BatchConfig() if config is None else config
        self.name = name
        self.stats = BatchStats()
        self._inner = inner
        self._executor = executor
        self._on_batch = on_batch
        self._merge = self.config.enabled and bool(inputs) and all(s.batched for s in inputs)
        self._queue: dict[_Request, None] = {}  # insertion-ordered set, O(1) removal
        self._inflight = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        self._closed = False
        self._default_timeout_s = default_timeout_s
        self._batch_s = 0.0
        self._per_batch = 1.0
        self._inline_rows = inline_rows
        self._busy = busy

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def merging(self) -> bool:
        return self._merge

    @property
    def default_timeout_s(self) -> float | None:
        """The deadline a queued request without one of its own gets (None: none)."""
        return self._default_timeout_s

    async def run(
        self,
        inputs: Mapping[str, np.ndarray],
        outputs: Sequence[str],
        *,
        deadline: float | None = None,
        receive: Receive | None = None,
    ) -> Arrays:
        """``deadline`` is an absolute ``time.monotonic()`` value: past it the request fails
        with Timeout, and is not run if its batch has not started. ``receive``, the request's
        ASGI receive once its body is read, is watched only while the request waits in the
        queue: when the client leaves, the request fails with ClientGone and is not run."""
        if self._closed:
            raise NotReady(f"{self.name} is unloading")
        if deadline is not None and deadline <= time.monotonic():
            self.stats.timed_out += 1
            raise Timeout(f"deadline passed before {self.name} could run the request")
        rows = _rows(inputs)
        cap = self.config.max_rows_per_request
        if cap is not None and rows > cap:
            raise BadRequest(
                f"{rows} rows, above the limit of {cap} per request of {self.name} "
                "(max_rows_per_request in its config.json)"
            )
        if (
            rows <= self._inline_rows
            and not self._queue
            and not self._inflight
            and not self._busy()
        ):
            stats = self.stats
            stats.lone += 1
            stats.lone_rows += rows
            started = _clock()
            try:
                out = self._inner.run_sync(inputs, outputs)
            except Exception:
                stats.failed += 1
                stats.lone_failed += 1
                stats.lone_failed_rows += rows
                stats.fail_s += _clock() - started
                raise
            took = _clock() - started
            stats.lone_s += took
            stats.last = started
            entry = stats.sizes.get(rows) or stats.size(rows)
            entry[0] += 1
            entry[2] += took
            return out
        loop = self._bind()
        if len(self._queue) >= self.config.max_queue:
            self.stats.rejected += 1
            raise Overloaded(
                f"{self.name} is overloaded: {len(self._queue)} requests queued",
                self._retry_after(),
            )
        if deadline is None and self._default_timeout_s is not None:
            deadline = time.monotonic() + self._default_timeout_s
        key = self._key(inputs, outputs)
        request = _Request(inputs, tuple(outputs), rows, key, deadline, loop.create_future())
        if deadline is not None:
            request.timer = loop.call_later(deadline - time.monotonic(), self._expire, request)
        request.future.add_done_callback(partial(self._settled, request))
        self._queue[request] = None
        self.stats.queued_requests += 1
        if rows <= self._inline_rows and self._busy():
            # Requests wait for the loop behind this one: pump once they have been queued too,
            # and run what merges here on the loop (see _launch). Not watched: it waits one turn.
            if self._soon is None:
                self._soon = loop.call_soon(self._pump)
        else:
            self._pump()
            if receive is not None and request in self._queue:
                request.watch = loop.create_task(self._watch(request, receive))
        return await request.future

    def cheap(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """Whether a run of ``inputs`` is estimated under the inline threshold: cheaper on the
        event loop than the thread hop it would take."""
        return _rows(inputs) <= self._inline_rows

    def run_sync(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        """Unbatched, on the calling thread (shadow copies)."""
        if self._closed:
            raise NotReady(f"{self.name} is unloading")
        return self._inner.run_sync(inputs, outputs)

    def close(self) -> None:
        """Fail queued requests with NotReady; close ``inner`` once running batches finish.
        Call on the event-loop thread."""
        if self._closed:
            return
        self._closed = True
        if self._wakeup is not None:
            self._wakeup.cancel()
        if self._soon is not None:
            self._soon.cancel()
        now = time.monotonic()
        for request in list(self._queue):
            del self._queue[request]
            if not request.future.done():
                self.stats.unready += 1
                self.stats.fail_s += now - request.enqueued
                request.future.set_exception(NotReady(f"{self.name} was unloaded"))
        if self._inflight == 0:
            self._inner.close()

    # -- queue (event-loop thread) ----------------------------------------------------------
    def _bind(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._queue or self._inflight:
                raise RuntimeError(f"{self.name}: batcher is busy on another event loop")
            self._loop = loop
        return loop

    def _key(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Hashable | None:
        """What requests must share to be merged; None: never merged."""
        sizes = {a.shape[0] if a.ndim else 0 for a in inputs.values()}
        if not self._merge or len(sizes) != 1 or any(a.ndim == 0 for a in inputs.values()):
            return None
        parts = tuple((n, inputs[n].dtype, inputs[n].shape[1:]) for n in sorted(inputs))
        return (tuple(outputs), parts)

    def _expire(self, request: _Request) -> None:
        if not request.future.done():
            self.stats.timed_out += 1
            self.stats.fail_s += time.monotonic() - request.enqueued
            request.future.set_exception(Timeout(f"deadline passed before {self.name} answered"))

    async def _watch(self, request: _Request, receive: Receive) -> None:
        """Until the client leaves: then drop the request if it still waits, and answer it."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server whose receive fails: the request just is not watched
            return
        if request.future.done():
            return
        if request in self._queue:  # else its batch has started: the result is dropped
            del self._queue[request]
            self.stats.abandoned += 1
        request.future.set_exception(ClientGone(f"the client left before {self.name} answered"))

    def _settled(self, request: _Request, future: asyncio.Future[Arrays]) -> None:
        if request.timer is not None:
            request.timer.cancel()
        if request.watch is not None:
            request.watch.cancel()
        self._queue.pop(request, None)
        if future.cancelled():
            self.stats.cancelled += 1

    def _pump(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self._wakeup is not None:
            self._wakeup.cancel()
            self._wakeup = None
        while self._queue and not self._closed:
            if self._inflight >= self.config.max_concurrent_batches:
                return
            batch, wait = self._take()
            if wait > 0:
                assert self._loop is not None
                self._wakeup = self._loop.call_later(wait, self._pump)
                return
            if batch:
                self._launch(batch)

    def _take(self) -> tuple[list[_Request], float]:
        """The oldest live request plus later compatible ones that fit, or how long to wait
        for more (only while the queue delay allows)."""
        now = time.monotonic()
        limit = self.config.max_batch_size
        batch: list[_Request] = []
        rows = 0
        for request in list(self._queue):
            if request.future.done():
                del self._queue[request]
            elif request.deadline is not None and request.deadline <= now:
                del self._queue[request]
                self._expire(request)
            elif not batch:
                batch.append(request)
                rows = request.rows
                if request.key is None or rows >= limit:
                    break
            elif request.key == batch[0].key and rows + request.rows <= limit:
                batch.append(request)
                rows += request.rows
                if rows >= limit:
                    break
        if not batch:
            return [], 0.0
        delay = self.config.max_queue_delay_us / 1e6
        if delay and batch[0].key is not None and rows < limit:
            wait = batch[0].enqueued + delay - now
            if wait > 0 and len(self._queue) < self.config.max_queue:
                return [], wait
        for request in batch:
            del self._queue[request]
        return batch, 0.0

    def _launch(self, batch: list[_Request]) -> None:
        assert self._loop is not None
        if sum(r.rows for r in batch) <= self._inline_rows:
            # Light requests merged while the loop was busy: one run here costs less than the
            # thread hop, as a lone light request's does.
            try:
                outcome = self._execute(batch)
            except Exception as exc:
                self._fail(batch, self._translate(exc))
            else:
                self.stats.merged_inline += outcome.runs
                self._deliver(batch, outcome)
            return
        try:
            future = self._loop.run_in_executor(self._executor, self._execute, batch)
        except RuntimeError:  # the executor was shut down
            self._fail(batch, NotReady(f"{self.name} is shutting down"))
            return
        self._inflight += 1
        future.add_done_callback(partial(self._finished, batch))

    def _finished(self, batch: list[_Request], future: asyncio.Future[_Outcome]) -> None:
        self._inflight -= 1
        if self._closed and self._inflight == 0:
            self._inner.close()
        if future.cancelled():
            self._fail(batch, NotReady(f"{self.name} is shutting down"))
        elif (exc := future.exception()) is not None:
            self._fail(batch, self._translate(exc))
        else:
            self._deliver(batch, future.result())
        self._pump()

    def _deliver(self, batch: list[_Request], outcome: _Outcome) -> None:
        stats = self.stats
        now = time.monotonic()
        ok = ok_rows = 0
        enqueued = 0.0  # summed over the requests answered: their times, added once below
        for request, result in zip(batch, outcome.results, strict=True):
            if result is None:
                self._expire(request)
            elif request.future.done():
                pass
            elif isinstance(result, GatewayError):
                stats.failed += 1
                stats.fail_s += now - request.enqueued
                request.future.set_exception(result)
            else:
                request.future.set_result(result)
                ok += 1
                ok_rows += request.rows
                enqueued += request.enqueued
        if ok:
            stats.queued_succeeded += ok
            stats.queued_succeeded_s += ok * now - enqueued
            stats.queue_s += ok * outcome.started - enqueued
            stats.queued_inferences += ok_rows
            stats.last = now
            for rows, input_s, infer_s, output_s in outcome.made:
                entry = stats.size(rows)
                entry[0] += 1
                entry[1] += input_s
                entry[2] += infer_s
                entry[3] += output_s
                # a merged run's times count once for each request it answered
                each = ok if outcome.shared else 1
                stats.input_s += each * input_s
                stats.queued_infer_s += each * infer_s
                stats.output_s += each * output_s
        self.stats.isolated += outcome.isolated
        ran = sum(r is not None for r in outcome.results)
        if ran:
            self.stats.queued_batches += outcome.runs
            self.stats.queued_rows += outcome.rows
            first = self.stats.queued_batches == outcome.runs
            self._batch_s = outcome.seconds if first else _ewma(self._batch_s, outcome.seconds)
            self._per_batch = ran if first else _ewma(self._per_batch, ran)
            if self._on_batch is not None:
                try:
                    self._on_batch(outcome.rows, outcome.seconds)
                except Exception:  # a metrics hook must not strand the callers
                    log.exception("%s: on_batch hook failed", self.name)

    def _fail(self, batch: list[_Request], exc: GatewayError) -> None:
        now = time.monotonic()
        for request in batch:
            if not request.future.done():
                self.stats.failed += 1
                self.stats.fail_s += now - request.enqueued
                # a copy per caller: one exception object raised in many tasks tangles tracebacks
                request.future.set_exception(copy.copy(exc))

    def _translate(self, exc: BaseException) -> GatewayError:
        if isinstance(exc, GatewayError):
            return exc
        log.error("%s: run failed", self.name, exc_info=exc)
        return ModelError(f"model execution failed: {exc!r}")

    def _retry_after(self) -> float:
        batches_ahead = math.ceil(len(self._queue) / max(self._per_batch, 1.0))
        drain_s = batches_ahead * self._batch_s / self.config.max_concurrent_batches
        return float(max(1, math.ceil(drain_s)))

    # -- executor thread (or the event loop, for light requests merged) ------------------------
    def _execute(self, batch: list[_Request]) -> _Outcome:
        now = time.monotonic()
        live = [
            i
            for i, r in enumerate(batch)
            if not r.future.done() and (r.deadline is None or r.deadline > now)
        ]
        results: list[Arrays | GatewayError | None] = [None] * len(batch)
        if not live:
            return _Outcome(results, 0, 0.0, runs=0, started=now)
        rows = sum(batch[i].rows for i in live)
        started = time.perf_counter()
        made: list[_Run] = []
        if len(live) == 1:
            results[live[0]] = self._alone(batch[live[0]], made)
            seconds = time.perf_counter() - started
            return _Outcome(results, rows, seconds, started=now, made=tuple(made))
        first = batch[live[0]]
        merged = {
            name: np.concatenate([batch[i].inputs[name] for i in live]) for name in first.inputs
        }
        ran = time.perf_counter()
        try:
            out = self._inner.run_sync(merged, first.outputs)
        except Exception:
            # Which request broke the run is unknown: rerun each alone, so that only the
            # requests that fail by themselves fail (a poisoned row costs its batch one run).
            runs, alone = self._each_alone(batch, live, results, made)
            seconds = time.perf_counter() - started
            return _Outcome(results, rows + alone, seconds, 1 + runs, True, now, tuple(made))
        done = time.perf_counter()
        if all(a.ndim >= 1 and a.shape[0] == rows for a in out.values()):
            start = 0
            for i in live:
                stop = start + batch[i].rows
                results[i] = {name: a[start:stop] for name, a in out.items()}
                start = stop
            end = time.perf_counter()
            run = (rows, ran - started, done - ran, end - done)
            return _Outcome(results, rows, end - started, started=now, made=(run,), shared=True)
        # outputs not aligned with input rows: this model cannot be batched
        log.warning("%s: outputs do not follow input rows; batching disabled", self.name)
        self._merge = False
        runs, alone = self._each_alone(batch, live, results, made)
        seconds = time.perf_counter() - started
        return _Outcome(results, rows + alone, seconds, 1 + runs, started=now, made=tuple(made))

    def _each_alone(
        self,
        batch: list[_Request],
        live: list[int],
        results: list[Arrays | GatewayError | None],
        made: list[_Run],
    ) -> tuple[int, int]:
        """Run ``batch[i]`` alone for each i in ``live`` whose caller still waits, into
        ``results`` (and ``made``); returns (runs, rows)."""
        runs = rows = 0
        for i in live:
            request = batch[i]
            if request.future.done():  # timed out or cancelled meanwhile: leave it skipped
                continue
            results[i] = self._alone(request, made)
            runs += 1
            rows += request.rows
        return runs, rows

    def _alone(self, request: _Request, made: list[_Run]) -> Arrays | GatewayError:
        """Run one request; a run that produced outputs is appended to ``made``."""
        started = time.perf_counter()
        try:
            out = self._inner.run_sync(request.inputs, request.outputs)
        except Exception as exc:
            return self._translate(exc)
        made.append((request.rows, 0.0, time.perf_counter() - started, 0.0))
        return out


def _rows(inputs: Mapping[str, np.ndarray]) -> int:
    """The request's rows: the longest first axis (0 for scalars)."""
    rows = 0
    for array in inputs.values():
        if array.ndim and array.shape[0] > rows:
            rows = array.shape[0]
    return rows


def _ewma(old: float, new: float) -> float:
    return (1.0 - _EWMA) * old + _EWMA * new
