"""Figures: a version's runtime statistics as processes publish and add them up."""

from __future__ import annotations

import pytest

from gateway.serving.statistics import Figures


def sample(scale: int) -> Figures:
    figures = Figures(
        succeeded=3 * scale,
        succeeded_s=0.5 * scale,
        fail=scale,
        fail_s=0.25 * scale,
        queue_s=0.125 * scale,
        input_s=0.0625 * scale,
        infer_s=0.25 * scale,
        output_s=0.03125 * scale,
        inferences=7 * scale,
        executions=2 * scale,
        last_ms=1_000 + scale,
        unlisted=scale,
    )
    figures.sizes[scale] = [1.0, 0.5, 0.25, 0.125]
    figures.sizes[64] = [float(scale), 0.0, 1.0, 0.0]
    return figures


def test_bytes_round_trip() -> None:
    assert Figures.from_bytes(sample(3).to_bytes()) == sample(3)


def test_merge_adds_counts_and_times_and_keeps_the_later_inference() -> None:
    merged = sample(1).merge(sample(2))
    assert (merged.succeeded, merged.fail, merged.inferences, merged.executions) == (9, 3, 21, 6)
    assert merged.succeeded_s == 1.5 and merged.queue_s == 0.375
    assert merged.last_ms == 1_002 and merged.unlisted == 3
    assert merged.sizes == {1: [1.0, 0.5, 0.25, 0.125], 2: [1.0, 0.5, 0.25, 0.125],
                            64: [3.0, 0.0, 2.0, 0.0]}  # fmt: skip
    assert sample(1).sizes[64] == [1.0, 0.0, 1.0, 0.0]  # the operands are left as they were


@pytest.mark.parametrize(
    "blob",
    [
        b"not json",
        b"[]",
        b'{"succeeded": "3"}',
        Figures().to_bytes().replace(b'"succeeded":0', b'"succeeded":0.5'),
        Figures().to_bytes().replace(b'"sizes":[]', b'"sizes":[[1,2]]'),
        Figures().to_bytes().replace(b'"sizes":[]', b'"sizes":[["1",1,0,0,0]]'),
    ],
    ids=["not-json", "not-object", "string", "fraction-count", "short-entry", "string-rows"],
)
def test_anything_else_is_refused(blob: bytes) -> None:
    with pytest.raises(ValueError):
        Figures.from_bytes(blob)
