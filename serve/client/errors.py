"""What the client raises: the service's own JSON error (status, code, message, request id) kept intact, so a caller
can branch on ``code`` as the README's error table names them instead of parsing messages."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve.client.models import JobInfo


class InstantIDClientError(Exception):
    """Base of every error this client raises (never a bare ``httpx`` exception)."""


class APIError(InstantIDClientError):
    """The service answered with an error: its HTTP ``status`` and the body's ``code``, ``message`` and ``request_id``
    (``generation_id`` when the images were made but S3 failed: they are uploaded later under that id)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        generation_id: str | None = None,
        retry_after: float | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id
        self.generation_id = generation_id
        self.retry_after = retry_after
        self.body = body


class ServiceUnreachable(InstantIDClientError):
    """No answer from the service (connection refused, reset or timed out), after the retries the policy allows."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(f"{message} (after {attempts} attempt{'s' if attempts != 1 else ''})")
        self.attempts = attempts


class JobFailed(InstantIDClientError):
    """A job ended ``failed`` or ``cancelled`` while the client waited for it; ``job`` is its final body."""

    def __init__(self, job: JobInfo) -> None:
        error = job.error or {}
        self.job = job
        self.code = str(error.get("code", job.status))
        self.message = str(error.get("message", f"job {job.id} {job.status}"))
        super().__init__(f"job {job.id} {job.status}: {self.code}: {self.message}")
