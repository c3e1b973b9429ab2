"""The ingress's FastAPI app: one object, so that the route modules (``routes.py`` and the mixins it includes,
such as ``identities.py``) decorate the methods of the one Ingress class on it, and Ray Serve binds them all."""

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from .errors import SERVE_OVERRIDDEN, install_error_handlers
from .openapi import ERROR_RESPONSES
from .request_log import RequestLogMiddleware

API_VERSION = "1"


class IngressApp(FastAPI):
    """The FastAPI app, keeping our JSON handlers for the errors Ray Serve would answer in plain text.

    When Serve starts an ingress replica it registers its own handlers for ``BackPressureError`` and
    ``DeploymentUnavailableError`` on the app (``ray/serve/_private/replica.py``), which replace ours for those
    exact classes: a downstream deployment's full queue then reached clients as a plain-text 503 ("Request dropped
    due to backpressure") instead of our JSON ``overloaded`` with Retry-After. A handler already installed for
    one of those classes is kept."""

    def add_exception_handler(self, exc_class_or_status_code: Any, handler: Callable[..., Any]) -> None:
        if exc_class_or_status_code in SERVE_OVERRIDDEN and exc_class_or_status_code in self.exception_handlers:
            return
        super().add_exception_handler(exc_class_or_status_code, handler)


app = IngressApp(
    title="InstantID Serve",
    version=API_VERSION,
    description="Identity-preserving SDXL generation (InstantID) on Ray Serve; results in S3.",
    responses=ERROR_RESPONSES,
)
install_error_handlers(app)
app.add_middleware(RequestLogMiddleware)  # one JSON log line and one counted request per HTTP request
