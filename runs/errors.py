"""The errors a client can be told about: HTTP status plus the OpenAI error `type`, `code` and `param`."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error with an OpenAI-style envelope. gateway.errors turns it into a response in one place."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.headers = headers or {}

    def envelope(self) -> dict[str, Any]:
        """The `{"error": {...}}` body the OpenAI API returns."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(ApiError):
    """400: the request is malformed or asks for something impossible."""

    status = 400
    type = "invalid_request_error"


class Unauthorized(ApiError):
    """401: no API key, or one the gateway does not know."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class NotFound(ApiError):
    """404: the object does not exist (or is not visible to the caller)."""

    status = 404
    type = "invalid_request_error"


class Conflict(ApiError):
    """409: the request conflicts with the current state of an object."""

    status = 409
    type = "invalid_request_error"


class UnprocessableEntity(ApiError):
    """422: well-formed, but it cannot be done (e.g. an idempotency key reused with another body)."""

    status = 422
    type = "invalid_request_error"


class TooManyRequests(ApiError):
    """429: over a limit (this instance's capacity, a tenant's concurrency); retry after a while."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class PayloadTooLarge(ApiError):
    """413: the body is over the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RequestTimeout(ApiError):
    """408: the request's body did not arrive in time."""

    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class UpstreamError(ApiError):
    """502: the model provider failed before the response could start."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class Unavailable(ApiError):
    """503: the gateway cannot serve the request now (store unreachable, shutting down)."""

    status = 503
    type = "server_error"
    code = "service_unavailable"


def response_not_found(response_id: str) -> NotFound:
    """The 404 OpenAI returns for an unknown response id."""
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


class EventsLost(Conflict):
    """409: events a client has seen are no longer the stored ones. The store failed over to a replica that had
    not received them, and the response went on (or ended) with other events under their numbers: resuming after
    the client's cursor would mix two histories."""

    code = "events_lost"

    def __init__(self, response_id: str, sequence_number: int) -> None:
        super().__init__(
            f"The events of response '{response_id}' up to sequence number {sequence_number} that this client "
            "received are no longer stored: the store failed over to a replica that had not received them, and "
            "the response has since gone on differently. Read it again from its first event, or fetch it with "
            f"GET /v1/responses/{response_id}.",
            param="Last-Event-ID",
        )
