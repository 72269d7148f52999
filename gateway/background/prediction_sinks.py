"""Where the prediction log writes (gateway.background.predictions): a rotating directory of gzip
JSON-lines files, or CloudEvents POSTed in batches to an HTTP URL. Both run in the log's writer
process (gateway.background.prediction_writer), so blocking I/O and the encoding are theirs to
do, off the gateway's GIL; neither is ever called by a request."""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import zlib
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

import httpx

from gateway.background.events import SIGNATURE_HEADER, cloudevent, signature
from gateway.background.prediction_records import Batch, encode
from gateway.background.prediction_writer import WriterProcess
from gateway.background.predictions import PredictionLog, Sink, SinkError
from gateway.settings import Settings

log = logging.getLogger("turnout.predictions")

PREFIX, SUFFIX, OPEN = "predictions-", ".jsonl.gz", ".partial"
# gzip at level 1: at the default level 9 a record cost 4.5 µs to compress, at 1 about a tenth
# of that, for files ~20 % larger (docs/prediction-log.md).
LEVEL = 1
_GZIP = 16 + zlib.MAX_WBITS  # zlib's wbits for a gzip header and trailer
CLOUDEVENT_TYPE = "dev.turnout.prediction"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"


def file_name(opened: float, host: str, pid: int, sequence: int) -> str:
    """``predictions-20261206T021500.123456Z-<host>-<pid>-<seq>.jsonl.gz``: sorted by name,
    files are in the order they were opened (by time, then by writer). The host keeps apart the
    writers of several containers in one shared directory (each may be pid 1)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(opened))
    micros = int(opened % 1 * 1e6)
    return f"{PREFIX}{stamp}.{micros:06d}Z-{host}-{pid}-{sequence:06d}{SUFFIX}"


def writer_of(name: str) -> tuple[str, int] | None:
    """(host, pid) of a file named by ``file_name`` (``.partial`` or not); None for another."""
    try:
        _, rest = name[len(PREFIX) :].split("-", 1)
        host, pid, _ = rest.rsplit("-", 2)
        return host, int(pid)
    except ValueError:
        return None


class DirectorySink:
    """Gzip JSON-lines files in one directory. A file is written as ``<name>.partial`` and
    renamed to ``<name>`` once closed, when it reaches ``rotate_bytes`` (compressed) or is
    ``rotate_s`` old: a closed file is one complete gzip member. Each batch ends with a zlib sync
    flush, so what a process that died had written is readable: at start, the ``.partial``
    files of processes no longer running are sealed into complete files (up to their last whole
    line). After each file is closed the oldest closed files are deleted until the directory's
    files take at most ``retain_bytes``."""

    def __init__(
        self,
        directory: Path,
        *,
        rotate_bytes: int = 64 << 20,
        rotate_s: float = 3600.0,
        retain_bytes: int = 1 << 30,
        clock: Any = time.time,
    ) -> None:
        self.directory = directory
        self.rotate_bytes = rotate_bytes
        self.rotate_s = rotate_s
        self.retain_bytes = retain_bytes
        self._clock = clock
        self._pid = os.getpid()
        self._host = socket.gethostname().replace("/", "_")
        self._sequence = 0
        self._file: IO[bytes] | None = None
        self._path: Path | None = None
        self._z: Any = None
        self._opened = 0.0
        self._size = 0
        self.deleted = 0  # files deleted by retention
        directory.mkdir(parents=True, exist_ok=True)
        self.recovered = self._recover()

    def write(self, batch: Batch) -> int:
        data = b"".join(encode(batch))
        if self._file is None:
            self._open()
        assert self._file is not None
        chunk = self._z.compress(data) + self._z.flush(zlib.Z_SYNC_FLUSH)
        self._file.write(chunk)
        self._file.flush()
        self._size += len(chunk)
        if self._size >= self.rotate_bytes:
            self._seal()
        return len(chunk)

    def tick(self, now: float) -> None:
        if self._file is not None and now - self._opened >= self.rotate_s:
            self._seal()

    def close(self) -> None:
        if self._file is not None:
            self._seal()

    def _open(self) -> None:
        self._opened = self._clock()
        self._sequence += 1
        self._path = self.directory / (
            file_name(self._opened, self._host, self._pid, self._sequence) + OPEN
        )
        self._file = open(self._path, "xb")  # noqa: SIM115 (closed by _seal)
        self._z = zlib.compressobj(LEVEL, zlib.DEFLATED, _GZIP)
        self._size = 0

    def _seal(self) -> None:
        assert self._file is not None and self._path is not None
        self._file.write(self._z.flush(zlib.Z_FINISH))
        self._file.close()
        self._path.rename(self._path.with_name(self._path.name[: -len(OPEN)]))
        self._file = self._path = self._z = None
        self._retain()

    def _retain(self) -> None:
        files = []
        for path in self.directory.glob(f"{PREFIX}*{SUFFIX}"):
            try:
                files.append((path.name, path, path.stat().st_size))
            except FileNotFoundError:  # another worker's retention took it
                continue
        files.sort()
        total = sum(size for _, _, size in files)
        for _, path, size in files:
            if total <= self.retain_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            self.deleted += 1

    def _recover(self) -> int:
        """Seal the ``.partial`` files of this host that no running process is writing (another
        host's are its own to seal); how many."""
        sealed = 0
        for path in sorted(self.directory.glob(f"{PREFIX}*{SUFFIX}{OPEN}")):
            writer = writer_of(path.name)
            if writer is None or writer[0] != self._host:
                continue
            if writer[1] != self._pid and _alive(writer[1]):
                continue
            data = _readable_prefix(path.read_bytes())
            data = data[: data.rfind(b"\n") + 1]  # whole lines only
            final = path.with_name(path.name[: -len(OPEN)])
            if data:
                z = zlib.compressobj(LEVEL, zlib.DEFLATED, _GZIP)
                final.write_bytes(z.compress(data) + z.flush())
            path.unlink()
            sealed += 1
            log.warning("prediction log: sealed %s left by a stopped process", final.name)
        return sealed


def _readable_prefix(raw: bytes) -> bytes:
    """What a truncated gzip stream decompresses to, up to where it breaks off."""
    d = zlib.decompressobj(_GZIP)
    out = []
    for start in range(0, len(raw), 1 << 16):
        try:
            out.append(d.decompress(raw[start : start + (1 << 16)]))
        except zlib.error:
            break
    return b"".join(out)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CloudEventsSink:
    """Each batch POSTed as one CloudEvents 1.0 batch (``application/cloudevents-batch+json``,
    a JSON array of structured events of type ``dev.turnout.prediction``, ``id`` the inference
    id, ``subject`` ``model/version``, ``data`` the record). A batch that does not get a 2xx
    is retried ``attempts`` times in all, with exponential backoff and jitter, then dropped
    (``SinkError``). Records queued meanwhile wait, and past the queue's caps are dropped."""

    def __init__(
        self,
        url: str,
        *,
        source: str | None = None,
        secret: bytes | None = None,
        timeout_s: float = 5.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
    ) -> None:
        self.url = url
        self.source = source or f"/turnout/{socket.gethostname()}"
        self.secret = secret
        self.attempts = attempts
        self.backoff_s = backoff_s
        self._client = httpx.Client(timeout=timeout_s)

    def write(self, batch: Batch) -> int:
        source = self.source
        events = [
            cloudevent(CLOUDEVENT_TYPE, source, ident, subject, at, line[:-1])
            for (ident, at, subject), line in zip(batch.events(), encode(batch), strict=True)
        ]
        body = b"[" + b",".join(events) + b"]"
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            headers = {"content-type": BATCH_CONTENT_TYPE}
            if self.secret is not None:  # signed at each attempt: the timestamp is fresh
                headers[SIGNATURE_HEADER] = signature(self.secret, int(time.time()), body)
            try:
                response = self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.is_success:
                return len(body)
            problem = f"HTTP {response.status_code}"
        raise SinkError(f"{batch.size} records not delivered to {self.url}: {problem}")

    def tick(self, now: float) -> None:
        pass

    def close(self) -> None:
        self._client.close()


def prediction_log(settings: Settings) -> PredictionLog | None:
    """The log these settings ask for; None when no model is sampled."""
    if not any(rate > 0 for rate in settings.prediction_log_sample.values()):
        return None
    make: Callable[[], Sink]
    if settings.prediction_log_dir is not None:
        make = partial(
            DirectorySink,
            settings.prediction_log_dir,
            rotate_bytes=settings.prediction_log_rotate_bytes,
            rotate_s=settings.prediction_log_rotate_s,
            retain_bytes=settings.prediction_log_retain_bytes,
        )
    else:
        assert settings.prediction_log_url is not None  # Settings.check
        secret = settings.prediction_log_secret
        make = partial(
            CloudEventsSink,
            settings.prediction_log_url,
            secret=None if secret is None else secret.encode(),
        )
    sink = WriterProcess(make)
    return PredictionLog(
        settings.prediction_log_sample,
        sink,
        max_records=settings.prediction_log_queue,
        max_bytes=settings.prediction_log_queue_bytes,
        flush_s=settings.flush_s,
    )
