"""Shadow traffic: copies of a request run on other versions off the critical path.

The caller never waits for a shadow: ``submit`` appends the copy to its pair's list (model,
primary version, shadow version) and makes sure one drain is due; no task per copy. Copies are
batched because a copy costs the event loop more than its model's run: with a task per copy, a
demo fraud copy took ~24 µs of loop time (a 6.5 µs run, 8.4 µs of small numpy comparisons, the
task), enough to raise the primary's p99 under load. The drain merges a pair's waiting
copies as the batcher merges requests (same input names, dtypes and trailing shapes, same
outputs, up to the shadow's ``max_batch_size`` rows), runs each group once and compares it at
once (``Divergence.add_merged``): 14 µs per copy at 4 copies per drain, 5.3 at 16, 3.0 at 64
(``loadtests/shadow_cost.py``). So that there is something to merge, the drain waits
``delay_s`` (5 ms: ~12 copies at 2,312 req/s), less once a pair has ``SOON`` copies waiting or
half of ``limit`` are taken; ``report`` runs the waiting copies first.

Where a group runs: one estimated under the inline threshold (``BatchingRuntime.cheap`` on the
merged inputs) on the event loop itself; any other on the shadows' own executor thread, so a
slow shadow cannot take the threads primary requests run on. (A light copy on a thread cost
more than its run: with one core, the copy's thread and the event loop handed the GIL back and
forth, and the primary's p99 at 2,312 req/s rose from 6.3 ms to 34.5 ms.) A pair has at most one
run on the thread; copies arriving meanwhile wait and merge into its next run.

A merged run that fails is rerun copy by copy, so only copies that fail by themselves count as
errors; a shadow whose outputs do not follow input rows is not merged again.

Primary requests come first: a drain that finds requests waiting for the event loop (``busy``,
gateway.serving.backlog) is put off by ``RETRY_S``, until the oldest waiting copy has waited
``max_wait_s``, so that copies run in the loop's idle moments instead of in front of a
request. When ``limit`` copies are waiting or running, new copies are dropped and counted
rather than queued without bound: under sustained load the shadow sees a sample of the traffic
(at least ``limit`` copies per ``max_wait_s``) and the primary keeps its latency. All methods
and callbacks run on the event-loop thread; the executor thread only runs ``_execute_all``.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from gateway.errors import GatewayError, ModelError
from gateway.serving.batcher import BatchingRuntime
from gateway.serving.registry import Loaded, Registry
from gateway.serving.types import Runtime
from monitors.shadow import Divergence

log = logging.getLogger("turnout.shadow")

Arrays = Mapping[str, np.ndarray]
Key = tuple[str, str, str]  # model, primary version, shadow version
Copy = tuple[Arrays, Arrays]  # a request's inputs, the primary's outputs
SOON = 64  # copies waiting for one pair that make its drain due now (the default batch size)
RETRY_S = 0.001  # a drain put off because primary requests wait tries again this much later


@dataclass(slots=True)
class _Group:
    """Copies run as one; ``inputs`` are theirs concatenated (a lone copy's as they are)."""

    copies: list[Copy]
    rows: list[int]
    inputs: Arrays
    outputs: list[str]
    total: int = 0


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 0.5 µs more per group
class _Ran:
    """The shadow's outputs for ``copies`` (several: merged along the first axis, ``rows``
    each), or the error they got."""

    copies: Sequence[Copy]
    rows: Sequence[int]
    result: Arrays | GatewayError


@dataclass(slots=True)
class _Outcome:
    parts: list[_Ran]
    aligned: bool = True  # False: merged outputs did not follow input rows


class ShadowRunner:
    def __init__(
        self,
        registry: Registry,
        limit: int,
        threads: int = 1,
        delay_s: float = 0.005,
        busy: Callable[[], bool] = lambda: False,
        max_wait_s: float = 0.1,
    ) -> None:
        """``delay_s``: how long copies wait for others to merge with (0: until the loop's next
        turn); ``SOON`` copies waiting for one pair, or half of ``limit`` waiting or running,
        cut the wait short. ``busy``: whether primary requests wait for the event loop; while
        they do, copies wait too, up to ``max_wait_s``."""
        self.registry = registry
        self.limit = limit
        self.delay_s = delay_s
        self.max_wait_s = max_wait_s
        self.deferrals = 0  # drains put off because primary requests were waiting
        self._busy = busy
        self._waiting_since = 0.0  # loop time the oldest waiting copy arrived
        self.divergence: dict[Key, Divergence] = {}
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="turnout-shadow")
        self._pending: dict[Key, list[Copy]] = {}
        self._accepted = 0  # waiting or running, over every pair
        self._running: dict[Key, asyncio.Task[None]] = {}  # the pair's group on the thread
        self._drain: asyncio.Handle | None = None
        self._drain_soon = False  # the drain is due in the loop's next turn, not on a timer
        self._unaligned: weakref.WeakSet[BatchingRuntime] = weakref.WeakSet()
        self._closed = False

    def submit(
        self,
        model: str,
        primary: str,
        shadows: Sequence[str],
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
    ) -> None:
        for version in shadows:
            key = (model, primary, version)
            d = self.divergence.get(key)
            if d is None:
                d = self.divergence[key] = Divergence()
            if self._accepted >= self.limit or self._closed:
                d.dropped += 1
                continue
            d.inflight += 1
            self._accepted += 1
            if not self._pending:
                self._waiting_since = asyncio.get_running_loop().time()
            waiting = self._pending.get(key)
            if waiting is None:
                waiting = self._pending[key] = []
            waiting.append((inputs, outputs))
            self._schedule(soon=len(waiting) >= SOON or self._accepted * 2 >= self.limit)

    def report(self, model: str) -> list[dict[str, object]]:
        """Runs the copies still waiting first (those estimated cheap are compared now)."""
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
            self._run_all()
        return [
            {"primary": p, "shadow": v, **d.as_json()}
            for (m, p, v), d in sorted(self.divergence.items())
            if m == model
        ]

    async def close(self) -> None:
        """Abandon waiting and running copies (they leave ``inflight``); stop the thread."""
        self._closed = True
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)  # their callbacks settle them
        for key, copies in self._pending.items():
            self._settle(self.divergence[key], len(copies))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- event-loop thread ------------------------------------------------------------------
    def _schedule(self, soon: bool) -> None:
        soon = soon or self.delay_s <= 0
        if self._drain is not None:
            if self._drain_soon or not soon:
                return
            self._drain.cancel()
        loop = asyncio.get_running_loop()
        if soon:
            self._drain = loop.call_soon(self._run_pending)
        else:
            self._drain = loop.call_later(self.delay_s, self._run_pending)
        self._drain_soon = soon

    def _run_pending(self) -> None:
        self._drain = None
        loop = asyncio.get_running_loop()
        if self._busy() and loop.time() - self._waiting_since < self.max_wait_s:
            self.deferrals += 1
            self._drain = loop.call_later(RETRY_S, self._run_pending)
            self._drain_soon = True  # new copies need not bring it forward
            return
        self._run_all()

    def _run_all(self) -> None:
        for key in [k for k in self._pending if k not in self._running]:
            self._start(key, self._pending.pop(key))

    def _start(self, key: Key, copies: list[Copy]) -> None:
        model, _, version = key
        d = self.divergence[key]
        try:
            loaded = self.registry.get(model, version)
        except GatewayError as exc:
            log.debug("shadow %s/%s failed: %s", model, version, exc.message)
            d.errors += len(copies)
            self._settle(d, len(copies))
            return
        runtime = loaded.runtime
        cap = 0  # rows per merged run; 0: none merged
        if (
            len(copies) > 1
            and isinstance(runtime, BatchingRuntime)
            and runtime.merging
            and runtime not in self._unaligned
        ):
            cap = runtime.config.max_batch_size
        off_loop: list[_Group] = []
        with loaded:
            for group in _groups(copies, cap):
                if isinstance(runtime, BatchingRuntime) and runtime.cheap(group.inputs):
                    self._record(d, runtime, _execute(runtime, group))
                else:
                    off_loop.append(group)
        if off_loop:
            task = asyncio.create_task(self._run_off_loop(d, loaded, off_loop))
            self._running[key] = task
            count = sum(len(g.copies) for g in off_loop)
            task.add_done_callback(partial(self._ended, key, count))

    async def _run_off_loop(self, d: Divergence, loaded: Loaded, groups: list[_Group]) -> None:
        loop = asyncio.get_running_loop()
        with loaded:
            outcomes = await loop.run_in_executor(
                self._executor, _execute_all, loaded.runtime, groups
            )
        for outcome in outcomes:
            self._record(d, loaded.runtime, outcome)

    def _ended(self, key: Key, count: int, task: asyncio.Task[None]) -> None:
        del self._running[key]
        if task.cancelled() or task.exception() is not None:
            # nothing was recorded: the run itself was cancelled or could not start
            d = self.divergence[key]
            if not task.cancelled():
                log.error("shadow %s/%s: run failed", key[0], key[2], exc_info=task.exception())
                d.errors += count
            self._settle(d, count)
        if key in self._pending and not self._closed:
            self._schedule(soon=True)  # they have waited for this run already

    def _record(self, d: Divergence, runtime: Runtime, outcome: _Outcome) -> None:
        if not outcome.aligned and isinstance(runtime, BatchingRuntime):
            log.warning(
                "%s: outputs do not follow input rows; shadow copies not merged", runtime.name
            )
            self._unaligned.add(runtime)
        for ran in outcome.parts:
            try:
                if isinstance(ran.result, GatewayError):
                    d.errors += len(ran.copies)
                elif len(ran.copies) == 1:
                    d.add(ran.copies[0][1], ran.result)
                else:
                    d.add_merged([primary for _, primary in ran.copies], ran.result, ran.rows)
            except Exception:  # a comparison that breaks must not strand the counts
                log.exception("shadow comparison failed")
                d.errors += len(ran.copies)
            finally:
                self._settle(d, len(ran.copies))

    def _settle(self, d: Divergence, copies: int) -> None:
        d.inflight -= copies
        self._accepted -= copies


