from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.demo import sample_inputs, write_demo_repository
from gateway.errors import ModelError, NotReady, Overloaded, Timeout
from gateway.serving.batcher import MAX_BATCH_SIZES, BatchConfig, BatchingRuntime
from gateway.serving.runtime import SessionRuntime, load_version
from gateway.serving.types import ModelVersion
from gateway.settings import Settings
from tests.support.models import write_fixed_doubler

Arrays = dict[str, np.ndarray]


class ModelDouble:
    """A slow (or failing) model: records the rows of every run, sleeps, then runs the real
    session. A NaN anywhere in the inputs makes the run fail like a broken model would."""

    def __init__(self, inner: SessionRuntime, delay_s: float = 0.0) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.closed = False

    def run_sync(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]) -> Arrays:
        self.calls.append(next(iter(inputs.values())).shape[0])
        time.sleep(self.delay_s)
        if any(a.dtype.kind == "f" and np.isnan(a).any() for a in inputs.values()):
            raise ModelError("model execution failed: NaN in input")
        return self.inner.run_sync(inputs, outputs)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batcher") / "models"
    write_demo_repository(root, heavy=True)
    write_fixed_doubler(root / "fixed" / "1")
    return root


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(2, thread_name_prefix="test-batcher")
    yield pool
    pool.shutdown(wait=True)


def load(
    repo: Path, executor: ThreadPoolExecutor, model: str, delay_s: float = 0.0
) -> tuple[ModelVersion, ModelDouble]:
    info, session = load_version(model, "1", repo / model / "1", Settings(repo), executor)
    return info, ModelDouble(session, delay_s)


def batcher(
    info: ModelVersion, model: ModelDouble, executor: ThreadPoolExecutor, **config: Any
) -> BatchingRuntime:
    return BatchingRuntime(model, info.inputs, executor, BatchConfig(**config), name=info.model)


def assert_identical(got: Arrays, want: Arrays) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert got[name].shape == want[name].shape
        assert got[name].tobytes() == want[name].tobytes(), name


async def started(model: ModelDouble, runs: int) -> None:
    """Wait until the model has entered ``runs`` runs (it records before sleeping)."""
    while len(model.calls) < runs:
        await asyncio.sleep(0.002)


# -- merging --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fraud", "heavy"])
def test_concurrent_mixed_sizes_merge_and_match_unbatched_runs(
    repo: Path, executor: ThreadPoolExecutor, name: str
) -> None:
    info, model = load(repo, executor, name, delay_s=0.01)
    rng = np.random.default_rng(7)
    sizes = [*rng.integers(1, 12, 40).tolist(), 100]  # 100 > max_batch_size: runs alone
    requests = [sample_inputs(name, int(n), seed=i) for i, n in enumerate(sizes)]
    outputs = [o.name for o in info.outputs]
    observed: list[int] = []
    rt = BatchingRuntime(
        model, info.inputs, executor, name=name, on_batch=lambda r, s: observed.append(r)
    )

    async def main() -> list[Arrays]:
        return await asyncio.gather(*(rt.run(r, outputs) for r in requests))

    results = asyncio.run(main())
    for request, got in zip(requests, results, strict=True):
        assert_identical(got, model.inner.run_sync(request, outputs))
    assert rt.stats.requests == len(requests)
    assert rt.stats.batches == len(model.calls) < len(requests)
    assert sorted(observed) == sorted(model.calls)
    assert rt.stats.rows == sum(model.calls) == sum(sizes)
    assert 100 in model.calls
    assert max(c for c in model.calls if c != 100) <= 64


def test_only_compatible_requests_merge(repo: Path, executor: ThreadPoolExecutor) -> None:
    # risk has three inputs and three outputs of different dtypes; requests asking for
    # different outputs must not share a run, and each still gets exactly what it asked for.
    info, model = load(repo, executor, "risk", delay_s=0.05)
    rt = batcher(info, model, executor)
    some, every = ["score"], ["score", "label", "logits"]
    asks = [some if i % 2 else every for i in range(8)]
    requests = [sample_inputs("risk", 3, seed=i) for i in range(8)]

    async def main() -> list[Arrays]:
        blocker = asyncio.create_task(rt.run(sample_inputs("risk", 1, seed=99), every))
        await started(model, 1)
        results = await asyncio.gather(*(rt.run(r, a) for r, a in zip(requests, asks, strict=True)))
        await blocker
        return results

    results = asyncio.run(main())
    for request, ask, got in zip(requests, asks, results, strict=True):
        assert_identical(got, model.inner.run_sync(request, ask))
    assert model.calls == [1, 12, 12]


