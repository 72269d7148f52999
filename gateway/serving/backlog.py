"""How many accepted requests wait for the event loop: the signal to batch rather than run
each request inline.

A light model's request is cheapest run inline on the event loop (no thread hop) when it is
alone; when others wait behind it, merging them into one run on the execution thread is
cheaper per request (measured on the light demo model at 64 connections: 0.84 of the bare
handler's requests/s inline, 0.98 merged; at one connection the thread hop put the median at
1.8 times the bare handler's, inline at 1.2). The HTTP protocol (gateway.worker) counts each
request task it starts, the app each request it begins; the difference is the requests whose
task has not run yet. Both counts only grow. Without the protocol (an ASGI test client) nothing
is counted as waiting, and every request that can runs inline.
"""

from __future__ import annotations

# The lifespan state key under which the app hands its Backlog to the HTTP protocol.
STATE_KEY = "turnout.backlog"


class Backlog:
    __slots__ = ("begun", "started")

    def __init__(self) -> None:
        self.started = 0  # request tasks the HTTP protocol started
        self.begun = 0  # requests the app began handling

    def busy(self) -> bool:
        """Whether requests wait for the event loop behind the current one."""
        return self.started > self.begun
