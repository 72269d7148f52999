"""The one exception tree. Each error carries its HTTP status; one handler in app.py maps it to
the protocol's error body ``{"error": message}``. Nothing here imports starlette."""

from __future__ import annotations


class GatewayError(Exception):
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(GatewayError):
    status = 400


class Unauthorized(GatewayError):
    status = 401


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class PreconditionFailed(GatewayError):
    status = 412


class PayloadTooLarge(GatewayError):
    status = 413


class Overloaded(GatewayError):
    status = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelError(GatewayError):
    """The model itself failed on a well-formed request (an onnxruntime error)."""

    status = 500


class NotReady(GatewayError):
    status = 503


class Timeout(GatewayError):
    status = 504
