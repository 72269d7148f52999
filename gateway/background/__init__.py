"""Work beside the request path, started and stopped by the app's lifespan: shadow copies,
rollout guards and the fleet's counter exchange. Imports no starlette and no HTTP module."""
