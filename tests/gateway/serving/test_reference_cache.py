"""Reference outputs kept between starts (``--cache-dir``): read back only when whole and when
the model still computes them; otherwise recomputed, and a broken cache never fails a load."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from gateway.serving.monitoring import fit_monitor
from gateway.serving.runtime import SessionRuntime, load_version
from gateway.serving.types import ModelVersion
from gateway.settings import Settings
from monitors import VersionMonitor


class Counted:
    """A real session that counts the rows it is asked to run."""

    def __init__(self, inner: SessionRuntime) -> None:
        self.inner = inner
        self.rows = 0

    def run_sync(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str]
    ) -> dict[str, np.ndarray]:
        self.rows += len(next(iter(inputs.values())))
        return self.inner.run_sync(inputs, outputs)


@pytest.fixture(scope="module")
def fraud(demo_repo: Path) -> Iterator[tuple[ModelVersion, SessionRuntime, Path]]:
    folder = demo_repo / "fraud" / "1"
    with ThreadPoolExecutor(1) as executor:
        info, session = load_version("fraud", "1", folder, Settings(demo_repo), executor)
        yield info, session, folder


def fit(
    fraud: tuple[ModelVersion, SessionRuntime, Path], cache: Path | None
) -> tuple[VersionMonitor, int]:
    info, session, folder = fraud
    counted = Counted(session)
    monitor = fit_monitor(info, counted, folder, 300, cache)  # type: ignore[arg-type]
    return monitor, counted.rows


REFERENCE_ROWS = 5000  # the demo's reference sample


def test_a_second_fit_reads_the_kept_outputs(
    fraud: tuple[ModelVersion, SessionRuntime, Path], tmp_path: Path
) -> None:
    plain, rows = fit(fraud, None)
    assert rows == REFERENCE_ROWS
    first, rows = fit(fraud, tmp_path)
    assert rows == REFERENCE_ROWS
    assert len(list(tmp_path.glob("*.npz"))) == 1
    assert not list(tmp_path.glob("*.tmp"))
    second, rows = fit(fraud, tmp_path)
    assert rows == 8  # only the rows that check the kept outputs against the model
    assert plain.fingerprint == first.fingerprint == second.fingerprint


def test_kept_outputs_the_model_does_not_compute_are_replaced(
    fraud: tuple[ModelVersion, SessionRuntime, Path], tmp_path: Path
) -> None:
    plain, _ = fit(fraud, None)
    fit(fraud, tmp_path)
    (kept,) = tmp_path.glob("*.npz")
    with np.load(kept) as z:
        wrong = z["arr_0"] * 0.5
    with kept.open("wb") as f:
        np.savez(f, wrong)
    monitor, rows = fit(fraud, tmp_path)
    assert rows == 8 + REFERENCE_ROWS
    assert monitor.fingerprint == plain.fingerprint
    assert fit(fraud, tmp_path)[1] == 8  # rewritten with the right outputs


@pytest.mark.parametrize("damage", [b"", b"not a zip file", b"PK\x03\x04truncated"])
def test_a_damaged_cache_file_is_recomputed(
    fraud: tuple[ModelVersion, SessionRuntime, Path], tmp_path: Path, damage: bytes
) -> None:
    plain, _ = fit(fraud, None)
    fit(fraud, tmp_path)
    (kept,) = tmp_path.glob("*.npz")
    kept.write_bytes(damage)
    monitor, rows = fit(fraud, tmp_path)
    assert rows == REFERENCE_ROWS
    assert monitor.fingerprint == plain.fingerprint


def test_a_cache_that_cannot_be_written_only_costs_time(
    fraud: tuple[ModelVersion, SessionRuntime, Path], tmp_path: Path
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")  # the cache folder's path is taken by a file
    plain, _ = fit(fraud, None)
    monitor, rows = fit(fraud, blocked / "cache")
    assert rows == REFERENCE_ROWS
    assert monitor.fingerprint == plain.fingerprint
