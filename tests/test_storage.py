"""deployments.storage against a real S3 (the session's SeaweedFS): settings, ids, the generation store,
presigned URLs, prefix downloads, and bounded failure when S3 is down."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from PIL import Image
from pydantic import ValidationError

from deployments.instantid.errors import InstantIDError
from deployments.storage import (
    GenerationNotFound,
    GenerationStore,
    S3Settings,
    StorageError,
    StoredGeneration,
    download_prefix,
    encode_image,
    generation_prefix,
    make_client,
    new_generation_id,
    parse_s3_uri,
    validate_generation_id,
)
from deployments.storage.s3 import COMPLETE_MARKER, safe_relative_path
from serve.tools.seaweed import EmbeddedS3

pytestmark = pytest.mark.slow

RNG = np.random.default_rng(1234)


def _noise(height: int = 48, width: int = 64) -> np.ndarray:
    return RNG.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _smooth(height: int = 64, width: int = 96) -> np.ndarray:
    """A gradient: lossy codecs reproduce it closely, unlike noise."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1).astype(np.uint8)


def _keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def write(store: GenerationStore, generation_id: str, images, fmt, quality: int, meta: dict) -> StoredGeneration:
    """What the ResultStore does with a generation: encode it (``prepare``), then upload and confirm it."""
    return store.upload(store.prepare(generation_id, images, fmt, quality, meta))


@pytest.fixture
def store(embedded_s3: EmbeddedS3, request: pytest.FixtureRequest) -> GenerationStore:
    """A store under a prefix of its own, so tests sharing the session store never see each other."""
    prefix = "results-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10]
    settings = embedded_s3.settings(prefix=prefix)
    store = GenerationStore(embedded_s3.client(settings), settings)
    store.ensure_bucket()
    return store


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------ settings / ids


def test_settings_validation() -> None:
    S3Settings(bucket="my-bucket.v2", prefix="a/b_c/d-1.x")
    for bad in ("ab", "A-bucket", "bucket_", "-bucket", "a..b", "192.168.0.1", "x" * 64, "xn--bucket"):
        with pytest.raises(ValidationError):
            S3Settings(bucket=bad)
    for bad_prefix in ("", "/gen", "gen/", "a//b", "a/../b", "a b", "gén"):
        with pytest.raises(ValidationError):
            S3Settings(bucket="bucket", prefix=bad_prefix)
    with pytest.raises(ValidationError):
        S3Settings(bucket="bucket", presign_expiry_s=7 * 24 * 3600 + 1)
    with pytest.raises(ValidationError):
        S3Settings(bucket="bucket", max_attempts=0)
    with pytest.raises(ValidationError):
        S3Settings(bucket="bucket", aws_secret_access_key="x")  # extra="forbid": no secrets in settings
    settings = S3Settings(bucket="bucket")
    with pytest.raises(ValidationError):
        settings.bucket = "other"  # frozen


def test_client_config_is_bounded() -> None:
    client = make_client(S3Settings(bucket="bucket", endpoint_url="http://127.0.0.1:9", max_attempts=2))
    config = client.meta.config
    assert config.connect_timeout == 2.0 and config.read_timeout == 10.0
    assert config.retries["mode"] == "standard" and config.retries["total_max_attempts"] == 2
    assert config.s3["addressing_style"] == "path" and config.signature_version == "s3v4"


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("http://bucket/a", "s3://", "s3:///a", "s3://B/a", "bucket/a", "s3://bucket/a//b"):
        with pytest.raises(ValueError):
            parse_s3_uri(bad)


def test_generation_ids() -> None:
    when = datetime(2025, 3, 7, 9, 8, 7, tzinfo=timezone.utc)
    gid = new_generation_id(when)
    assert gid.startswith("20250307T090807Z-") and len(gid) == 33
    assert validate_generation_id(gid) == gid
    assert generation_prefix("gen", gid) == f"gen/2025/03/07/{gid}"
    assert sorted([new_generation_id(datetime(2026, 1, 1, tzinfo=timezone.utc)), gid])[0] == gid
    assert new_generation_id() != new_generation_id()
    for bad in (
        "",
        "../../etc/passwd",
        gid.upper(),
        gid + "0",
        gid + "\n",
        gid.replace("-", "/"),
        "20251340T000000Z-0123456789abcdef",  # not a real date
        "20250101T000000Z-0123456789abcdeg",
    ):
        with pytest.raises(ValueError):
            validate_generation_id(bad)


