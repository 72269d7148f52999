"""The serving engine: model versions loaded, batched and run. Imports no starlette, no HTTP
module and nothing of ``router``; errors are raised from ``gateway.errors``."""
