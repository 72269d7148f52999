"""The prediction log: sampled records of served predictions (inputs, outputs, who asked, how
the request was routed), written beside the request path to a sink. docs/prediction-log.md
describes the format and the settings.

The request path pays for a sampling decision and, for a sampled request, one tuple of
references appended to a deque (``PredictionLog.offer``: no copy, no serialisation, no lock,
never a wait). A request whose record would take the queue past its count or byte cap is not
logged, and counted (``dropped``). A writer thread wakes every ``flush_s``, takes what is
queued, turns it into records and hands the batch to the sink, whose failures are counted the
same way. What is queued and not yet written when the process dies is lost: at most one period
of records (plus, for the directory sink, nothing already written: see ``DirectorySink``).

Threads: ``offer`` runs on the event loop thread only; everything else on the writer thread,
except the counters that the metrics collector reads (plain ints and dicts, each written by one
thread).
"""

from __future__ import annotations

import logging
import random
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from gateway.background.prediction_records import Queued, encode
from gateway.serving.types import ModelVersion

log = logging.getLogger("turnout.predictions")

# Drop reasons (the label of turnout_predictions_dropped_total): a fixed set.
QUEUE_FULL = "queue_full"
SINK_ERROR = "sink_error"
REASONS = (QUEUE_FULL, SINK_ERROR)
# A rate of 1 samples every request: thresholds compare with 32-bit hashes.
_ALL = 1 << 32
# The dtype of string tensors (numpy's builtin dtypes are singletons).
_OBJECT = np.dtype(object)
# Bytes a string element of a BYTES tensor holds beyond its text (a Python str object).
_STRING_OVERHEAD = 64


class Sink(Protocol):
    """Where batches of records go; called on the writer thread only."""

    def write(self, taken: Sequence[Queued], lines: list[bytes]) -> int:
        """Write a batch: the queued tuples and each one's JSON line (gateway.background.
        prediction_records); the bytes written. Raise to have the batch counted as dropped
        (``sink_error``)."""
        ...

    def tick(self, now: float) -> None:
        """Called every period, with or without records (time-based work: rotation)."""
        ...

    def close(self) -> None: ...


# What the request path hands over: called for every answered request.
Record = Callable[..., None]


def thresholds(rates: Mapping[str, float]) -> tuple[dict[str, int], int]:
    """Sampling rates by model (``*``: every other model) -> 32-bit thresholds and the default."""
    scaled = {model: round(rate * _ALL) for model, rate in rates.items()}
    return {m: t for m, t in scaled.items() if m != "*"}, scaled.get("*", 0)


def sampled(threshold: int, inference_id: str | None) -> bool:
    """Whether a request is logged at a threshold (rate × 2³²): by a hash of the client's id
    when it gave one, so that a replay samples the same requests; else at random."""
    if threshold >= _ALL:
        return True
    if inference_id is not None:
        return zlib.crc32(inference_id.encode("utf-8", "surrogatepass")) < threshold
    return random.getrandbits(32) < threshold


def string_bytes(array: np.ndarray) -> int:
    """Memory a string tensor holds: each element's length plus an overhead."""
    size = _STRING_OVERHEAD * array.size
    for element in array.flat:
        size += len(element) if type(element) in (str, bytes) else 0
    return size


class PredictionLog:
    """Samples answered requests into a bounded queue; a writer thread empties it into a sink."""

    def __init__(
        self,
        rates: Mapping[str, float],
        sink: Sink,
        *,
        max_records: int = 10_000,
        max_bytes: int = 64 << 20,
        flush_s: float = 0.2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._thresholds, self._default = thresholds(rates)
        self.models = sorted(m for m, rate in rates.items() if m != "*" and rate > 0)
        self.sink = sink
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.flush_s = flush_s
        self._clock = clock
        self._queue: deque[Queued] = deque()
        # Bytes queued = offered - taken, each written by one thread only.
        self.offered_bytes = 0
        self.taken_bytes = 0
        self.refused: Counter[str] = Counter()  # model -> dropped at the queue (event loop)
        self.failed: Counter[str] = Counter()  # model -> dropped by the sink (writer)
        self.logged: Counter[str] = Counter()  # model -> records written
        self.written_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def queued_bytes(self) -> int:
        return self.offered_bytes - self.taken_bytes

    def dropped(self) -> dict[tuple[str, str], int]:
        """(model, reason) -> records not logged."""
        counts = {(m, QUEUE_FULL): n for m, n in list(self.refused.items())}
        counts.update({(m, SINK_ERROR): n for m, n in list(self.failed.items())})
        return counts

    def offer(
        self,
        inference_id: str,
        client_id: str | None,
        info: ModelVersion,
        role: str,
        revision: int | None,
        propensity: float | None,
        inputs: Mapping[str, np.ndarray],
        outputs: Mapping[str, np.ndarray],
        principal: str,
    ) -> None:
        """Queue a record of one answered request if it is sampled and fits (event loop only).
        The arrays are referenced, never copied: neither side writes them afterwards."""
        model = info.model
        threshold = self._thresholds.get(model, self._default)
        if threshold <= 0 or (threshold < _ALL and not sampled(threshold, client_id)):
            return
        size = 0
        for array in inputs.values():
            size += array.nbytes if array.dtype is not _OBJECT else string_bytes(array)
        for array in outputs.values():
            size += array.nbytes if array.dtype is not _OBJECT else string_bytes(array)
        queue = self._queue
        if len(queue) >= self.max_records or self.offered_bytes - self.taken_bytes + size > (
            self.max_bytes
        ):
            self.refused[model] += 1
            return
        self.offered_bytes += size
        queue.append(
            (inference_id, self._clock(), info, role, revision, propensity, inputs, outputs,
             principal, size)
        )  # fmt: skip

    # -- the writer thread ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="turnout-predictions", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, close the sink and end the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        else:
            self.drain()
            self.sink.close()

    def _run(self) -> None:
        try:
            while not self._stop.wait(self.flush_s):
                self.drain()
            self.drain()
        finally:
            self.sink.close()

    def drain(self) -> int:
        """Write every queued record to the sink (writer thread); the number taken."""
        queue = self._queue
        taken = [queue.popleft() for _ in range(len(queue))]
        if taken:
            counts = self.logged
            try:
                self.written_bytes += self.sink.write(taken, encode(taken))
            except Exception:
                log.exception("the prediction log's sink failed: %d records dropped", len(taken))
                counts = self.failed
            for t in taken:
                counts[t[2].model] += 1
            self.taken_bytes += sum(t[9] for t in taken)
        try:
            self.sink.tick(self._clock())
        except Exception:
            log.exception("the prediction log's sink failed to rotate or clean up")
        return len(taken)