def test_invalid_ids_never_reach_s3(store: GenerationStore) -> None:
    for bad in ("../x", "20250101T000000Z-../../../../x", "a" * 33):
        with pytest.raises(ValueError):
            store.read(bad)
        with pytest.raises(ValueError):
            store.delete(bad)
        with pytest.raises(ValueError):
            write(store, bad, [_noise()], "png", 90, {})


def test_encode_image_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4), np.uint8), "png", 90)
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32), "png", 90)
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "jpeg", 0)
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "gif", 90)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------- the store


def test_write_layout_content_types_and_meta(store: GenerationStore) -> None:
    gid = new_generation_id()
    images = [_noise(), _noise()]
    meta_in = {"prompt": "a snowman ☃", "seed": np.int64(42), "guidance": np.float32(5.0), "images": "ignored"}
    stored = write(store, gid, images, "png", 95, meta_in)

    base = generation_prefix(store.settings.prefix, gid)
    day = gid[:4] + "/" + gid[4:6] + "/" + gid[6:8]
    assert base == f"{store.settings.prefix}/{day}/{gid}"
    expected = [f"{base}/image-0.png", f"{base}/image-1.png", f"{base}/meta.json"]
    assert _keys(store.client, store.settings.bucket, store.settings.prefix + "/") == expected
    assert stored.id == gid and stored.meta_key == f"{base}/meta.json"
    assert [img.key for img in stored.images] == expected[:2]

    bucket = store.settings.bucket
    recorded = {record["key"]: record for record in store.read(gid)["images"]}
    for img, array in zip(stored.images, images, strict=True):
        head = store.client.head_object(Bucket=bucket, Key=img.key)
        assert head["ContentType"] == "image/png" == img.content_type
        assert head["ContentLength"] == img.bytes
        assert img.uri == f"s3://{bucket}/{img.key}"
        assert (img.width, img.height) == (64, 48)
        data = store.client.get_object(Bucket=bucket, Key=img.key)["Body"].read()
        assert hashlib.sha256(data).hexdigest() == recorded[img.key]["sha256"]  # meta.json's integrity record
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), array)

    meta_obj = store.client.get_object(Bucket=bucket, Key=stored.meta_key)
    assert meta_obj["ContentType"] == "application/json"
    raw = meta_obj["Body"].read()
    meta = json.loads(raw.decode("utf-8"))
    assert raw == json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")  # sorted keys, UTF-8
    assert meta["prompt"] == "a snowman ☃" and meta["seed"] == 42 and meta["guidance"] == 5.0
    assert meta["id"] == gid
    assert [r["key"] for r in meta["images"]] == expected[:2]
    assert meta["images"][0] == {
        "key": stored.images[0].key,
        "bytes": stored.images[0].bytes,
        "sha256": hashlib.sha256(
            store.client.get_object(Bucket=bucket, Key=stored.images[0].key)["Body"].read()
        ).hexdigest(),
        "content_type": "image/png",
        "width": 64,
        "height": 48,
        "identity_similarity": None,  # no score given to this store call
    }
    assert store.read(gid) == meta
    again = store.get(gid)
    assert [i.key for i in again.images] == [i.key for i in stored.images]


@pytest.mark.parametrize(
    ("fmt", "ext", "content_type"), [("jpeg", "jpg", "image/jpeg"), ("webp", "webp", "image/webp")]
)
def test_lossy_formats_round_trip_closely(store: GenerationStore, fmt: str, ext: str, content_type: str) -> None:
    gid = new_generation_id()
    array = _smooth()
    stored = write(store, gid, [array], fmt, 92, {})  # type: ignore[arg-type]
    img = stored.images[0]
    assert img.key.endswith(f"/image-0.{ext}") and img.content_type == content_type
    head = store.client.head_object(Bucket=store.settings.bucket, Key=img.key)
    assert head["ContentType"] == content_type
    data = store.client.get_object(Bucket=store.settings.bucket, Key=img.key)["Body"].read()
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
    assert decoded.shape == array.shape
    assert np.abs(decoded - array).mean() < 3.0


