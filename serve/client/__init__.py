"""A Python client of the service's HTTP API (``/v1``): :class:`InstantIDClient` (blocking) and
:class:`AsyncInstantIDClient` (asyncio), over httpx, answering with the API's own pydantic models.

- ``sync`` / ``aio``: the two clients, which only send, sleep and read streams;
- ``_core``: what they share (request bodies, photo encoding, retry decisions, answer and event parsing);
- ``models``: job and stored-generation bodies (``serve.schemas`` has the rest); ``errors``: what is raised.

Importing it loads no model stack (no torch): photos given as arrays or PIL images need numpy / Pillow, and a
progress bar needs tqdm (the ``client`` extra), each imported when used.
"""

from serve.client._core import API_KEY_ENV, IDEMPOTENCY_HEADER, RetryPolicy
from serve.client.aio import AsyncInstantIDClient
from serve.client.errors import APIError, InstantIDClientError, JobFailed, ServiceUnreachable
from serve.client.models import Generation, GenerationImage, JobEvent, JobInfo
from serve.client.sync import InstantIDClient

__all__ = [
    "API_KEY_ENV",
    "IDEMPOTENCY_HEADER",
    "APIError",
    "AsyncInstantIDClient",
    "Generation",
    "GenerationImage",
    "InstantIDClient",
    "InstantIDClientError",
    "JobEvent",
    "JobFailed",
    "JobInfo",
    "RetryPolicy",
    "ServiceUnreachable",
]
