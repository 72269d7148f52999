"""Refused credentials: counted by reason (``turnout_refused_total``), logged sparingly.

Anyone can send a request without a valid credential, as fast as they like: one log line each
would let a client fill the disks and bury every other record. So each reason logs at most
``LINES_PER_WINDOW`` lines per ``WINDOW_S`` seconds; the next one says that the rest of the
window is not logged, and the first line of a later window says how many were left out. The
counter counts every refusal. Both belong to the process, as its log stream does.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable

from gateway.errors import REFUSAL_REASONS, RefusalReason

log = logging.getLogger("turnout")

LINES_PER_WINDOW = 10
WINDOW_S = 10.0


class Refusals:
    def __init__(
        self,
        lines: int = LINES_PER_WINDOW,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: Counter[RefusalReason] = Counter(dict.fromkeys(REFUSAL_REASONS, 0))
        self._lines = lines
        self._window_s = window_s
        self._clock = clock
        # reason -> (window start, refusals in the window, refusals of the last window unlogged)
        self._windows: dict[RefusalReason, tuple[float, int, int]] = {}

    def refused(self, reason: RefusalReason, line: str) -> None:
        """Count one refusal; log ``line`` (already cut) unless the reason's window is full."""
        self.counts[reason] += 1
        now = self._clock()
        start, seen, unlogged = self._windows.get(reason, (-self._window_s, 0, 0))
        if now - start >= self._window_s:
            unlogged = max(0, seen - self._lines)
            start, seen = now, 0
        seen += 1
        self._windows[reason] = (start, seen, unlogged)
        if seen == 1 and unlogged:
            log.info("%s (%d more refused for %s in the previous window, not logged)",
                     line, unlogged, reason)  # fmt: skip
        elif seen <= self._lines:
            log.info("%s", line)
        elif seen == self._lines + 1:
            log.info(
                "more than %d requests refused for %s within %.0f s: not logging them for the "
                "rest of the window (turnout_refused_total counts every one)",
                self._lines, reason, self._window_s,
            )  # fmt: skip


REFUSALS = Refusals()  # the process's