def test_presigned_url_serves_the_bytes(store: GenerationStore) -> None:
    stored = write(store, new_generation_id(), [_noise()], "png", 90, {})
    img = stored.images[0]
    with urllib.request.urlopen(img.url, timeout=5) as response:
        body = response.read()
        assert response.headers["Content-Type"] == "image/png"
    assert body == store.client.get_object(Bucket=store.settings.bucket, Key=img.key)["Body"].read()
    assert f"X-Amz-Expires={store.settings.presign_expiry_s}" in img.url
    tampered = img.url.replace("X-Amz-Signature=", "X-Amz-Signature=0")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(tampered, timeout=5)
    assert info.value.code == 403
    with pytest.raises(ValueError):
        store.presign("other-prefix/secret.txt")


def test_read_unknown_generation_is_not_found(store: GenerationStore) -> None:
    with pytest.raises(GenerationNotFound) as info:
        store.read(new_generation_id())
    assert isinstance(info.value, KeyError) and isinstance(info.value, InstantIDError)
    assert info.value.status == 404 and info.value.code == "not_found"


def test_delete_removes_everything(store: GenerationStore) -> None:
    keep = write(store, new_generation_id(), [_noise()], "png", 90, {})
    gid = new_generation_id()
    write(store, gid, [_noise(), _noise(), _noise()], "webp", 80, {"k": 1})
    assert store.delete(gid) == 4
    prefix = generation_prefix(store.settings.prefix, gid) + "/"
    assert _keys(store.client, store.settings.bucket, prefix) == []
    with pytest.raises(GenerationNotFound):
        store.read(gid)
    assert store.delete(gid) == 0
    assert store.read(keep.id)["id"] == keep.id  # a neighbour is untouched


