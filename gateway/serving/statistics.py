"""A version's runtime statistics at one moment (Triton's statistics extension): read from its
batcher's counters (gateway.serving.batcher.BatchStats.figures), published by each process with
its other counters (gateway.background.fleet) and added up across the processes of a view."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import orjson

# One entry per run size: [runs, seconds concatenating inputs, in the session, slicing outputs].
SizeEntry = list[float]


@dataclass(slots=True)
class Figures:
    """Counts and summed seconds since the version was loaded; ``last_ms`` is wall-clock ms of
    the latest success (0: none)."""

    succeeded: int = 0
    succeeded_s: float = 0.0
    fail: int = 0
    fail_s: float = 0.0
    queue_s: float = 0.0
    input_s: float = 0.0
    infer_s: float = 0.0
    output_s: float = 0.0
    inferences: int = 0
    executions: int = 0
    last_ms: int = 0
    unlisted: int = 0  # successful runs left out of ``sizes`` (past its cap)
    sizes: dict[int, SizeEntry] = field(default_factory=dict)

    def merge(self, other: Figures) -> Figures:
        """Both processes' figures added up (``last_ms``: the later)."""
        sizes = {rows: list(entry) for rows, entry in self.sizes.items()}
        for rows, entry in other.sizes.items():
            mine = sizes.setdefault(rows, [0, 0.0, 0.0, 0.0])
            for i, value in enumerate(entry):
                mine[i] += value
        summed = {
            f.name: getattr(self, f.name) + getattr(other, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("sizes", "last_ms")
        }
        return Figures(**summed, last_ms=max(self.last_ms, other.last_ms), sizes=sizes)

    def to_bytes(self) -> bytes:
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        doc["sizes"] = [[rows, *entry] for rows, entry in self.sizes.items()]
        return orjson.dumps(doc)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Figures:
        """What ``to_bytes`` wrote; ValueError for anything else."""
        doc: Any = orjson.loads(blob)
        if not isinstance(doc, dict):
            raise ValueError("figures: not a JSON object")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name == "sizes":
                continue
            value: Any = doc.get(f.name)
            if f.type == "float" and type(value) in (int, float):
                values[f.name] = float(value)
            elif f.type == "int" and type(value) is int:
                values[f.name] = value
            else:
                raise ValueError(f"figures: {f.name} is not a number of its kind")
        sizes: dict[int, SizeEntry] = {}
        for item in doc.get("sizes", ()):
            if (
                not isinstance(item, list)
                or len(item) != 5
                or type(item[0]) is not int
                or not all(type(v) in (int, float) for v in item[1:])
            ):
                raise ValueError("figures: a batch size entry is not [rows, runs, 3 seconds]")
            sizes[item[0]] = [float(v) for v in item[1:]]
        return cls(**values, sizes=sizes)
