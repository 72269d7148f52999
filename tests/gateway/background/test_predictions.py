"""The prediction log (gateway.background.predictions) and its sinks, driven directly: real
files, a real HTTP server for the CloudEvents sink, a writer thread where the test needs one."""

from __future__ import annotations

import gzip
import math
import os
import signal
import socket
import subprocess
import sys
import weakref
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from gateway.background.prediction_records import Batch, dumps, encode, pack, record
from gateway.background.prediction_sinks import (
    BATCH_CONTENT_TYPE,
    CLOUDEVENT_TYPE,
    CloudEventsSink,
    DirectorySink,
    file_name,
)
from gateway.background.prediction_writer import WriterProcess
from gateway.background.predictions import QUEUE_FULL, SINK_ERROR, PredictionLog, SinkError
from gateway.serving.types import ModelVersion, TensorSpec
from tests.support.event_sink import EventSink
from tests.support.server import until

INFO = ModelVersion(
    "fraud", "2", Path("."), "0" * 64,
    (TensorSpec("input", "FP32", (-1, 4)),), (TensorSpec("probability", "FP32", (-1, 1)),),
)  # fmt: skip


def arrays(rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    inputs = {"input": rng.standard_normal((1, 4)).astype(np.float32)}
    return inputs, {"probability": rng.random((1, 1)).astype(np.float32)}


def read_dir(directory: Path) -> list[dict[str, Any]]:
    """Every record of the closed files, in file-name order."""
    records = []
    for path in sorted(directory.glob("predictions-*.jsonl.gz")):
        records += [orjson.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
    return records


class Keep:
    """A sink that keeps the records it is given, parsed (the test reads them back)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, batch: Batch) -> int:
        lines = encode(batch)
        self.records += [orjson.loads(line) for line in lines]
        return sum(map(len, lines))

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        pass


def offer_many(log: PredictionLog, n: int, ids: list[str] | None = None) -> None:
    rng = np.random.default_rng(0)
    inputs, outputs = arrays(rng)
    for i in range(n):
        client_id = ids[i] if ids is not None else None
        log.offer(f"r{i}", client_id, INFO, "candidate", 3, 0.25, inputs, outputs, "alpha")


# -- sampling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("by_id", [False, True], ids=["random", "by-id"])
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_sampling_rate_is_within_binomial_bounds(rate: float, by_id: bool) -> None:
    """n = 20,000 requests at rate p: the count is Binomial(n, p); 5 standard deviations either
    side leave a false failure probability below 6e-7 per case."""
    n = 20_000
    log = PredictionLog({"fraud": rate}, Keep(), max_records=n)
    ids = [os.urandom(8).hex() for _ in range(n)] if by_id else None
    offer_many(log, n, ids)
    bound = 5 * math.sqrt(n * rate * (1 - rate))
    assert abs(log.queued - n * rate) <= bound


def test_sampling_by_id_is_deterministic_so_a_replay_samples_the_same_requests() -> None:
    ids = [f"order-{i}" for i in range(2000)]
    chosen = []
    for _ in range(2):
        sink = Keep()
        log = PredictionLog({"fraud": 0.3}, sink)
        offer_many(log, len(ids), ids)
        log.drain()
        chosen.append([r["id"] for r in sink.records])
    assert chosen[0] == chosen[1] and 0 < len(chosen[0]) < len(ids)


def test_rates_per_model_with_a_default_and_off_models_take_nothing() -> None:
    sink = Keep()
    log = PredictionLog({"risk": 1.0, "*": 0.0}, sink)
    offer_many(log, 50)  # fraud: the default, 0
    assert log.queued == 0 and log.queued_bytes == 0
    log = PredictionLog({"*": 1.0}, sink)
    offer_many(log, 50)
    assert log.queued == 50


# -- records -----------------------------------------------------------------------------------

DTYPES = ["BOOL", "INT8", "UINT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BYTES"]


def sample(datatype: str, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BYTES":
        words = ["a", "é", 'quote " and \\', '},{"id":', "\u2603"]
        return np.array(rng.choice(words, size=shape).tolist(), dtype=object)
    dtype = np.dtype({"BOOL": "bool", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
                      "INT64": "int64", "UINT64": "uint64", "FP16": "float16", "FP32": "float32",
                      "FP64": "float64"}[datatype])  # fmt: skip
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 1e3).astype(dtype)


@pytest.mark.parametrize(
    "datatypes", [DTYPES, DTYPES[:-1]], ids=["with-strings-one-by-one", "numeric-by-columns"]
)
def test_records_are_complete_and_arrays_round_trip_exactly(
    tmp_path: Path, datatypes: list[str]
) -> None:
    rng = np.random.default_rng(7)
    specs = tuple(TensorSpec(f"in_{d}", d, (-1, 3)) for d in datatypes)
    info = ModelVersion("m", "1", Path("."), "0" * 64, specs, specs)
    sent = []
    log = PredictionLog({"m": 1.0}, DirectorySink(tmp_path), clock=lambda: 1796523175.25)
    for i in range(5):
        inputs = {s.name: sample(s.datatype, rng, (2, 3)) for s in specs}
        outputs = {s.name: sample(s.datatype, rng, (2, 3)) for s in specs}
        log.offer(f"id-{i}", None, info, "arm", 12, 0.125, inputs, outputs, "key-a")
        sent.append((inputs, outputs))
    log.stop()
    records = read_dir(tmp_path)
    assert [r["id"] for r in records] == [f"id-{i}" for i in range(5)]
    for logged, (inputs, outputs) in zip(records, sent, strict=True):
        assert {k: v for k, v in logged.items() if k not in ("inputs", "outputs")} == {
            "id": logged["id"], "time": 1796523175.25, "model": "m", "version": "1",
            "policy_revision": 12, "route_role": "arm", "propensity": 0.125, "principal": "key-a",
        }  # fmt: skip
        for tensors, originals in ((logged["inputs"], inputs), (logged["outputs"], outputs)):
            assert [t["name"] for t in tensors] == list(originals)
            for tensor, spec in zip(tensors, specs, strict=True):
                original = originals[tensor["name"]]
                assert tensor["datatype"] == spec.datatype
                assert tensor["shape"] == [2, 3]
                back = np.array(tensor["data"], dtype=spec.dtype).reshape(tensor["shape"])
                np.testing.assert_array_equal(back, original)  # exact, float32 and float16 too


HOSTILE = ['a","b', '},{"id":"x', "back\\", "\\", "", "%s%%", "\u2603", 'x"],["y']


def test_encoding_by_columns_writes_the_bytes_of_one_record_at_a_time() -> None:
    """Strings that look like the boundaries the column path cuts at, and '%' for its template,
    in every string field; the same bytes as a dumps of each record alone."""
    rng = np.random.default_rng(8)
    specs = tuple(TensorSpec(f"t_{d}", d, (-1, 2, 3)) for d in DTYPES[:-1])
    info = ModelVersion('m%s"', "v%d", Path("."), "0" * 64, specs, specs[:2])
    taken = []
    for i, text in enumerate(HOSTILE):
        inputs = {s.name: sample(s.datatype, rng, (i % 2 + 1, 2, 3)) for s in specs}
        outputs = {s.name: sample(s.datatype, rng, (i % 2 + 1, 2, 3)) for s in specs[:2]}
        role, revision, p = ("default", None, None) if i % 3 else (text, i, 0.5)
        taken.append(
            (text + str(i), 1e9 + i / 7, info, role, revision, p, inputs, outputs, text, 0)
        )
    lines = encode(pack(taken))
    assert lines == [dumps(record(t)) + b"\n" for t in taken]
    assert [orjson.loads(line)["id"] for line in lines] == [t[0] for t in taken]


def test_a_request_without_a_policy_has_propensity_one_and_a_pinned_one_none() -> None:
    sink = Keep()
    log = PredictionLog({"*": 1.0}, sink)
    inputs, outputs = arrays(np.random.default_rng(1))
    log.offer("a", None, INFO, "default", None, None, inputs, outputs, "addr:10.0.0.1")
    log.offer("b", None, INFO, "pinned", None, None, inputs, outputs, "addr:10.0.0.1")
    log.drain()
    assert [(r["route_role"], r["propensity"], r["policy_revision"]) for r in sink.records] == [
        ("default", 1.0, None), ("pinned", None, None),
    ]  # fmt: skip


# -- the directory sink ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1796523175.0

    def __call__(self) -> float:
        return self.now


def batch(log: PredictionLog, n: int, rng: np.random.Generator) -> None:
    for _ in range(n):
        inputs, outputs = arrays(rng)
        log.offer(os.urandom(16).hex(), None, INFO, "single", 1, 1.0, inputs, outputs, "p")
    log.drain()


def closed_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("predictions-*.jsonl.gz"))


def test_files_rotate_by_size_and_each_closed_file_is_one_complete_gzip_member(
    tmp_path: Path,
) -> None:
    clock = Clock()
    sink = DirectorySink(tmp_path, rotate_bytes=4096, retain_bytes=1 << 30, clock=clock)
    log = PredictionLog({"fraud": 1.0}, sink, clock=clock)
    rng = np.random.default_rng(3)
    for _ in range(40):
        batch(log, 10, rng)
        clock.now += 0.001
    log.stop()
    files = closed_files(tmp_path)
    assert len(files) >= 3 and not list(tmp_path.glob("*.partial"))
    for path in files:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        d.decompress(path.read_bytes())
        assert d.eof and d.unused_data == b""  # one member, with its trailer
    sizes = [p.stat().st_size for p in files]
    assert all(size >= 4096 for size in sizes[:-1])
    assert len(read_dir(tmp_path)) == 400


def test_files_rotate_by_age_without_traffic_and_names_sort_in_order(tmp_path: Path) -> None:
    clock = Clock()
    sink = DirectorySink(tmp_path, rotate_s=60, clock=clock)
    log = PredictionLog({"fraud": 1.0}, sink, clock=clock)
    rng = np.random.default_rng(4)
    for _ in range(3):
        batch(log, 5, rng)
        clock.now += 59
        log.drain()  # 59 s old: still open
        opened = len(closed_files(tmp_path))
        clock.now += 1
        log.drain()  # 60 s: closed, with no record to write
        assert len(closed_files(tmp_path)) == opened + 1
    records = read_dir(tmp_path)
    assert len(records) == 15
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)


def test_retention_deletes_the_oldest_files_beyond_the_cap(tmp_path: Path) -> None:
    clock = Clock()
    retain = 3 * 4096
    sink = DirectorySink(tmp_path, rotate_bytes=4096, retain_bytes=retain, clock=clock)
    log = PredictionLog({"fraud": 1.0}, sink, clock=clock)
    rng = np.random.default_rng(5)
    names_seen: list[str] = []
    for _ in range(200):
        batch(log, 10, rng)
        clock.now += 0.001
        names_seen += [p.name for p in closed_files(tmp_path) if p.name not in names_seen]
    log.stop()
    names_seen += [p.name for p in closed_files(tmp_path) if p.name not in names_seen]
    kept = [p.name for p in closed_files(tmp_path)]
    assert sum(p.stat().st_size for p in closed_files(tmp_path)) <= retain
    assert sink.deleted == len(names_seen) - len(kept) > 0
    assert kept == sorted(names_seen)[-len(kept) :]  # the newest are kept


DYING_WRITER = """
import os, sys
from pathlib import Path
import numpy as np
from gateway.background.prediction_sinks import DirectorySink
from gateway.background.predictions import PredictionLog
from tests.gateway.background.test_predictions import INFO, arrays, batch
log = PredictionLog({"fraud": 1.0}, DirectorySink(Path(sys.argv[1])))
rng = np.random.default_rng(6)
batch(log, 7, rng)
batch(log, 5, rng)
inputs, outputs = arrays(rng)
log.offer("never-written", None, INFO, "single", 1, 1.0, inputs, outputs, "p")
os._exit(3)  # dies: nothing closed, the queued record lost
"""


def test_a_restart_loses_at_most_the_unflushed_batch(tmp_path: Path) -> None:
    """A process that dies leaves its open file as ``.partial``: every batch written before is
    readable; the next start seals it into a complete file."""
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    died = subprocess.run([sys.executable, "-c", DYING_WRITER, str(tmp_path)], env=env, check=False)
    assert died.returncode == 3
    (partial,) = tmp_path.glob("*.partial")
    assert not closed_files(tmp_path)
    restarted = DirectorySink(tmp_path)
    assert restarted.recovered == 1 and not list(tmp_path.glob("*.partial"))
    records = read_dir(tmp_path)
    assert len(records) == 12 and "never-written" not in {r["id"] for r in records}
    assert closed_files(tmp_path)[0].name == partial.name.removesuffix(".partial")


@pytest.mark.parametrize("who", ["running process", "other host"])
def test_a_partial_file_of_another_writer_is_left_alone(tmp_path: Path, who: str) -> None:
    host = socket.gethostname()
    if who == "running process":
        pid = os.getppid()  # running, and not this process
    else:
        pid, host = 2**22 + 1, host + "-elsewhere"  # above Linux's pid_max: never running here
    name = file_name(1796523175.0, host, pid, 1) + ".partial"
    (tmp_path / name).write_bytes(gzip.compress(b'{"id":"x"}\n'))
    assert DirectorySink(tmp_path).recovered == 0
    assert (tmp_path / name).exists()


# -- the queue's bounds ------------------------------------------------------------------------


def test_the_queue_drops_and_counts_beyond_its_count_and_byte_caps() -> None:
    log = PredictionLog({"fraud": 1.0}, Keep(), max_records=100)
    offer_many(log, 130)
    assert (log.queued, log.dropped()) == (100, {("fraud", QUEUE_FULL): 30})
    record_bytes = 4 * 4 + 4  # the input's 4 float32 and the output's one
    log = PredictionLog({"fraud": 1.0}, Keep(), max_bytes=10 * record_bytes)
    offer_many(log, 25)
    assert (log.queued, log.queued_bytes) == (10, 10 * record_bytes)
    assert log.dropped() == {("fraud", QUEUE_FULL): 15}
    log.drain()
    assert log.queued_bytes == 0  # room again


def test_string_tensors_are_charged_by_their_bytes() -> None:
    info = ModelVersion("t", "1", Path("."), "0" * 64, (TensorSpec("s", "BYTES", (-1,)),), ())
    log = PredictionLog({"t": 1.0}, Keep(), max_bytes=1 << 20)
    big = {"s": np.array(["x" * (300 << 10)], dtype=object)}
    for i in range(5):
        log.offer(str(i), None, info, "single", None, None, big, {}, "p")
    assert log.queued == 3 and log.dropped() == {("t", QUEUE_FULL): 2}


# -- the CloudEvents sink, with a real HTTP server ---------------------------------------------


@pytest.fixture
def receiver() -> Iterator[EventSink]:
    with EventSink(None) as server:
        yield server


def test_cloudevents_batches_reach_a_real_http_sink(receiver: EventSink) -> None:
    log = PredictionLog({"fraud": 1.0}, CloudEventsSink(receiver.url, source="/test"))
    offer_many(log, 3)
    log.drain()
    ((content_type, body),) = receiver.bodies
    assert content_type == BATCH_CONTENT_TYPE
    events = orjson.loads(body)
    assert [e["id"] for e in events] == ["r0", "r1", "r2"]
    for event in events:
        assert event["specversion"] == "1.0" and event["type"] == CLOUDEVENT_TYPE
        assert event["source"] == "/test" and event["subject"] == "fraud/2"
        assert event["datacontenttype"] == "application/json"
        assert event["time"].endswith("Z") and event["data"]["id"] == event["id"]
        assert event["data"]["route_role"] == "candidate" and event["data"]["principal"] == "alpha"
    assert log.logged == {"fraud": 3} and log.written_bytes == len(body)


def test_a_failing_sink_is_retried_then_its_batch_is_dropped_and_counted(
    receiver: EventSink,
) -> None:
    receiver.status = 503
    sink = CloudEventsSink(receiver.url, attempts=3, backoff_s=0.001)
    log = PredictionLog({"fraud": 1.0}, sink)
    offer_many(log, 4)
    log.drain()
    assert len(receiver.bodies) == 3  # every attempt carried the same batch
    assert len({body for _, body in receiver.bodies}) == 1
    assert log.dropped() == {("fraud", SINK_ERROR): 4} and not log.logged


def test_when_the_writer_lags_behind_a_blocked_sink_records_are_dropped_and_counted(
    receiver: EventSink,
) -> None:
    receiver.release.clear()  # the sink answers nothing until released
    log = PredictionLog(
        {"fraud": 1.0}, CloudEventsSink(receiver.url, timeout_s=30), max_records=50, flush_s=0.01
    )
    log.start()
    try:
        offer_many(log, 1)
        assert receiver.arrived.wait(10)  # the writer is inside the POST, blocked
        offer_many(log, 80)  # offers never wait: 50 fit, 30 are dropped
        assert log.queued == 50 and log.dropped() == {("fraud", QUEUE_FULL): 30}
        receiver.release.set()
        until(lambda: log.logged["fraud"] == 51, timeout_s=10)
    finally:
        receiver.release.set()
        log.stop()
    assert sum(len(orjson.loads(body)) for _, body in receiver.bodies) == 51


def test_a_signed_batch_verifies_as_an_event_of_the_stream_does() -> None:
    secret = "prediction-log-secret-0123"
    with EventSink(secret) as receiver:
        log = PredictionLog({"fraud": 1.0}, CloudEventsSink(receiver.url, secret=secret.encode()))
        offer_many(log, 2)
        log.drain()
        unsigned = PredictionLog({"fraud": 1.0}, CloudEventsSink(receiver.url, attempts=1))
        offer_many(unsigned, 1)
        unsigned.drain()
    assert [e["id"] for e in receiver.taken()] == ["r0", "r1"] and len(receiver.bad) == 1
    assert log.logged == {"fraud": 2} and unsigned.dropped() == {("fraud", SINK_ERROR): 1}


# -- merged batches ----------------------------------------------------------------------------


def test_a_view_of_a_merged_batch_is_copied_so_the_cap_counts_what_the_queue_keeps() -> None:
    sink = Keep()
    log = PredictionLog({"fraud": 1.0}, sink)
    merged = np.arange(4096, dtype=np.float32).reshape(4096, 1)  # the batch's outputs
    held = weakref.ref(merged)
    inputs, _ = arrays(np.random.default_rng(9))
    log.offer("r", None, INFO, "single", 1, 1.0, inputs, {"probability": merged[7:8]}, "p")
    del merged
    assert held() is None  # the queue keeps the request's row, not the batch
    assert log.queued_bytes == 4 * 4 + 4
    log.drain()
    assert sink.records[0]["outputs"][0]["data"] == [7.0]


# -- the writer process ------------------------------------------------------------------------


def test_the_writer_process_writes_the_files_and_a_dead_one_costs_one_batch(
    tmp_path: Path,
) -> None:
    writer = WriterProcess(partial(DirectorySink, tmp_path), restart_s=0)
    log = PredictionLog({"fraud": 1.0}, writer)
    rng = np.random.default_rng(10)
    batch(log, 5, rng)
    pid = writer.pid
    assert pid is not None and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    batch(log, 3, rng)  # the batch in flight when it died is dropped, and counted
    assert log.dropped() == {("fraud", SINK_ERROR): 3}
    batch(log, 4, rng)
    assert writer.pid not in (None, pid)  # started again; it sealed the dead one's file
    log.stop()
    assert writer.pid is None and log.logged == {"fraud": 9}
    assert len(read_dir(tmp_path)) == 9 and not list(tmp_path.glob("*.partial"))


def test_a_sink_the_writer_process_cannot_build_fails_the_start_and_its_batches(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("not a directory")
    writer = WriterProcess(partial(DirectorySink, tmp_path / "file"), restart_s=0)
    log = PredictionLog({"fraud": 1.0}, writer)
    with pytest.raises(SinkError, match="FileExistsError"):
        log.start()  # the gateway does not start, and says why
    batch(log, 2, np.random.default_rng(11))
    assert log.dropped() == {("fraud", SINK_ERROR): 2} and writer.pid is None


ORPHANED_WRITER = """
import os, sys
from functools import partial
from pathlib import Path
import numpy as np
from gateway.background.prediction_sinks import DirectorySink
from gateway.background.prediction_writer import WriterProcess
from gateway.background.predictions import PredictionLog
from tests.gateway.background.test_predictions import batch
log = PredictionLog({"fraud": 1.0}, WriterProcess(partial(DirectorySink, Path(sys.argv[1]))))
batch(log, 6, np.random.default_rng(12))
os._exit(3)  # dies without closing the log
"""


def test_the_writer_process_seals_its_file_when_the_gateway_dies(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    died = subprocess.run(
        [sys.executable, "-c", ORPHANED_WRITER, str(tmp_path)], env=env, check=False
    )
    assert died.returncode == 3
    until(lambda: closed_files(tmp_path) and not list(tmp_path.glob("*.partial")), timeout_s=10)
    assert len(read_dir(tmp_path)) == 6


def test_a_strided_float32_array_keeps_its_float32_text() -> None:
    """orjson writes only contiguous arrays; the fallback for a strided view must not turn
    float32 values into float64 text (0.2 would read 0.20000000298023224)."""
    array = (np.arange(12, dtype=np.float32).reshape(3, 4) / 10)[:, ::2]
    assert dumps(array) == b"[[0.0,0.2],[0.4,0.6],[0.8,1.0]]"