class _FailOnMeta:
    """Delegates to a real client but fails the meta.json upload with ``error``."""

    def __init__(self, client: Any, error: Exception) -> None:
        self._client = client
        self._error = error

    def put_object(self, **kwargs: Any) -> Any:
        if kwargs["Key"].endswith("/meta.json"):
            raise self._error
        return self._client.put_object(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def test_failed_write_cleans_up_and_raises_storage_error(store: GenerationStore) -> None:
    """S3 answered with an error: the images already written are deleted, so nothing of the generation is left."""
    refused = ClientError({"Error": {"Code": "InternalError", "Message": "simulated"}}, "PutObject")
    broken = GenerationStore(_FailOnMeta(store.client, refused), store.settings)
    gid = new_generation_id()
    with pytest.raises(StorageError) as info:
        write(broken, gid, [_noise(), _noise()], "png", 90, {})
    assert info.value.status == 503 and info.value.code == "storage_unavailable"
    prefix = generation_prefix(store.settings.prefix, gid) + "/"
    assert _keys(store.client, store.settings.bucket, prefix) == []


def test_unreachable_s3_fails_fast_and_leaves_no_meta(store: GenerationStore) -> None:
    """S3 could not be reached: no delete is attempted (it would only wait out the same timeouts before the 503),
    and without meta.json no route shows the images written before the failure."""
    lost = EndpointConnectionError(endpoint_url="http://simulated")
    broken = GenerationStore(_FailOnMeta(store.client, lost), store.settings)
    deletes: list[Any] = []
    broken.client.delete_object = lambda **kwargs: deletes.append(kwargs)  # type: ignore[method-assign]
    gid = new_generation_id()
    with pytest.raises(StorageError) as info:
        write(broken, gid, [_noise(), _noise()], "png", 90, {})
    assert info.value.status == 503 and info.value.code == "storage_unavailable"
    assert deletes == []
    prefix = generation_prefix(store.settings.prefix, gid) + "/"
    assert [key.rsplit("/", 1)[1] for key in _keys(store.client, store.settings.bucket, prefix)] == [
        "image-0.png",
        "image-1.png",
    ]
    with pytest.raises(GenerationNotFound):
        store.read(gid)


def test_unserialisable_meta_fails_before_upload(store: GenerationStore) -> None:
    gid = new_generation_id()
    with pytest.raises(TypeError):
        write(store, gid, [_noise()], "png", 90, {"bad": object()})
    with pytest.raises(ValueError):
        write(store, gid, [_noise()], "png", 90, {"bad": float("nan")})
    assert _keys(store.client, store.settings.bucket, generation_prefix(store.settings.prefix, gid)) == []


def test_unreachable_s3_fails_fast_with_storage_error() -> None:
    """A closed port: bounded timeouts and retries turn into a 503 within seconds, not minutes."""
    settings = S3Settings(bucket="bucket", endpoint_url=f"http://127.0.0.1:{_closed_port()}")
    session = boto3.session.Session(aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x" * 40)
    store = GenerationStore(make_client(settings, session=session), settings)
    t0 = time.monotonic()
    with pytest.raises(StorageError):
        write(store, new_generation_id(), [_noise()], "png", 90, {})
    with pytest.raises(StorageError):
        store.read(new_generation_id())
    with pytest.raises(StorageError) as info:
        store.ensure_bucket()
    elapsed = time.monotonic() - t0
    assert isinstance(info.value.__cause__, EndpointConnectionError)  # it really tried the port
    assert elapsed < 30, f"failing took {elapsed:.1f} s"
    assert store.presign(f"{settings.prefix}/x.png").startswith(settings.endpoint_url or "")  # signing is local


def test_silent_s3_times_out_with_storage_error() -> None:
    """A server that accepts connections and never answers: the read timeout bounds each attempt."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        settings = S3Settings(
            bucket="bucket",
            endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}",
            read_timeout_s=0.5,
            max_attempts=2,
        )
        session = boto3.session.Session(aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x" * 40)
        store = GenerationStore(make_client(settings, session=session), settings)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as info:
            store.read(new_generation_id())
        elapsed = time.monotonic() - t0
    assert isinstance(info.value.__cause__, ReadTimeoutError)
    assert elapsed < 15, f"failing took {elapsed:.1f} s"


def test_ensure_bucket_creates_only_when_asked(embedded_s3: EmbeddedS3) -> None:
    name = "created-" + new_generation_id()[-8:]
    no_create = embedded_s3.settings().model_copy(update={"bucket": name, "create_bucket": False})
    with pytest.raises(StorageError):
        GenerationStore(embedded_s3.client(no_create), no_create).ensure_bucket()
    create = no_create.model_copy(update={"create_bucket": True})
    GenerationStore(embedded_s3.client(create), create).ensure_bucket()
    GenerationStore(embedded_s3.client(create), create).ensure_bucket()  # idempotent
    assert name in [b["Name"] for b in embedded_s3.client().list_buckets()["Buckets"]]


# ------------------------------------------------------------------------------------ download_prefix


class _CountingClient:
    """Delegates to a real client, counting object downloads."""

    def __init__(self, client: Any, extra_keys: tuple[str, ...] = ()) -> None:
        self._client = client
        self.gets = 0
        self._extra_keys = extra_keys

    def get_object(self, **kwargs: Any) -> Any:
        self.gets += 1
        return self._client.get_object(**kwargs)

    def get_paginator(self, name: str) -> Any:
        real = self._client.get_paginator(name)
        extra = self._extra_keys

        class _Paginator:
            def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
                yield from real.paginate(**kwargs)
                if extra:  # keys SeaweedFS refuses to store but AWS S3 accepts
                    yield {"Contents": [{"Key": k, "ETag": '"x"', "Size": 1} for k in extra]}

        return _Paginator()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


@pytest.fixture
def weights_prefix(embedded_s3: EmbeddedS3, request: pytest.FixtureRequest) -> tuple[Any, str, str]:
    client = embedded_s3.client()
    prefix = "weights-" + hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:10] + "/v1"
    files = {"config.json": b'{"a": 1}', "unet/model.bin": b"\x00\x01" * 5000, "unet/deep/x.txt": b"x"}
    for rel, data in files.items():
        client.put_object(Bucket=embedded_s3.bucket, Key=f"{prefix}/{rel}", Body=data)
    # A sibling prefix sharing the same leading characters must not be copied.
    client.put_object(Bucket=embedded_s3.bucket, Key=f"{prefix}0/other.txt", Body=b"no")
    return client, f"s3://{embedded_s3.bucket}/{prefix}/", prefix


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_download_prefix_copies_skips_and_refreshes(weights_prefix: tuple[Any, str, str], tmp_path: Path) -> None:
    client, uri, prefix = weights_prefix
    counting = _CountingClient(client)
    dest = tmp_path / "cache" / "weights"
    assert download_prefix(counting, uri, dest) == dest.absolute()
    tree = _tree(dest)
    marker = json.loads(tree.pop(COMPLETE_MARKER))
    assert tree == {"config.json": b'{"a": 1}', "unet/model.bin": b"\x00\x01" * 5000, "unet/deep/x.txt": b"x"}
    assert [o["key"].rsplit("/v1/", 1)[1] for o in marker["objects"]] == sorted(tree)
    assert marker["objects"] and all(
        o["etag"] and o["size"] == len(tree[o["key"].rsplit("/v1/", 1)[1]]) for o in marker["objects"]
    )
    assert counting.gets == 3
    assert sorted(p.name for p in dest.parent.iterdir()) == [".weights.lock", "weights"]

    inode = dest.stat().st_ino
    download_prefix(counting, uri, dest)
    assert counting.gets == 3 and dest.stat().st_ino == inode  # unchanged prefix: nothing fetched

    bucket = parse_s3_uri(uri)[0]
    client.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=b'{"a": 2}')
    download_prefix(counting, uri, dest)
    assert counting.gets == 6
    assert (dest / "config.json").read_bytes() == b'{"a": 2}'
    assert sorted(p.name for p in dest.parent.iterdir()) == [".weights.lock", "weights"]  # no temp leftovers


def test_download_prefix_copies_only_matching_objects(weights_prefix: tuple[Any, str, str], tmp_path: Path) -> None:
    client, uri, _ = weights_prefix
    counting = _CountingClient(client)
    dest = download_prefix(counting, uri, tmp_path / "unet-only", patterns=("unet/*.bin", "config.json"))
    tree = _tree(dest)
    marker = json.loads(tree.pop(COMPLETE_MARKER))
    assert tree == {"config.json": b'{"a": 1}', "unet/model.bin": b"\x00\x01" * 5000}  # not unet/deep/x.txt
    assert counting.gets == 2 and len(marker["objects"]) == 2
    download_prefix(counting, uri, dest, patterns=("unet/*.bin", "config.json"))
    assert counting.gets == 2  # the same selection is complete: nothing fetched
    with pytest.raises(FileNotFoundError, match="match vae/"):
        download_prefix(counting, uri, tmp_path / "none", patterns=("vae/*",))
    assert not (tmp_path / "none").exists()


def test_download_prefix_never_trusts_a_half_copy(weights_prefix: tuple[Any, str, str], tmp_path: Path) -> None:
    client, uri, _ = weights_prefix
    dest = tmp_path / "weights"
    (dest / "unet").mkdir(parents=True)
    (dest / "unet" / "model.bin").write_bytes(b"truncated")  # an interrupted copy without a marker
    (tmp_path / ".weights.tmp-dead").mkdir()  # a crashed run's temp folder
    download_prefix(client, uri, dest)
    assert (dest / "unet" / "model.bin").read_bytes() == b"\x00\x01" * 5000
    assert (dest / COMPLETE_MARKER).is_file()
    assert not (tmp_path / ".weights.tmp-dead").exists()


def test_download_prefix_refuses_escaping_keys(weights_prefix: tuple[Any, str, str], tmp_path: Path) -> None:
    client, uri, prefix = weights_prefix
    for evil in ("../../outside.txt", "a/../../outside.txt", "/etc/passwd", "a//b", ".complete"):
        hostile = _CountingClient(client, extra_keys=(f"{prefix}/{evil}",))
        with pytest.raises(ValueError, match="refusing"):
            download_prefix(hostile, uri, tmp_path / "dest")
        assert hostile.gets == 0  # refused before any byte was fetched
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with pytest.raises(ValueError):
        safe_relative_path("p/..", "p")


def test_download_prefix_empty_prefix_is_an_error(embedded_s3: EmbeddedS3, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        download_prefix(embedded_s3.client(), f"s3://{embedded_s3.bucket}/nothing-here/", tmp_path / "d")
