"""S3 access shared by the result store, the weights loader and the CLI.

Why this module exists rather than calling ``boto3.client("s3")`` everywhere:

* boto3's defaults (60 s connect/read timeouts, legacy retries) make a request against a dead endpoint hang
  for minutes; a serving path must fail in seconds and report "storage unavailable" instead.
* Credentials never appear in settings, configs or logs: the standard boto3 chain (environment, profile,
  IRSA/instance role...) is the only source, so an :class:`S3Settings` can be printed or shipped freely.
* Copying a prefix to local disk must be atomic (several replicas on one node may ask for the same weights
  at once, and a crash must never leave a half-copied folder that looks usable).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import ipaddress
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # botocore builds client classes at runtime; this alias is for readers and type checkers
    from botocore.client import BaseClient as S3Client
else:
    S3Client = Any

__all__ = [
    "COMPLETE_MARKER",
    "S3Client",
    "S3Settings",
    "download_object",
    "download_prefix",
    "ensure_bucket",
    "is_access_denied",
    "is_not_found",
    "make_client",
    "parse_s3_uri",
    "safe_relative_path",
    "validate_bucket_name",
]

COMPLETE_MARKER = ".complete"
"""Name of the marker file :func:`download_prefix` writes last; a folder without it is never trusted."""

_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})


def validate_bucket_name(name: str) -> str:
    """Apply the S3 bucket naming rules so a typo fails at config load, not at the first upload.

    Rules (general-purpose buckets): 3-63 characters, lowercase letters, digits, dots and hyphens, starting
    and ending with a letter or digit, no ``..``/``.-``/``-.``, not an IPv4 address, none of the reserved
    prefixes/suffixes. Returns the name unchanged; raises ``ValueError`` with the broken rule.
    """
    if not 3 <= len(name) <= 63:
        raise ValueError(f"bucket name must be 3-63 characters, got {len(name)}")
    if not _BUCKET_RE.match(name):
        raise ValueError(
            "bucket name may contain only lowercase letters, digits, '.' and '-', "
            f"and must start and end with a letter or digit: {name!r}"
        )
    if ".." in name or ".-" in name or "-." in name:
        raise ValueError(f"bucket name must not contain '..', '.-' or '-.': {name!r}")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        raise ValueError(f"bucket name must not be an IP address: {name!r}")
    if name.startswith(("xn--", "sthree-")) or name.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3")):
        raise ValueError(f"bucket name uses a reserved prefix or suffix: {name!r}")
    return name


class S3Settings(BaseModel):
    """Where and how to talk to S3. Holds no secret on purpose (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bucket: str = Field(description="Bucket name (S3 naming rules).")
    prefix: str = Field(
        "generations", description="Key prefix for results: no leading/trailing '/', safe characters only."
    )
    identities_prefix: str = Field(
        "identities",
        description="Key prefix for saved identities, apart from the results so that a lifecycle rule expiring "
        "generations never expires a person an owner chose to keep.",
    )
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; None = AWS (or AWS_ENDPOINT_URL).")
    public_endpoint: str | None = Field(
        None,
        description="The endpoint presigned URLs name, when browsers reach S3 at another address than the service "
        "(e.g. an internal cluster name vs a public host); None: endpoint_url.",
    )
    region: str = Field("us-east-1", min_length=1)
    addressing_style: Literal["path", "virtual", "auto"] = Field(
        "path", description="'path' works with every S3-compatible store and with dotted bucket names."
    )
    connect_timeout_s: float = Field(
        2.0, gt=0, le=300, description="Per attempt: how long a connection to S3 may take to open."
    )
    read_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="Per attempt: how long S3 may take to answer on an open connection."
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=20,
        description="Total attempts per request, the first included (standard retry mode). With the two timeouts "
        "this bounds how long a stalled or unreachable S3 holds a request before its 503: max_attempts x "
        "(connect_timeout_s + read_timeout_s), 36 s with the defaults (the store's first failing call; it then "
        "spools the generation without further S3 calls).",
    )
    presign_expiry_s: int = Field(3600, ge=1, le=7 * 24 * 3600, description="SigV4 allows at most 7 days.")
    create_bucket: bool = Field(False, description="Create the bucket on start if missing (embedded store).")

    @field_validator("bucket")
    @classmethod
    def _check_bucket(cls, value: str) -> str:
        return validate_bucket_name(value)

    @field_validator("prefix", "identities_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        # Keys are built by the server only; a strict prefix keeps every key predictable and safe to log.
        if not value:
            raise ValueError("prefix must not be empty")
        if value.startswith("/") or value.endswith("/"):
            raise ValueError(f"prefix must not start or end with '/': {value!r}")
        if len(value) > 200:
            raise ValueError("prefix must be at most 200 characters")
        for segment in value.split("/"):
            if segment in ("", ".", "..") or not _PREFIX_SEGMENT_RE.match(segment):
                raise ValueError(
                    f"prefix segments may contain only letters, digits, '.', '_' and '-' "
                    f"(no empty, '.' or '..' segments): {value!r}"
                )
        return value

    @field_validator("endpoint_url", "public_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", value):
            raise ValueError(f"endpoint_url must be an http(s) URL, got {value!r}")
        return value.rstrip("/")


def make_client(settings: S3Settings, session: boto3.session.Session | None = None) -> S3Client:
    """An S3 client with bounded timeouts and retries.

    ``session`` lets a caller that owns explicit credentials (the embedded store, tests) pass them without
    touching the process environment; by default a fresh session uses the standard credential chain. A new
    session per client also avoids boto3's non-thread-safe default session.
    """
    config = Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        # ``total_max_attempts`` counts the first try, like AWS_MAX_ATTEMPTS; the legacy ``max_attempts`` key
        # would count retries only, making "3" mean four requests.
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        s3={"addressing_style": settings.addressing_style},
        signature_version="s3v4",
    )
    session = session or boto3.session.Session()
    return session.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=config)


