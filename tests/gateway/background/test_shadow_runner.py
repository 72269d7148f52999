"""ShadowRunner on real sessions: copies waiting together run as one, compared as one.

The ``ROWS`` model answers, for every row, how many rows its run had: with primary outputs of
zero, a copy's absolute difference is the size of the run it was merged into.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from gateway.background.shadow import SOON, ShadowRunner
from gateway.demo import sample_inputs
from gateway.serving.batcher import BatchConfig, BatchingRuntime
from gateway.serving.registry import Registry
from gateway.serving.runtime import load_version
from gateway.serving.types import ModelVersion, Runtime
from gateway.settings import Settings
from monitors import VersionMonitor
from monitors.shadow import Divergence
from tests.support.models import write_failing_fraud, write_slow_fraud

Arrays = dict[str, np.ndarray]
T = TypeVar("T")
ZERO = {"probability": np.zeros((1, 1), np.float32)}  # a primary's answer, for ``ROWS``
# fraud versions beside the demo's 1 and 2 (versions are numbers)
ROWS, POOLED, FAILING, SLOW = "11", "12", "13", "14"


def _save(model: onnx.ModelProto, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")


def _fraud_shaped(
    name: str,
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    output: tuple[str | int, int] = ("batch", 1),
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 32])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, list(output))],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _rows_model() -> onnx.ModelProto:
    """input FP32 [-1, 32] -> probability FP32 [-1, 1]: every row holds the run's row count."""
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
        numpy_helper.from_array(np.array([0.0], np.float32), "nothing"),
    ]
    nodes = [
        helper.make_node("Shape", ["input"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "one"], ["n"]),
        helper.make_node("Cast", ["n"], ["n_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["input", "one"], ["sums"], keepdims=1),
        helper.make_node("Mul", ["sums", "nothing"], ["zeros"]),
        helper.make_node("Add", ["zeros", "n_f"], ["probability"]),
    ]
    return _fraud_shaped("rows", nodes, inits)


def _pooled_model() -> onnx.ModelProto:
    """input FP32 [-1, 32] -> probability FP32 [1, 1], the mean of the first feature over all
    rows: its outputs do not follow input rows."""
    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([1], np.int64), "one"),
    ]
    nodes = [
        helper.make_node("Slice", ["input", "zero", "one", "one"], ["first"]),
        helper.make_node("ReduceMean", ["first"], ["probability"], axes=[0], keepdims=1),
    ]
    return _fraud_shaped("pooled", nodes, inits, (1, 1))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, demo_repo: Path) -> Path:
    root = tmp_path_factory.mktemp("shadow") / "models"
    shutil.copytree(demo_repo, root, ignore=shutil.ignore_patterns("echo"))
    _save(_rows_model(), root / "fraud" / ROWS)
    _save(_pooled_model(), root / "fraud" / POOLED)
    write_failing_fraud(root / "fraud" / FAILING, feature=0, limit=50.0)
    write_slow_fraud(root / "fraud" / SLOW, layers=50)
    return root


@pytest.fixture(scope="module")
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(1, thread_name_prefix="test-shadow-primary")
    yield pool
    pool.shutdown(wait=True)


def registry(repo: Path, executor: ThreadPoolExecutor, *, inline: bool) -> Registry:
    """Loads as the gateway does; ``inline``: every run is estimated cheap, else none is."""
    settings = Settings(repo)

    def loader(
        model: str, version: str, folder: Path
    ) -> tuple[ModelVersion, Runtime, VersionMonitor]:
        info, session = load_version(model, version, folder, settings, executor)
        runtime = BatchingRuntime(
            session,
            info.inputs,
            executor,
            BatchConfig(),
            name=f"{model} v{version}",
            inline_rows=1 << 20 if inline else 0,
        )
        return info, runtime, VersionMonitor.fit(None, {})

    return Registry(repo, loader)