def _groups(copies: list[Copy], cap: int) -> list[_Group]:
    """Copies in arrival order, each merged into the latest group with the same key while it
    stays within ``cap`` rows (0: none merged)."""
    if not cap:
        return [_Group([c], [0], c[0], list(c[1])) for c in copies]
    groups: list[_Group] = []
    latest: dict[Hashable, _Group] = {}
    for copy in copies:
        inputs, primary = copy
        key, rows = _key(inputs, primary)
        group = latest.get(key) if key is not None else None
        if group is not None and group.total + rows <= cap:
            group.copies.append(copy)
            group.rows.append(rows)
            group.total += rows
            continue
        group = _Group([copy], [rows], inputs, list(primary), rows)
        groups.append(group)
        if key is not None:
            latest[key] = group
    for group in groups:
        if len(group.copies) > 1:
            group.inputs = {
                name: np.concatenate([inputs[name] for inputs, _ in group.copies])
                for name in group.inputs
            }
    return groups


def _key(inputs: Arrays, outputs: Arrays) -> tuple[Hashable | None, int]:
    """What copies must share to be merged (None: never merged), and the copy's rows."""
    rows = -1
    parts = []
    for name, a in inputs.items():  # unsorted: requests list inputs in one order (0.5 µs)
        if a.ndim == 0 or rows not in (-1, a.shape[0]):
            return None, 0
        rows = a.shape[0]
        parts.append((name, a.dtype, a.shape[1:]))
    return ((tuple(outputs), tuple(parts)), rows) if parts else (None, 0)