def on_retry(client: S3Client, callback: Callable[[str], None]) -> None:
    """Call ``callback(operation name)`` each time ``client`` sends a request again after a failed attempt.

    botocore creates a new request for every attempt and numbers the attempt in the request's context; the first
    is attempt 1. Retries are otherwise invisible to the caller of a call that finally succeeded.
    """

    def created(request: Any, operation_name: str = "", **_: Any) -> None:
        if (getattr(request, "context", None) or {}).get("retries", {}).get("attempt", 1) > 1:
            callback(operation_name)

    client.meta.events.register("request-created.s3", created)


def is_not_found(exc: BaseException) -> bool:
    """True for the several shapes S3 uses to say "no such key/bucket" (HEAD has no body, so just '404')."""
    if not isinstance(exc, ClientError):
        return False
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(error.get("Code")) in _NOT_FOUND_CODES or status == 404


def is_access_denied(exc: BaseException) -> bool:
    """True when S3 refused the request for lack of permission (403)."""
    if not isinstance(exc, ClientError):
        return False
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return str(exc.response.get("Error", {}).get("Code")) in ("403", "AccessDenied", "Forbidden") or status == 403


def ensure_bucket(client: S3Client, bucket: str, *, region: str = "us-east-1", create: bool = False) -> bool:
    """Check the bucket is reachable; create it when missing and ``create`` is set.

    Returns True when it was created. Raises the botocore error otherwise, so the caller decides how to
    report it (the result store wraps it as "storage unavailable").
    """
    try:
        client.head_bucket(Bucket=bucket)
        return False
    except ClientError as exc:
        if not (create and is_not_found(exc)):
            raise
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # AWS rejects an explicit us-east-1 constraint
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise
        return False
    return True


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/some/prefix/`` into ``("bucket", "some/prefix")``.

    The prefix comes back without leading/trailing slashes ("" for the whole bucket). Raises ``ValueError``
    saying what is wrong, because these strings come from configs and command lines.
    """
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise ValueError(f"expected an s3://bucket/prefix URI, got {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise ValueError(f"S3 URI has no bucket: {uri!r}")
    try:
        validate_bucket_name(bucket)
    except ValueError as exc:
        raise ValueError(f"S3 URI {uri!r} has an invalid bucket: {exc}") from None
    if any(ch in prefix for ch in "?#\x00") or any(ch.isspace() and ch != " " for ch in prefix):
        raise ValueError(f"S3 URI prefix contains a character that is not allowed: {uri!r}")
    prefix = prefix.strip("/")
    if "//" in prefix:
        raise ValueError(f"S3 URI prefix has an empty path segment: {uri!r}")
    return bucket, prefix


def safe_relative_path(key: str, prefix: str) -> PurePosixPath:
    """The local relative path for ``key`` under ``prefix``, refusing anything that could leave ``dest``.

    S3 keys are arbitrary strings: ``a/../../etc/x`` or ``/abs`` are legal keys, so a naive join would let
    whoever can write the bucket write anywhere on the node.
    """
    rel = key[len(prefix) + 1 :] if prefix else key
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\x00" in rel or "\\" in rel or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"refusing S3 key {key!r}: its path would escape or be ambiguous under the destination")
    if parts[0] == COMPLETE_MARKER:
        raise ValueError(f"refusing S3 key {key!r}: it collides with the completion marker")
    return PurePosixPath(*parts)


def _list_objects(client: S3Client, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every object under ``prefix/`` (the slash matters: ``weights`` must not match ``weights-old``)."""
    list_prefix = f"{prefix}/" if prefix else ""
    objects: list[dict[str, Any]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=list_prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith("/") and int(item.get("Size", 0)) == 0:
                continue  # "folder" placeholder objects some tools create
            objects.append({"key": key, "etag": str(item.get("ETag", "")), "size": int(item.get("Size", 0))})
    objects.sort(key=lambda obj: obj["key"])
    return objects


def _read_marker(dest: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((dest / COMPLETE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Serialise copies of one destination across processes (two replicas on a node share the cache)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def download_prefix(client: S3Client, uri: str, dest: Path, patterns: Sequence[str] | None = None) -> Path:
    """Copy the objects under ``s3://bucket/prefix/`` into ``dest``, keeping relative paths; return ``dest``.

    ``patterns`` (fnmatch, on the path relative to the prefix) restrict the copy to matching objects, e.g.
    the text encoders of an SDXL folder; None copies everything.

    Atomic and idempotent:

    * the copy goes to a temporary sibling folder which is renamed onto ``dest`` only once every object
      is on disk with the listed size, and a ``.complete`` JSON (objects, ETags, sizes) is written first;
    * a second call lists the prefix (one request) and does nothing when the listing matches the marker;
      after a change it copies again and swaps the folders;
    * a folder without a valid marker (an interrupted copy, a hand-made folder) is never trusted;
    * keys that would land outside ``dest`` (``..``, absolute, empty segments) abort the copy before any
      byte is written.

    Raises ``FileNotFoundError`` when nothing is under the prefix (almost always a typo), ``ValueError``
    for a bad URI or key, and botocore errors for S3 failures.
    """
    bucket, prefix = parse_s3_uri(uri)
    dest = Path(dest).absolute()
    objects = _list_objects(client, bucket, prefix)
    if not objects:
        raise FileNotFoundError(f"no objects under {uri}")
    rel_paths = [safe_relative_path(obj["key"], prefix) for obj in objects]
    if patterns is not None:
        chosen = [i for i, rel in enumerate(rel_paths) if any(fnmatch.fnmatchcase(str(rel), p) for p in patterns)]
        if not chosen:
            raise FileNotFoundError(f"no objects under {uri} match {', '.join(patterns)}")
        objects, rel_paths = [objects[i] for i in chosen], [rel_paths[i] for i in chosen]
    return _copy_objects(client, bucket, f"s3://{bucket}/{prefix}", objects, rel_paths, dest)


def download_object(client: S3Client, uri: str, dest: Path) -> Path:
    """Copy the one object ``s3://bucket/key`` into the folder ``dest`` (same name); return the local file.

    Atomic and idempotent like :func:`download_prefix` (a HEAD request when the copy is current).
    Raises ``FileNotFoundError`` when there is no such object.
    """
    bucket, key = parse_s3_uri(uri)
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if is_not_found(exc):
            raise FileNotFoundError(f"no object {uri}") from None
        raise
    name = PurePosixPath(key).name
    if not key or name in ("", ".", "..", COMPLETE_MARKER):
        raise ValueError(f"{uri} does not name a file")
    obj = {"key": key, "etag": str(head.get("ETag", "")), "size": int(head.get("ContentLength", 0))}
    folder = _copy_objects(client, bucket, uri, [obj], [PurePosixPath(name)], Path(dest).absolute())
    return folder / name


def _copy_objects(
    client: S3Client, bucket: str, uri: str, objects: list[dict[str, Any]], rel_paths: list[PurePosixPath], dest: Path
) -> Path:
    """Copy ``objects`` to ``dest/rel_paths`` through a temporary sibling and a ``.complete`` marker (see
    :func:`download_prefix`); nothing happens when the marker already lists exactly these objects."""
    wanted = {"uri": uri, "objects": objects}
    with _locked(dest.parent / f".{dest.name}.lock"):
        marker = _read_marker(dest)
        if marker is not None and marker.get("uri") == wanted["uri"] and marker.get("objects") == objects:
            return dest
        # Holding the lock, any temporary sibling is left over from a crashed copy.
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir(parents=True)
        try:
            for obj, rel in zip(objects, rel_paths, strict=True):
                target = tmp.joinpath(rel)
                target.parent.mkdir(parents=True, exist_ok=True)
                _download_object(client, bucket, obj, target)
            (tmp / COMPLETE_MARKER).write_text(json.dumps(wanted, indent=1, sort_keys=True), encoding="utf-8")
            _swap_into_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def _download_object(client: S3Client, bucket: str, obj: dict[str, Any], target: Path) -> None:
    """Stream one object to ``target``; ``IfMatch`` makes a concurrent overwrite fail instead of mixing."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": obj["key"]}
    if obj["etag"]:
        kwargs["IfMatch"] = obj["etag"]
    response = client.get_object(**kwargs)
    written = 0
    with open(target, "wb") as handle:
        for chunk in response["Body"].iter_chunks(chunk_size=1 << 20):
            handle.write(chunk)
            written += len(chunk)
    if written != obj["size"]:
        raise OSError(f"s3://{bucket}/{obj['key']}: got {written} bytes, listing said {obj['size']}")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` onto ``dest``; an existing ``dest`` is moved aside first and removed afterwards."""
    old: Path | None = None
    if dest.exists() or dest.is_symlink():
        old = dest.parent / f".{dest.name}.tmp-old-{secrets.token_hex(4)}"
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
