from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from monitors.shadow import Divergence

Arrays = dict[str, np.ndarray]
Case = Callable[[np.random.Generator, list[int]], tuple[list[Arrays], list[Arrays]]]


def scores(rng: np.random.Generator, rows: int, columns: int, dtype: type = np.float32) -> Arrays:
    return {"score": rng.random((rows, columns)).astype(dtype)}


def pairs(make: Callable[[np.random.Generator, int], Arrays]) -> Case:
    """Primary and shadow outputs of the same form for each request."""

    def case(rng: np.random.Generator, rows: list[int]) -> tuple[list[Arrays], list[Arrays]]:
        return [make(rng, r) for r in rows], [make(rng, r) for r in rows]

    return case


def labels(rng: np.random.Generator, rows: int) -> Arrays:
    return {
        "label": rng.integers(0, 3, rows).astype(np.int64),
        "flag": rng.random(rows) < 0.5,
        "score": rng.random(rows).astype(np.float32),
    }


def multi(rng: np.random.Generator, rows: int) -> Arrays:
    return {
        "probabilities": rng.random((rows, 3)).astype(np.float32),
        "logits": rng.standard_normal((rows, 2)),
        "label": rng.integers(0, 2, (rows, 1)),
    }


def mismatched(rng: np.random.Generator, rows: list[int]) -> tuple[list[Arrays], list[Arrays]]:
    # every third primary answers two columns where the shadow answers one: skipped
    primaries = [scores(rng, r, 2 if i % 3 == 0 else 1) for i, r in enumerate(rows)]
    return primaries, [scores(rng, r, 1) for r in rows]


def mixed_dtypes(rng: np.random.Generator, rows: list[int]) -> tuple[list[Arrays], list[Arrays]]:
    # a primary reloaded between requests may answer another dtype
    primaries = [scores(rng, r, 1, np.float64 if i % 2 else np.float32) for i, r in enumerate(rows)]
    return primaries, [scores(rng, r, 1) for r in rows]


def strings(rng: np.random.Generator, rows: list[int]) -> tuple[list[Arrays], list[Arrays]]:
    def make(r: int) -> Arrays:
        return {**scores(rng, r, 1), "name": np.array(["x"] * r, dtype=object).reshape(r, 1)}

    return [make(r) for r in rows], [make(r) for r in rows]


def missing(rng: np.random.Generator, rows: list[int]) -> tuple[list[Arrays], list[Arrays]]:
    primaries = [{**scores(rng, r, 1), "extra": rng.random((r, 2))} for r in rows]
    return primaries, [scores(rng, r, 1) for r in rows]


def large(rng: np.random.Generator, rows: int) -> Arrays:
    # more elements per request than numpy's reduction buffer (8192)
    return {"embedding": rng.standard_normal((rows, 5000)).astype(np.float32)}


CASES: dict[str, Case] = {
    "single score": pairs(lambda rng, r: scores(rng, r, 1)),
    "multi-column": pairs(lambda rng, r: scores(rng, r, 4)),
    "integer and boolean labels, 1-D scores": pairs(labels),
    "several outputs and dtypes": pairs(multi),
    "shape mismatches skipped": mismatched,
    "primary dtypes differ": mixed_dtypes,
    "string outputs skipped": strings,
    "output missing from the shadow": missing,
    "large outputs": pairs(large),
}
ROWS = {
    "one request": [1],
    "one row each": [1] * 37,
    "varied rows": [1, 3, 2, 1, 5, 1, 1, 4],
    "empty requests": [1, 0, 2, 0, 1],
}


@pytest.mark.parametrize("rows", list(ROWS.values()), ids=list(ROWS))
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_adding_a_group_gives_the_totals_of_adding_each_request(
    case: Case, rows: list[int]
) -> None:
    rng = np.random.default_rng(11)
    primaries, shadows = case(rng, rows)
    each = Divergence()
    for primary, shadow in zip(primaries, shadows, strict=True):
        each.add(primary, shadow)
    merged = {name: np.concatenate([s[name] for s in shadows]) for name in shadows[0]}
    group = Divergence()
    group.add_merged(primaries, merged, rows)
    assert group == each  # floats included: bit for bit
    assert group.requests == len(rows)


def test_mean_and_disagreement_match_numpy() -> None:
    rng = np.random.default_rng(3)
    p, s = rng.random((50, 1)).astype(np.float32), rng.random((50, 1)).astype(np.float32)
    c, d = rng.random((50, 3)), rng.random((50, 3))
    divergence = Divergence()
    divergence.add_merged(
        [{"p": p[i : i + 1], "c": c[i : i + 1]} for i in range(50)], {"p": s, "c": d}, [1] * 50
    )
    diffs = np.concatenate([np.abs(p - s.astype(np.float64)).ravel(), np.abs(c - d).ravel()])
    assert divergence.mean_abs_diff == pytest.approx(diffs.mean(), rel=1e-12)
    disagree = np.count_nonzero((p >= 0.5) != (s >= 0.5)) + np.count_nonzero(
        c.argmax(axis=1) != d.argmax(axis=1)
    )
    assert divergence.disagreement_rate == pytest.approx(disagree / 100)
    assert divergence.as_json()["requests"] == 50


def test_shadow_outputs_must_cover_every_row() -> None:
    with pytest.raises(ValueError, match="3 rows"):
        Divergence().add_merged([{"p": np.zeros((1, 1))}] * 3, {"p": np.zeros((1, 1))}, [1] * 3)
