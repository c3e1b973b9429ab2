"""The ingress's FastAPI app: one object, so that the route modules (``routes.py`` and the mixins it includes,
such as ``identities.py``) decorate the methods of the one Ingress class on it, and Ray Serve binds them all."""

from fastapi import FastAPI

from .errors import install_error_handlers
from .openapi import ERROR_RESPONSES
from .request_log import RequestLogMiddleware

API_VERSION = "1"

app = FastAPI(
    title="InstantID Serve",
    version=API_VERSION,
    description="Identity-preserving SDXL generation (InstantID) on Ray Serve; results in S3.",
    responses=ERROR_RESPONSES,
)
install_error_handlers(app)
app.add_middleware(RequestLogMiddleware)  # one JSON log line and one counted request per HTTP request