# -- on the event loop or the shadows' thread --------------------------------------------------
def _execute_all(runtime: Runtime, groups: list[_Group]) -> list[_Outcome]:
    return [_execute(runtime, group) for group in groups]


def _execute(runtime: Runtime, group: _Group) -> _Outcome:
    result = _run(runtime, group.inputs, group.outputs)
    if len(group.copies) == 1:
        return _Outcome([_Ran(group.copies, group.rows, result)])
    if isinstance(result, GatewayError):
        # Which copy broke the run is unknown: rerun each alone, so that only the copies that
        # fail by themselves count as errors.
        return _Outcome(_each_alone(runtime, group))
    if all(a.ndim >= 1 and a.shape[0] == group.total for a in result.values()):
        return _Outcome([_Ran(group.copies, group.rows, result)])
    return _Outcome(_each_alone(runtime, group), aligned=False)


def _each_alone(runtime: Runtime, group: _Group) -> list[_Ran]:
    return [
        _Ran([copy], [rows], _run(runtime, copy[0], group.outputs))
        for copy, rows in zip(group.copies, group.rows, strict=True)
    ]


def _run(runtime: Runtime, inputs: Arrays, outputs: list[str]) -> Arrays | GatewayError:
    try:
        return runtime.run_sync(inputs, outputs)
    except GatewayError as exc:
        log.debug("shadow run failed: %s", exc.message)
        return exc
    except Exception as exc:
        log.error("shadow run failed", exc_info=exc)
        return ModelError(f"model execution failed: {exc!r}")
