"""The owner's history at the ingress: ``GET /v1/generations`` lists their generations newest first, page by page,
each with the parameters it ran with and its images' presigned URLs (full size and thumbnail). The ResultStore
reads the history (``deployments/storage/history.py``); another owner's generations are never listed.
"""

# No "from __future__ import annotations": FastAPI must see real types on the route methods.

from typing import Any

from fastapi import Query, Request
from fastapi.responses import JSONResponse
from ray.serve.handle import DeploymentHandle

from deployments.storage.history import MAX_PAGE
from serve.schemas import GenerationList

from .auth import ANONYMOUS
from .http_app import app


class HistoryRoutes:
    """The Ingress's history route and handle method: a mixin, the Ingress holds ``store`` (the ResultStore) and
    the request helper ``_principal``."""

    store: DeploymentHandle

    async def list_generations(
        self, owner: str = ANONYMOUS, cursor: str | None = None, limit: int = 20
    ) -> GenerationList:
        """``owner``'s generations, newest first; ``cursor``: the previous page's ``next_cursor``."""
        page: dict[str, Any] = await self.store.history_page.remote(owner, cursor, limit)
        return GenerationList.model_validate(page)

    @app.get("/v1/generations", response_model=GenerationList, summary="The owner's generations, newest first")
    async def http_list_generations(
        self, request: Request, cursor: str | None = None, limit: int = Query(default=20, ge=1, le=MAX_PAGE)
    ) -> JSONResponse:
        listed = await self.list_generations(self._principal(request), cursor, limit)  # type: ignore[attr-defined]
        return JSONResponse(listed.model_dump(mode="json"))