def test_sequential_requests_run_alone_without_delay(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    info, model = load(repo, executor, "fraud")
    rt = batcher(info, model, executor)
    outputs = ["probability"]

    async def main() -> list[float]:
        latencies = []
        for i in range(20):
            start = time.perf_counter()
            await rt.run(sample_inputs("fraud", 1, seed=i), outputs)
            latencies.append(time.perf_counter() - start)
        return latencies

    latencies = asyncio.run(main())
    assert model.calls == [1] * 20
    assert rt.stats.batches == 20
    # fraud runs in microseconds; 0.25 s is the delay the next test shows a timer would add.
    assert float(np.median(latencies)) < 0.25


def test_light_requests_merge_on_the_event_loop_while_the_server_is_busy(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    info, model = load(repo, executor, "fraud")
    outputs = ["probability"]
    requests = [sample_inputs("fraud", 1 + i % 3, seed=i) for i in range(30)]
    loop_threads: set[int] = set()

    def record(rows: int, seconds: float) -> None:
        loop_threads.add(threading.get_ident())

    def runtime(busy: bool) -> BatchingRuntime:
        return BatchingRuntime(
            model, info.inputs, executor, name="fraud", inline_rows=64,
            busy=lambda: busy, on_batch=record,
        )  # fmt: skip

    async def main(rt: BatchingRuntime) -> tuple[list[Arrays], int]:
        results = await asyncio.gather(*(rt.run(r, outputs) for r in requests))
        return results, threading.get_ident()

    busy, idle = runtime(True), runtime(False)
    results, loop_thread = asyncio.run(main(busy))
    for request, got in zip(requests, results, strict=True):
        assert_identical(got, model.inner.run_sync(request, outputs))
    # queued in one turn of the loop, run as one merged run on the loop thread itself
    assert (busy.stats.batches, busy.stats.inline, busy.stats.rows) == (1, 1, 60)
    assert loop_threads == {loop_thread}
    asyncio.run(main(idle))  # idle: each request runs alone, inline, as soon as it comes
    assert (idle.stats.batches, idle.stats.inline) == (30, 30)


def test_queue_delay_waits_for_more_rows(repo: Path, executor: ThreadPoolExecutor) -> None:
    info, model = load(repo, executor, "fraud")
    rt = batcher(info, model, executor, max_queue_delay_us=300_000, max_batch_size=4)
    outputs = ["probability"]

    async def main() -> tuple[float, float]:
        start = time.perf_counter()
        first = asyncio.create_task(rt.run(sample_inputs("fraud", 1, seed=1), outputs))
        await asyncio.sleep(0.05)
        await asyncio.gather(first, rt.run(sample_inputs("fraud", 1, seed=2), outputs))
        waited = time.perf_counter() - start
        # a full batch does not wait for the delay
        start = time.perf_counter()
        await asyncio.gather(
            *(rt.run(sample_inputs("fraud", 1, seed=i), outputs) for i in range(4))
        )
        return waited, time.perf_counter() - start

    waited, full = asyncio.run(main())
    assert model.calls == [2, 4]
    assert waited >= 0.25  # the 0.3 s delay, less timer granularity
    assert full < waited


# -- back-pressure and deadlines ----------------------------------------------------------


def test_full_queue_is_overloaded(repo: Path, executor: ThreadPoolExecutor) -> None:
    info, model = load(repo, executor, "fraud", delay_s=0.2)
    rt = batcher(info, model, executor, max_queue=2, max_batch_size=1)
    x = sample_inputs("fraud", 1, seed=0)

    async def main() -> Overloaded:
        running = [asyncio.create_task(rt.run(x, ["probability"])) for _ in range(3)]
        await asyncio.sleep(0)  # one running, two queued
        assert rt.queue_depth == 2
        with pytest.raises(Overloaded) as caught:
            await rt.run(x, ["probability"])
        await asyncio.gather(*running)
        return caught.value

    error = asyncio.run(main())
    assert error.retry_after_s >= 1.0
    assert rt.stats.rejected == 1
    assert model.calls == [1, 1, 1]


def test_expired_deadline_times_out_without_running(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    info, model = load(repo, executor, "fraud", delay_s=0.5)
    rt = batcher(info, model, executor)
    outputs = ["probability"]

    async def main() -> None:
        with pytest.raises(Timeout):
            await rt.run(sample_inputs("fraud", 1, seed=0), outputs, deadline=time.monotonic())
        blocker = asyncio.create_task(rt.run(sample_inputs("fraud", 2, seed=1), outputs))
        await asyncio.sleep(0)
        late = asyncio.create_task(
            rt.run(sample_inputs("fraud", 3, seed=2), outputs, deadline=time.monotonic() + 0.05)
        )
        done, _ = await asyncio.wait({blocker, late}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {late}  # failed while the session was still busy
        assert isinstance(late.exception(), Timeout)
        assert rt.queue_depth == 0
        await blocker

    asyncio.run(main())
    assert model.calls == [2]
    assert rt.stats.timed_out == 2
    assert rt.stats.rows == 2


def test_a_queued_request_without_a_deadline_takes_the_default(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    info, model = load(repo, executor, "fraud", delay_s=0.5)
    config = BatchConfig()
    rt = BatchingRuntime(model, info.inputs, executor, config, default_timeout_s=0.05)
    outputs = ["probability"]

    async def main() -> None:
        later = time.monotonic() + 10.0  # its own deadline: not the default
        blocker = asyncio.create_task(
            rt.run(sample_inputs("fraud", 2, seed=1), outputs, deadline=later)
        )
        await asyncio.sleep(0)
        queued = asyncio.create_task(rt.run(sample_inputs("fraud", 3, seed=2), outputs))
        done, _ = await asyncio.wait({blocker, queued}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {queued}  # the default deadline passed while the session was busy
        assert isinstance(queued.exception(), Timeout)
        await blocker

    asyncio.run(main())
    assert model.calls == [2]
    assert rt.stats.timed_out == 1


def test_deadline_passing_while_waiting_for_a_thread_is_not_run(repo: Path) -> None:
    # Versions share the executor: a launched batch can wait for a thread past its deadline.
    with ThreadPoolExecutor(1) as pool:
        info, model = load(repo, pool, "fraud")
        rt = batcher(info, model, pool)
        gate = threading.Event()

        async def main() -> None:
            pool.submit(gate.wait, 10.0)  # another version's long run holds the only thread
            with pytest.raises(Timeout):
                deadline = time.monotonic() + 0.05
                await rt.run(sample_inputs("fraud", 1, seed=0), ["probability"], deadline=deadline)
            assert rt.queue_depth == 0
            gate.set()
            assert await rt.run(sample_inputs("fraud", 2, seed=1), ["probability"])

        asyncio.run(main())
    assert model.calls == [2]
    assert rt.stats.timed_out == 1


# -- failures, cancellation, close ---------------------------------------------------------


def test_a_model_error_fails_only_the_request_that_caused_it(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    info, model = load(repo, executor, "fraud", delay_s=0.05)
    rt = batcher(info, model, executor, max_batch_size=4)
    outputs = ["probability"]
    bad = sample_inputs("fraud", 2, seed=1)
    bad["input"][1, 3] = np.nan
    same_batch, next_batch = sample_inputs("fraud", 2, seed=2), sample_inputs("fraud", 2, seed=3)

    async def main() -> tuple[Arrays | BaseException, ...]:
        blocker = asyncio.create_task(rt.run(sample_inputs("fraud", 1, seed=0), outputs))
        await asyncio.sleep(0)
        return await asyncio.gather(
            blocker,
            rt.run(bad, outputs),
            rt.run(same_batch, outputs),
            rt.run(next_batch, outputs),
            return_exceptions=True,
        )

    first, failed, sibling, after = asyncio.run(main())
    # The merged batch of 4 rows fails; its two requests are rerun alone: only the poisoned one
    # fails, its neighbour gets its own answer.
    assert model.calls == [1, 4, 2, 2, 2]
    assert isinstance(failed, ModelError)
    assert not isinstance(sibling, BaseException)
    assert_identical(sibling, model.inner.run_sync(same_batch, outputs))
    assert not isinstance(first, BaseException)
    assert not isinstance(after, BaseException)
    assert_identical(after, model.inner.run_sync(next_batch, outputs))
    assert rt.stats.failed == 1


def test_cancelled_requests_leave_the_queue_or_their_batch(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    info, model = load(repo, executor, "fraud", delay_s=0.1)
    rt = batcher(info, model, executor)
    outputs = ["probability"]
    x = {i: sample_inputs("fraud", i, seed=i) for i in range(1, 6)}

    async def main() -> tuple[Arrays, Arrays]:
        blocker = asyncio.create_task(rt.run(x[1], outputs))
        await asyncio.sleep(0)
        queued = asyncio.create_task(rt.run(x[2], outputs))
        kept = asyncio.create_task(rt.run(x[3], outputs))
        await asyncio.sleep(0)
        queued.cancel()  # still waiting: it must never reach the model
        await blocker
        first = await kept
        running = asyncio.create_task(rt.run(x[4], outputs))
        await asyncio.sleep(0)
        sibling = asyncio.create_task(rt.run(x[5], outputs))
        other = asyncio.create_task(rt.run(x[2], outputs))
        await started(model, 3)  # x[4] runs alone; x[5] and x[2] wait for it, then merge
        await started(model, 4)
        other.cancel()  # its batch is running: the sibling still gets its rows
        second = await sibling
        await running
        assert queued.cancelled() and other.cancelled()
        return first, second

    first, second = asyncio.run(main())
    assert model.calls == [1, 3, 4, 7]
    assert_identical(first, model.inner.run_sync(x[3], outputs))
    assert_identical(second, model.inner.run_sync(x[5], outputs))
    assert rt.stats.cancelled == 2


def test_close_fails_queued_requests_and_closes_after_running_batch(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    info, model = load(repo, executor, "fraud", delay_s=0.1)
    rt = batcher(info, model, executor)
    outputs = ["probability"]

    async def main() -> None:
        running = asyncio.create_task(rt.run(sample_inputs("fraud", 1, seed=0), outputs))
        await asyncio.sleep(0)
        queued = asyncio.create_task(rt.run(sample_inputs("fraud", 1, seed=1), outputs))
        await asyncio.sleep(0)
        rt.close()
        with pytest.raises(NotReady):
            await queued
        assert not model.closed  # its batch is still running
        assert (await running)["probability"].shape == (1, 1)
        assert model.closed
        with pytest.raises(NotReady):
            await rt.run(sample_inputs("fraud", 1, seed=2), outputs)

    asyncio.run(main())
    assert model.calls == [1]


@pytest.mark.parametrize(
    ("name", "config"),
    [("fixed", {}), ("fraud", {"enabled": False})],
    ids=["static-first-axis", "disabled-in-config"],
)
def test_unbatchable_models_pass_through_with_queue_limit(
    repo: Path, executor: ThreadPoolExecutor, name: str, config: dict[str, bool]
) -> None:
    info, model = load(repo, executor, name, delay_s=0.05)
    rt = batcher(info, model, executor, max_queue=4, **config)
    assert not rt.merging
    spec = info.inputs[0]
    rng = np.random.default_rng(3)
    requests = [
        {spec.name: rng.standard_normal((2, spec.shape[1])).astype(np.float32)} for _ in range(5)
    ]
    outputs = [info.outputs[0].name]

    async def main() -> list[Arrays]:
        tasks = [asyncio.create_task(rt.run(r, outputs)) for r in requests]
        await asyncio.sleep(0)  # one running, four queued: the queue is full
        with pytest.raises(Overloaded):
            await rt.run(requests[0], outputs)
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    assert model.calls == [2] * 5
    for request, got in zip(requests, results, strict=True):
        assert_identical(got, model.inner.run_sync(request, outputs))


# -- config ---------------------------------------------------------------------------------


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    defaults = BatchConfig(max_queue=10)
    assert BatchConfig.from_file(path, defaults) == defaults  # no file
    path.write_text(
        json.dumps({"max_batch_size": 8, "max_queue_delay_us": 500, "max_rows_per_request": 4})
    )
    assert BatchConfig.from_file(path, defaults) == BatchConfig(
        max_batch_size=8, max_queue_delay_us=500, max_queue=10, max_rows_per_request=4
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"max_batch": 8}', "unknown key 'max_batch'"),
        ('{"max_batch_size": 0}', "'max_batch_size' must be a positive integer"),
        ('{"max_queue": "64"}', "'max_queue' must be a positive integer"),
        ('{"max_concurrent_batches": true}', "'max_concurrent_batches'"),
        ('{"max_queue_delay_us": -1}', "'max_queue_delay_us' must be a non-negative"),
        ('{"max_queue_delay_us": 1.5}', "'max_queue_delay_us'"),
        ('{"enabled": "yes"}', "'enabled' must be true or false"),
        ('{"max_rows_per_request": 0}', "'max_rows_per_request' must be a positive integer"),
        ("[1, 2]", "must hold a JSON object"),
        ("{", "not valid JSON"),
    ],
    ids=[
        "unknown-key",
        "zero-batch",
        "string-int",
        "bool-int",
        "negative-delay",
        "float-delay",
        "string-bool",
        "zero-rows",
        "not-object",
        "bad-json",
    ],
)
def test_config_file_errors_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        BatchConfig.from_file(path, BatchConfig())


# -- statistics (Triton's extension, gateway.http.triton) -------------------------------------


def test_a_merged_run_is_one_batch_and_each_request_counts_its_wait(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    delay_s = 0.05
    info, model = load(repo, executor, "fraud", delay_s=delay_s)
    rt = batcher(info, model, executor)
    rows = [2, 1, 3, 1]
    outputs = ["probability"]

    async def main() -> None:
        blocker = asyncio.create_task(rt.run(sample_inputs("fraud", 5, seed=99), outputs))
        await started(model, 1)  # the rest queue behind it, then run as one merged run
        await asyncio.gather(*(rt.run(sample_inputs("fraud", n, seed=n), outputs) for n in rows))
        await blocker

    asyncio.run(main())
    stats = rt.stats
    assert model.calls == [5, sum(rows)]
    assert stats.succeeded == 1 + len(rows)
    assert stats.inferences == 5 + sum(rows)
    assert {n: int(e[0]) for n, e in stats.sizes.items()} == {5: 1, sum(rows): 1}
    merged = stats.sizes[sum(rows)]
    assert merged[1] > 0 and merged[3] > 0  # concatenating and slicing took some time
    assert merged[2] >= delay_s  # the model double sleeps in every run
    # the merged run's times count once per request; the blocker's once
    alone = stats.sizes[5]
    assert stats.infer_s == pytest.approx(alone[2] + len(rows) * merged[2])
    assert stats.input_s == pytest.approx(len(rows) * merged[1])
    # the four waited for the blocker's run (at least its sleep) before their own started
    assert stats.queue_s >= len(rows) * delay_s * 0.9
    assert stats.succeeded_s >= stats.queue_s + stats.infer_s
    assert stats.fail == 0 and stats.fail_s == 0.0


def test_failures_and_their_time_are_counted(repo: Path, executor: ThreadPoolExecutor) -> None:
    info, model = load(repo, executor, "fraud", delay_s=0.02)
    rt = batcher(info, model, executor, max_queue=1)
    outputs = ["probability"]
    poisoned = sample_inputs("fraud", 1, seed=1)
    poisoned["input"][0, 0] = np.nan

    async def main() -> None:
        with pytest.raises(ModelError):
            await rt.run(poisoned, outputs)
        blocker = asyncio.create_task(rt.run(sample_inputs("fraud", 1, seed=2), outputs))
        await started(model, 2)
        waiting = asyncio.create_task(rt.run(sample_inputs("fraud", 1, seed=3), outputs))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):  # the queue holds one
            await rt.run(sample_inputs("fraud", 1, seed=4), outputs)
        await asyncio.gather(blocker, waiting)
        with pytest.raises(Timeout):
            await rt.run(sample_inputs("fraud", 1, seed=5), outputs, deadline=time.monotonic())

    asyncio.run(main())
    stats = rt.stats
    assert (stats.failed, stats.rejected, stats.timed_out, stats.fail) == (1, 1, 1, 3)
    assert stats.fail_s >= 0.02  # the poisoned run slept before it failed
    assert stats.succeeded == 2


def test_batch_sizes_kept_are_capped(repo: Path, executor: ThreadPoolExecutor) -> None:
    """A client chooses its rows: past MAX_BATCH_SIZES distinct sizes, runs go unlisted."""
    info, model = load(repo, executor, "fraud")
    rt = BatchingRuntime(model, info.inputs, executor, name="fraud", inline_rows=1 << 20)
    extra = 5

    async def main() -> None:
        for n in range(1, MAX_BATCH_SIZES + extra + 1):
            await rt.run(sample_inputs("fraud", n, seed=n), ["probability"])

    asyncio.run(main())
    assert sorted(rt.stats.sizes) == list(range(1, MAX_BATCH_SIZES + 1))
    assert rt.stats.unlisted[0] == extra
    assert rt.stats.succeeded == MAX_BATCH_SIZES + extra
