"""What a piece of code holds on to, measured with tracemalloc.

Only allocations whose call stack passes through the given source files count: other threads of
the test process (a server an earlier test left behind, a writer thread) allocate meanwhile under
xdist. The interpreter's free lists are emptied first (a full collection clears them in CPython):
a tuple or float taken from a free list filled by an earlier test is never seen by tracemalloc,
which made the measured figure depend on what ran before (10 % low, once in CI).
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass
class Held:
    bytes: int = 0


@contextmanager
def held_by(*files: str) -> Iterator[Held]:
    """Bytes allocated and not freed inside the block by code in ``files``' call stacks."""
    ours = [tracemalloc.Filter(True, f, all_frames=True) for f in files]
    held = Held()
    gc.collect()
    tracemalloc.start(16)  # frames enough to see who called: an allocation in our call stack
    try:
        before = tracemalloc.take_snapshot().filter_traces(ours)
        yield held
        after = tracemalloc.take_snapshot().filter_traces(ours)
        held.bytes = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    finally:
        tracemalloc.stop()
