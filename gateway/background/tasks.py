"""Helpers of the background loops: stopping one within a bound, naming a lease holder."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid

log = logging.getLogger("turnout.tasks")


async def stop_task(task: asyncio.Task[None] | None, *, timeout_s: float = 5.0) -> None:
    """Cancel ``task`` and wait until it ends, at most ``timeout_s``. The cancellation is repeated
    every 0.1 s: a cancellation that arrives in the middle of a command can be swallowed
    (redis-py has done so), and a loop that survived it would otherwise hold shutdown forever."""
    if task is None:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        left = deadline - loop.time()
        if left <= 0:
            log.error("%s did not stop within %s s; leaving it", task.get_name(), timeout_s)
            return
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.1, left))
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended with an error", task.get_name(), exc_info=task.exception())


def holder_id() -> str:
    """This process's name for a lease it takes (``StateStore.acquire_lease``): host, pid and a
    random part, so two components or two restarts never pass for one holder."""
    return f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
