"""Background loops stop within a bound, even when a cancellation is swallowed."""

from __future__ import annotations

import asyncio

from gateway.background.tasks import stop_task


async def _swallows_once(ticks: list[int]) -> None:
    """A loop like the fleet's publish loop whose first cancellation is lost inside a 'command',
    as redis-py has done: without a repeated cancel it would never end."""
    swallowed = False
    while True:
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True
        ticks.append(1)


def test_a_loop_that_swallows_its_cancellation_still_stops() -> None:
    async def scenario() -> bool:
        ticks: list[int] = []
        task = asyncio.create_task(_swallows_once(ticks))
        await asyncio.sleep(0.05)
        await stop_task(task, timeout_s=2.0)
        return task.done()

    assert asyncio.run(scenario())


def test_a_loop_that_never_stops_is_left_after_the_timeout() -> None:
    released = asyncio.Event()

    async def stubborn() -> None:
        while not released.is_set():
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                continue

    async def scenario() -> tuple[bool, float]:
        task = asyncio.create_task(stubborn())
        await asyncio.sleep(0.05)  # running, so that every cancellation reaches its loop
        loop = asyncio.get_running_loop()
        start = loop.time()
        await stop_task(task, timeout_s=0.3)
        waited = loop.time() - start
        done = task.done()
        released.set()  # let it end, or asyncio.run's teardown would wait on it forever
        await task
        return done, waited

    done, waited = asyncio.run(scenario())
    assert not done
    assert waited >= 0.3
