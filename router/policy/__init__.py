"""Pure routing policy: documents, policies, hashing, bandits, statistics and guards. No I/O,
no clock, no asyncio; never imports ``router.state``, ``gateway``, starlette or redis."""
