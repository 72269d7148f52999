"""A version's task (metadata.json "task"): validated against the model's outputs with the field
named, one value per served row, labels checked; a version with a bad task fails its load."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.serving.task import MAX_REGRESSION_ABS, Task, TaskError, parse_task
from gateway.serving.types import TensorSpec
from tests.support.server import ADMIN, InProcessServer

PROBABILITY = TensorSpec("probability", "FP32", (-1, 1))
TWO_COLUMNS = TensorSpec("pair", "FP32", (-1, 2))
THREE_COLUMNS = TensorSpec("scores", "FP32", (-1, 3))
CLASS_INDEX = TensorSpec("label", "INT64", (-1,))
PRICE = TensorSpec("price", "FP64", (-1,))
TEXT = TensorSpec("text", "BYTES", (-1, 1))
OUTPUTS = (PROBABILITY, TWO_COLUMNS, THREE_COLUMNS, CLASS_INDEX, PRICE, TEXT)


def test_no_task_is_none() -> None:
    assert parse_task(None, OUTPUTS) is None


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"type": "binary", "output": "probability"}, Task("binary", "probability", 0.5, None)),
        (
            {"type": "binary", "output": "probability", "threshold": 0.3},
            Task("binary", "probability", 0.3, None),
        ),
        ({"type": "binary", "output": "pair"}, Task("binary", "pair", 0.5, 1)),
        (
            {"type": "binary", "output": "pair", "positive_index": 0},
            Task("binary", "pair", 0.5, 0),
        ),
        (
            {"type": "binary", "output": "scores", "positive_index": 2},
            Task("binary", "scores", 0.5, 2),
        ),
        (
            {"type": "multiclass", "output": "scores", "classes": 3},
            Task("multiclass", "scores", classes=3),
        ),
        (
            {"type": "multiclass", "output": "scores", "classes": ["a", "b", "c"]},
            Task("multiclass", "scores", classes=3, names=("a", "b", "c")),
        ),
        (
            {"type": "multiclass", "output": "label", "classes": 4},
            Task("multiclass", "label", classes=4, indices=True),
        ),
        ({"type": "regression", "output": "price"}, Task("regression", "price")),
    ],
)
def test_valid_tasks(raw: dict[str, Any], expected: Task) -> None:
    task = parse_task(raw, OUTPUTS)
    assert task == expected
    assert task is not None and parse_task(task.as_json(), OUTPUTS) == task


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("binary", "task:"),
        ({"type": "ranking", "output": "probability"}, "task.type:"),
        ({"output": "probability"}, "task.type:"),
        ({"type": "binary", "output": "nope"}, "task.output:"),
        ({"type": "binary", "output": ["probability"]}, "task.output:"),
        ({"type": "binary", "output": "text"}, "task.output:"),
        ({"type": "binary", "output": "probability", "threshold": 1.5}, "task.threshold:"),
        ({"type": "binary", "output": "probability", "threshold": "0.5"}, "task.threshold:"),
        ({"type": "binary", "output": "probability", "threshold": True}, "task.threshold:"),
        ({"type": "binary", "output": "pair", "positive_index": 2}, "task.positive_index:"),
        ({"type": "binary", "output": "pair", "positive_index": -1}, "task.positive_index:"),
        ({"type": "binary", "output": "pair", "positive_index": 1.0}, "task.positive_index:"),
        ({"type": "binary", "output": "scores"}, "task.positive_index: required"),
        ({"type": "binary", "output": "pair", "positive_index": 0, "classes": 2}, "task."),
        ({"type": "binary", "output": "price", "positive_index": 0}, "task.positive_index:"),
        ({"type": "binary", "output": "pair", "extra": 1}, "task.'extra':"),
        ({"type": "multiclass", "output": "scores"}, "task.classes:"),
        ({"type": "multiclass", "output": "scores", "classes": 1}, "task.classes:"),
        ({"type": "multiclass", "output": "scores", "classes": 10**6}, "task.classes:"),
        ({"type": "multiclass", "output": "scores", "classes": 4}, "task.classes:"),
        ({"type": "multiclass", "output": "scores", "classes": ["a", "a", "b"]}, "task.classes:"),
        ({"type": "multiclass", "output": "scores", "classes": ["a", 1, "b"]}, "task.classes:"),
        ({"type": "multiclass", "output": "price", "classes": 3}, "task.output:"),
        ({"type": "regression", "output": "scores"}, "task.output:"),
        ({"type": "regression", "output": "price", "threshold": 0.5}, "task.'threshold':"),
    ],
)
def test_invalid_tasks_name_the_field(raw: Any, field: str) -> None:
    with pytest.raises(TaskError) as caught:
        parse_task(raw, OUTPUTS)
    assert str(caught.value).startswith(field), str(caught.value)


def test_values_one_per_row() -> None:
    binary = Task("binary", "probability")
    column = Task("binary", "scores", positive_index=1)
    multi = Task("multiclass", "scores", classes=3)
    index = Task("multiclass", "label", classes=4, indices=True)
    regression = Task("regression", "price")
    outputs = {
        "probability": np.array([[0.2], [0.9]], np.float32),
        "scores": np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]], np.float32),
        "label": np.array([3, 1], np.int64),
        "price": np.array([10.5, -2.0]),
    }
    np.testing.assert_allclose(binary.values(outputs), [0.2, 0.9])  # type: ignore[arg-type]
    np.testing.assert_array_equal(multi.values(outputs), [1, 0])  # type: ignore[arg-type]
    np.testing.assert_array_equal(index.values(outputs), [3, 1])  # type: ignore[arg-type]
    np.testing.assert_array_equal(regression.values(outputs), [10.5, -2.0])  # type: ignore[arg-type]
    np.testing.assert_allclose(column.values(outputs), [0.7, 0.2])  # type: ignore[arg-type]
    # not asked for, or not shaped as declared: nothing
    assert binary.values({}) is None
    assert multi.values({"scores": np.zeros((2, 4), np.float32)}) is None
    assert binary.values({"probability": np.zeros((2, 2), np.float32)}) is None
    assert column.values({"scores": np.zeros((2, 1), np.float32)}) is None


@pytest.mark.parametrize(
    ("task", "good", "bad"),
    [
        (Task("binary", "p"), [(0, 0.0), (1, 1.0), (True, 1.0), (False, 0.0), (1.0, 1.0)],
         [2, -1, 0.5, "1", None, [1], {"a": 1}, math.nan, math.inf]),
        (Task("multiclass", "s", classes=3, names=("cat", "dog", "eel")),
         [(0, 0.0), (2, 2.0), ("dog", 1.0), (1.0, 1.0)],
         [3, -1, 1.5, "cow", True, None, "0", 10**30]),
        (Task("multiclass", "s", classes=3), [(1, 1.0)], ["1", "a"]),
        (Task("regression", "p"),
         [(0, 0.0), (-3.5, -3.5), (MAX_REGRESSION_ABS, MAX_REGRESSION_ABS)],
         [math.nan, math.inf, -math.inf, 1e308, 10**400, "1", None, True, [1.0]]),
    ],
)  # fmt: skip
def test_labels_are_checked_by_the_task(task: Task, good: list[Any], bad: list[Any]) -> None:
    for raw, value in good:
        assert task.label(raw) == value
    for raw in bad:
        with pytest.raises(TaskError):
            task.label(raw)


def test_a_version_with_an_invalid_task_fails_its_load(demo_repo: Path, tmp_path: Path) -> None:
    root = tmp_path / "models"
    shutil.copytree(demo_repo / "fraud", root / "fraud")
    metadata_path = root / "fraud" / "2" / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["task"] = {"type": "binary", "output": "score"}
    metadata_path.write_text(json.dumps(metadata))
    with InProcessServer(root) as s:
        index = httpx.post(s.url + "/v2/repository/index", json={}, headers=ADMIN).json()
        states = {e["version"]: (e["state"], e["reason"]) for e in index}
        assert states["1"] == ("READY", "")
        state, reason = states["2"]
        assert state == "FAILED"
        assert reason.startswith("metadata.json: task.output: the name of one of the model's")
        meta = httpx.get(s.url + "/v2/models/fraud/versions/1").json()
        assert meta["turnout"]["metadata"]["task"] == {
            "type": "binary",
            "output": "probability",
            "threshold": 0.5,
        }
