"""The HTTP surface: the only users of starlette besides ``gateway.app`` and ``gateway.cli``.
Handlers decode a request, call the serving engine and the routing table, and encode the answer;
errors map to responses in one table (``responses.HANDLERS``)."""