def scenario(
    repo: Path,
    executor: ThreadPoolExecutor,
    body: Callable[[ShadowRunner], Awaitable[T]],
    *,
    inline: bool = True,
    limit: int = 1000,
    slow: bool = False,
    delay_s: float = 0.005,  # the runner's default
    busy: Callable[[], bool] = lambda: False,
    max_wait_s: float = 0.1,  # the runner's default
) -> T:
    """Load the repository (the slow version only if asked: it takes a second), run ``body``
    on a fresh runner, close both."""

    async def main() -> T:
        reg = registry(repo, executor, inline=inline)
        await reg.load("risk")
        await reg.load("fraud", ["1", "2", ROWS, POOLED, FAILING, *([SLOW] if slow else [])])
        runner = ShadowRunner(reg, limit, delay_s=delay_s, busy=busy, max_wait_s=max_wait_s)
        try:
            return await body(runner)
        finally:
            await runner.close()
            await reg.close()

    return asyncio.run(main())


async def settled(runner: ShadowRunner, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while any(d.inflight for d in runner.divergence.values()):
        assert time.monotonic() < deadline, runner.divergence
        await asyncio.sleep(0.001)


def fraud_rows(n: int, seed: int) -> list[Arrays]:
    rows = sample_inputs("fraud", n, seed=seed)["input"]
    return [{"input": rows[i : i + 1]} for i in range(n)]


def assert_same_totals(got: Divergence, want: Divergence) -> None:
    assert (got.requests, got.errors, got.dropped, got.inflight) == (
        want.requests,
        want.errors,
        want.dropped,
        want.inflight,
    )
    assert (got.rows, got.elements, got.disagreements) == (
        want.rows,
        want.elements,
        want.disagreements,
    )
    assert got.abs_diff_sum == pytest.approx(want.abs_diff_sum, rel=1e-9)


# -- merging ------------------------------------------------------------------------------------


@pytest.mark.parametrize("inline", [True, False], ids=["on the loop", "on the thread"])
def test_waiting_copies_run_as_one_up_to_the_batch_size(
    repo: Path, executor: ThreadPoolExecutor, inline: bool
) -> None:
    async def body(runner: ShadowRunner) -> Divergence:
        for inputs in fraud_rows(100, seed=1):
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
        d = runner.divergence[("fraud", "1", ROWS)]
        assert d.inflight == 100  # nothing runs before the caller's step ends
        await settled(runner)
        return d

    d = scenario(repo, executor, body, inline=inline)
    # max_batch_size 64: one run of 64 rows, one of 36
    assert (d.requests, d.errors, d.dropped, d.inflight) == (100, 0, 0, 0)
    assert d.mean_abs_diff == pytest.approx((64 * 64 + 36 * 36) / 100)


@pytest.mark.parametrize("inline", [True, False], ids=["on the loop", "on the thread"])
def test_divergence_equals_comparing_each_copy_alone(
    repo: Path, executor: ThreadPoolExecutor, inline: bool
) -> None:
    # risk: three inputs, three outputs (FP32 score, INT64 label, FP64 logits), copies of
    # 1 to 4 rows; the "primary" answers are v1's outputs on other inputs, so they differ.
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 5, 30).tolist()
    copies = [sample_inputs("risk", int(n), seed=100 + i) for i, n in enumerate(sizes)]
    others = [sample_inputs("risk", int(n), seed=200 + i) for i, n in enumerate(sizes)]
    names = ["score", "label", "logits"]
    fraud = fraud_rows(20, seed=2)

    async def body(runner: ShadowRunner) -> tuple[Divergence, Divergence, Divergence, Divergence]:
        shadow = runner.registry.get("risk", "1").runtime
        fraud_v1 = runner.registry.get("fraud", "1").runtime
        fraud_v2 = runner.registry.get("fraud", "2").runtime
        primaries = [shadow.run_sync(o, names) for o in others]
        fraud_primaries = [fraud_v1.run_sync(f, ["probability"]) for f in fraud]
        want_risk, want_fraud = Divergence(), Divergence()
        for inputs, primary in zip(copies, primaries, strict=True):
            want_risk.add(primary, shadow.run_sync(inputs, names))
        for inputs, primary in zip(fraud, fraud_primaries, strict=True):
            want_fraud.add(primary, fraud_v2.run_sync(inputs, ["probability"]))
        for inputs, primary in zip(copies, primaries, strict=True):
            runner.submit("risk", "0", ["1"], inputs, primary)
        for inputs, primary in zip(fraud, fraud_primaries, strict=True):
            runner.submit("fraud", "1", ["2"], inputs, primary)
        await settled(runner)
        return (
            runner.divergence[("risk", "0", "1")],
            want_risk,
            runner.divergence[("fraud", "1", "2")],
            want_fraud,
        )

    got_risk, want_risk, got_fraud, want_fraud = scenario(repo, executor, body, inline=inline)
    assert_same_totals(got_risk, want_risk)
    assert_same_totals(got_fraud, want_fraud)
    assert got_risk.requests == 30 and got_risk.disagreements > 0
    assert got_fraud.requests == 20 and got_fraud.mean_abs_diff


