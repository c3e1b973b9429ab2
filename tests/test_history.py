"""An owner's history (``GET /v1/generations``): newest first, page by page, only their own, with thumbnails, and
forgotten with the generation; on a real SeaweedFS, and over HTTP on the local stack."""

from __future__ import annotations

import hashlib
import io
import urllib.request
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
from PIL import Image

from deployments.instantid.errors import InstantIDError
from deployments.storage.generations import GenerationStore, new_generation_id
from deployments.storage.history import THUMBNAIL_PX, GenerationHistory, history_key, thumbnail, thumbnail_name
from deployments.storage.s3 import S3Settings
from serve.tools.seaweed import EmbeddedS3
from tests.support import FAST_REQUEST, astronaut_b64


@pytest.fixture
def history(embedded_s3: EmbeddedS3, request: pytest.FixtureRequest) -> GenerationHistory:
    prefix = "history-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    settings = embedded_s3.settings(prefix=prefix)
    store = GenerationStore(embedded_s3.client(settings), settings)
    store.ensure_bucket()
    return GenerationHistory(store)


def store_generation(history: GenerationHistory, owner: str, minutes_ago: int) -> str:
    """One generation of ``owner``, made ``minutes_ago``, stored as the ResultStore stores one (thumbnail, marker)."""
    generation_id = new_generation_id(datetime.now(timezone.utc) - timedelta(minutes=minutes_ago))
    rgb = np.random.default_rng(minutes_ago).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    prepared = history.store.prepare(
        generation_id,
        [rgb],
        "png",
        95,
        {"owner": owner, "created_at": "x", "parameters": {"prompt": f"p{minutes_ago}"}},
        [(thumbnail_name(0), thumbnail(rgb), "image/webp")],
        markers=[history.marker(owner, generation_id)],
    )
    history.store.upload(prepared)
    return generation_id


@pytest.mark.slow
def test_an_owner_lists_their_own_generations_newest_first_page_by_page(history) -> None:
    made = [store_generation(history, "alice", minutes) for minutes in (30, 10, 20)]
    theirs = store_generation(history, "bob", 5)
    first = history.page("alice", None, 2)
    assert [entry["id"] for entry in first["generations"]] == [made[1], made[2]]  # 10 and 20 minutes ago
    assert first["next_cursor"] is not None
    second = history.page("alice", first["next_cursor"], 2)
    assert [entry["id"] for entry in second["generations"]] == [made[0]] and second["next_cursor"] is None
    assert [entry["id"] for entry in history.page("bob", None, 10)["generations"]] == [theirs]
    assert history.page("carol", None, 10) == {"generations": [], "next_cursor": None}
    entry = first["generations"][0]
    assert entry["parameters"] == {"prompt": "p10"}
    (image,) = entry["images"]
    assert (image["width"], image["height"]) == (400, 300)
    with urllib.request.urlopen(image["thumbnail_url"], timeout=10) as response:  # presigned: no credentials
        small = Image.open(io.BytesIO(response.read()))
    assert small.format == "WEBP" and max(small.size) == THUMBNAIL_PX and small.size == (256, 192)


@pytest.mark.slow
def test_a_forgotten_or_vanished_generation_leaves_the_history(history) -> None:
    kept, forgotten, vanished = (store_generation(history, "alice", minutes) for minutes in (3, 2, 1))
    history.store.delete(forgotten)
    history.forget("alice", forgotten)
    history.store.delete(vanished)  # its objects expired, its marker stayed: the listing skips and removes it
    assert [entry["id"] for entry in history.page("alice", None, 10)["generations"]] == [kept]
    client, bucket = history.store.client, history.settings.bucket
    markers = client.list_objects_v2(Bucket=bucket, Prefix=f"{history.settings.prefix}/history/")
    assert [item["Key"] for item in markers["Contents"]] == [history.marker("alice", kept)]


def test_owner_names_never_appear_in_keys_and_bad_cursors_are_422() -> None:
    """Checked before any S3 call (the store here has no client)."""
    history = GenerationHistory(GenerationStore(None, S3Settings(bucket="history")))
    key = history_key("p", "alice@example.com", "20260101T000000Z-0123456789abcdef")
    assert "alice" not in key and key.endswith("-20260101T000000Z-0123456789abcdef")
    for cursor in ("../other", "x" * 30, "00000000000001-not-an-id"):
        with pytest.raises(InstantIDError, match="cursor") as caught:
            history.page("alice", cursor, 10)
        assert caught.value.status == 422


@pytest.mark.slow
def test_the_history_over_http_lists_a_generation_until_it_is_deleted(serve_stack) -> None:
    body = {**FAST_REQUEST, "face_image_b64": astronaut_b64(), "output_format": "png"}
    made = httpx.post(f"{serve_stack.url}/v1/generate", json=body, timeout=180)
    assert made.status_code == 200, made.text
    listed = httpx.get(f"{serve_stack.url}/v1/generations", params={"limit": 100}, timeout=30)
    assert listed.status_code == 200, listed.text
    entry = next(e for e in listed.json()["generations"] if e["id"] == made.json()["id"])
    assert entry["parameters"]["seed"] == made.json()["seed"]
    thumb = httpx.get(entry["images"][0]["thumbnail_url"], timeout=30)
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).format == "WEBP"
    assert httpx.delete(f"{serve_stack.url}/v1/generations/{entry['id']}", timeout=30).status_code == 204
    after = httpx.get(f"{serve_stack.url}/v1/generations", params={"limit": 100}, timeout=30).json()
    assert entry["id"] not in [e["id"] for e in after["generations"]]
    bad = httpx.get(f"{serve_stack.url}/v1/generations", params={"cursor": "../x"}, timeout=30)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_parameter"