def test_copies_merge_only_with_their_like(repo: Path, executor: ThreadPoolExecutor) -> None:
    # Copies asking for other outputs, or holding another number of features, run apart.
    features = sample_inputs("risk", 1, seed=3)
    one_output: Arrays = {"score": np.zeros((1, 1), np.float32)}
    all_outputs: Arrays = {
        **one_output,
        "label": np.zeros((1, 1), np.int64),
        "logits": np.zeros((1, 2)),
    }

    async def body(runner: ShadowRunner) -> tuple[Divergence, Divergence]:
        for i in range(10):
            runner.submit("risk", "1", ["1"], features, one_output if i % 2 else all_outputs)
        wide = {"input": np.zeros((1, 33), np.float32)}  # the session refuses it
        for _ in range(3):
            runner.submit("fraud", "1", [ROWS], fraud_rows(1, seed=4)[0], ZERO)
            runner.submit("fraud", "1", [ROWS], wide, ZERO)
        await settled(runner)
        return runner.divergence[("risk", "1", "1")], runner.divergence[("fraud", "1", ROWS)]

    risk, rows = scenario(repo, executor, body)
    assert (risk.requests, risk.errors) == (10, 0)
    assert risk.elements == 5 * 1 + 5 * 4
    assert (rows.requests, rows.errors) == (3, 3)  # the wide copies fail apart from the others
    assert rows.mean_abs_diff == 3.0  # the three good copies ran together


@pytest.mark.parametrize(
    ("delay_s", "merged"), [(0.0, 1), (0.5, 5)], ids=["next turn", "after a delay"]
)
def test_copies_submitted_within_the_delay_run_together(
    repo: Path, executor: ThreadPoolExecutor, delay_s: float, merged: int
) -> None:
    async def body(runner: ShadowRunner) -> Divergence:
        for inputs in fraud_rows(5, seed=14):  # one copy per turn of the loop
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
            await asyncio.sleep(0)
        await settled(runner)
        return runner.divergence[("fraud", "1", ROWS)]

    d = scenario(repo, executor, body, delay_s=delay_s)
    assert (d.requests, d.mean_abs_diff) == (5, merged)


def test_half_the_limit_waiting_or_a_report_cuts_the_delay_short(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    async def body(runner: ShadowRunner) -> tuple[list[dict[str, object]], Divergence]:
        copies = fraud_rows(6, seed=15)
        for inputs in copies[:3]:
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
        await asyncio.sleep(0.01)
        d = runner.divergence[("fraud", "1", ROWS)]
        assert d.inflight == 3  # waiting for the (long) delay
        runner.submit("fraud", "1", [ROWS], copies[3], ZERO)  # 4 of 8: run in the next turn
        await asyncio.sleep(0)
        assert (d.requests, d.inflight, d.mean_abs_diff) == (4, 0, 4.0)
        for inputs in copies[4:]:
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
        return runner.report("fraud"), d  # compares the two waiting copies first

    report, d = scenario(repo, executor, body, limit=8, delay_s=60.0)
    assert [(r["requests"], r["inflight"]) for r in report] == [(6, 0)]
    assert d.abs_diff_sum == 4 * 4 + 2 * 2


def test_a_full_batch_waiting_cuts_the_delay_short(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    async def body(runner: ShadowRunner) -> Divergence:
        for inputs in fraud_rows(SOON, seed=16):
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
        await asyncio.sleep(0)
        return runner.divergence[("fraud", "1", ROWS)]

    d = scenario(repo, executor, body, delay_s=60.0)
    assert (d.requests, d.inflight, d.mean_abs_diff) == (SOON, 0, SOON)


# -- primary requests first ---------------------------------------------------------------------


def test_copies_wait_while_primary_requests_wait_for_the_loop(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    waiting = [True]  # primary requests wait for the event loop

    async def body(runner: ShadowRunner) -> tuple[Divergence, int]:
        for inputs in fraud_rows(5, seed=17):
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
        d = runner.divergence[("fraud", "1", ROWS)]
        await asyncio.sleep(0.05)  # ten times the merge delay
        assert (d.requests, d.inflight) == (0, 5)
        deferrals = runner.deferrals
        waiting[0] = False
        await settled(runner)
        return d, deferrals

    d, deferrals = scenario(repo, executor, body, busy=lambda: waiting[0], max_wait_s=60.0)
    assert deferrals >= 2  # retried while the primary requests waited, then ran
    assert (d.requests, d.errors, d.dropped, d.mean_abs_diff) == (5, 0, 0, 5.0)


def test_copies_run_anyway_once_the_oldest_waited_max_wait(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    max_wait_s = 0.05

    async def body(runner: ShadowRunner) -> tuple[Divergence, float]:
        start = time.monotonic()
        for inputs in fraud_rows(3, seed=18):
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
            await asyncio.sleep(0.01)
        await settled(runner)
        return runner.divergence[("fraud", "1", ROWS)], time.monotonic() - start

    d, elapsed = scenario(
        repo, executor, body, busy=lambda: True, delay_s=0.0, max_wait_s=max_wait_s
    )
    assert elapsed >= max_wait_s
    assert (d.requests, d.mean_abs_diff) == (3, 3.0)  # the three ran together


def test_a_report_compares_waiting_copies_even_while_requests_wait(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    async def body(runner: ShadowRunner) -> list[dict[str, object]]:
        for inputs in fraud_rows(2, seed=19):
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
        await asyncio.sleep(0.01)
        return runner.report("fraud")

    report = scenario(repo, executor, body, busy=lambda: True, max_wait_s=60.0)
    assert [(r["requests"], r["inflight"]) for r in report] == [(2, 0)]


def test_copies_arriving_during_a_thread_run_merge_into_the_next(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    async def body(runner: ShadowRunner) -> Divergence:
        copies = fraud_rows(11, seed=6)
        runner.submit("fraud", "1", [ROWS], copies[0], ZERO)
        await asyncio.sleep(0)  # the drain hands the first copy to the thread
        for inputs in copies[1:]:
            runner.submit("fraud", "1", [ROWS], inputs, ZERO)
        await settled(runner)
        return runner.divergence[("fraud", "1", ROWS)]

    d = scenario(repo, executor, body, inline=False, delay_s=0.0)
    assert d.requests == 11
    assert d.mean_abs_diff == pytest.approx((1 + 10 * 10) / 11)


# -- failures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("inline", [True, False], ids=["on the loop", "on the thread"])
def test_only_copies_that_fail_alone_count_as_errors(
    repo: Path, executor: ThreadPoolExecutor, inline: bool
) -> None:
    copies = fraud_rows(20, seed=7)
    poisoned = {3, 11, 12}
    for i in poisoned:
        copies[i]["input"][0, 0] = 100.0  # over the failing model's limit on feature 0
    primary = {"probability": np.full((1, 1), 0.25, np.float32)}

    async def body(runner: ShadowRunner) -> Divergence:
        for inputs in copies:
            runner.submit("fraud", "1", [FAILING], inputs, primary)
        await settled(runner)
        return runner.divergence[("fraud", "1", FAILING)]

    d = scenario(repo, executor, body, inline=inline)
    assert (d.requests, d.errors, d.inflight) == (17, 3, 0)
    assert d.mean_abs_diff == pytest.approx(0.25)  # the model answers 0.5


def test_outputs_that_do_not_follow_rows_are_compared_copy_by_copy(
    repo: Path, executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    copies = fraud_rows(10, seed=8)
    want = Divergence()
    for inputs in copies:
        want.add(ZERO, {"probability": inputs["input"][:, :1].copy()})

    async def body(runner: ShadowRunner) -> Divergence:
        for _ in range(2):  # the second round does not try to merge again
            for inputs in copies:
                runner.submit("fraud", "1", [POOLED], inputs, ZERO)
            await settled(runner)
        return runner.divergence[("fraud", "1", POOLED)]

    with caplog.at_level(logging.WARNING, logger="turnout.shadow"):
        d = scenario(repo, executor, body)
    assert (d.requests, d.errors) == (20, 0)
    assert d.abs_diff_sum == pytest.approx(2 * want.abs_diff_sum, rel=1e-6)
    assert len([r for r in caplog.records if "do not follow input rows" in r.message]) == 1


def test_a_version_not_loaded_counts_an_error_per_copy(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    async def body(runner: ShadowRunner) -> tuple[Divergence, Divergence]:
        for inputs in fraud_rows(4, seed=9):
            runner.submit("fraud", "1", ["7", "2"], inputs, ZERO)
        await settled(runner)
        await runner.registry.unload("fraud", ["2"])
        for inputs in fraud_rows(3, seed=10):
            runner.submit("fraud", "1", ["2"], inputs, ZERO)
        await settled(runner)
        return runner.divergence[("fraud", "1", "7")], runner.divergence[("fraud", "1", "2")]

    unknown, unloaded = scenario(repo, executor, body)
    assert (unknown.requests, unknown.errors, unknown.inflight) == (0, 4, 0)
    assert (unloaded.requests, unloaded.errors, unloaded.inflight) == (4, 3, 0)


# -- bounds and shutdown ------------------------------------------------------------------------


def test_copies_over_the_limit_are_dropped(repo: Path, executor: ThreadPoolExecutor) -> None:
    async def body(runner: ShadowRunner) -> list[dict[str, object]]:
        for inputs in fraud_rows(4, seed=11):
            runner.submit("fraud", "1", ["2", ROWS], inputs, ZERO)
        assert [d.inflight for d in runner.divergence.values()] == [3, 2]
        await settled(runner)
        return runner.report("fraud")

    report = scenario(repo, executor, body, limit=5)
    assert {r["shadow"]: (r["requests"], r["dropped"], r["inflight"]) for r in report} == {
        "2": (3, 1, 0),
        ROWS: (2, 2, 0),
    }


def test_a_slow_shadow_runs_off_the_loop_and_close_abandons_it(
    repo: Path, executor: ThreadPoolExecutor
) -> None:
    async def body(runner: ShadowRunner) -> Divergence:
        for inputs in fraud_rows(3, seed=12):
            runner.submit("fraud", "1", [SLOW], inputs, ZERO)
        for _ in range(5):
            await asyncio.sleep(0)
        d = runner.divergence[("fraud", "1", SLOW)]
        # Drained in the first turn (no delay): run on the loop, they would be compared by now;
        # their run (three rows through 50 layers) takes tens of ms on the thread.
        assert (d.requests, d.inflight) == (0, 3)
        await runner.close()
        for inputs in fraud_rows(2, seed=13):  # after close: dropped
            runner.submit("fraud", "1", [SLOW], inputs, ZERO)
        return d

    d = scenario(repo, executor, body, inline=False, slow=True, delay_s=0.0)
    assert (d.requests, d.errors, d.dropped, d.inflight) == (0, 0, 2, 0)
