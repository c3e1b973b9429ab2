"""S3 as the soak sees it: the embedded store's process (found under the service's process tree), a boto3 client
with its credentials, and the snapshot of every generation the checker reads.

The snapshot reads meta.json of every generation and hashes every object meta.json lists, so "a 200 whose image is
missing or altered" is judged from S3 itself, not from what the service says about it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import psutil

from .records import S3Snapshot, StoredObject

_PORT_FLAG = re.compile(r"^-([a-z0-9.]+port(?:\.grpc)?)=(\d+)$")
_META = re.compile(r"/(?P<id>[0-9]{8}T[0-9]{6}Z-[0-9a-f]{16})/meta\.json$")


def find_weed(processes: list[psutil.Process], data_dir: Path) -> psutil.Process | None:
    """The ``weed`` process serving ``data_dir`` among ``processes`` (the service's descendants)."""
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            argv = proc.cmdline()
            if argv and Path(argv[0]).name == "weed" and any(a == f"-dir={data_dir / 'data'}" for a in argv):
                return proc
    return None


def weed_ports(proc: psutil.Process) -> dict[str, int]:
    """Every ``-x.port=N`` flag of a running weed (the S3 gateway is ``s3.port``)."""
    ports = {}
    for arg in proc.cmdline():
        match = _PORT_FLAG.match(arg)
        if match:
            ports[match.group(1)] = int(match.group(2))
    return ports


def s3_client(data_dir: Path, endpoint_url: str, bucket: str) -> Any:
    """A boto3 client for the embedded store, with the credentials it keeps in its data folder."""
    import boto3

    from deployments.storage.s3 import S3Settings, make_client

    creds = json.loads((data_dir / "credentials.json").read_text())
    session = boto3.session.Session(
        aws_access_key_id=creds["access_key_id"],
        aws_secret_access_key=creds["secret_access_key"],
        region_name="us-east-1",
    )
    settings = S3Settings(
        bucket=bucket,
        endpoint_url=endpoint_url,
        region="us-east-1",
        addressing_style="path",
        connect_timeout_s=5,
        read_timeout_s=10,
        max_attempts=2,
    )
    return make_client(settings, session=session)


def snapshot(client: Any, bucket: str, prefix: str) -> S3Snapshot:
    """Every object under ``prefix``; every generation's meta.json parsed; every object a meta.json lists hashed."""
    shot = S3Snapshot(bucket=bucket, prefix=prefix)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for item in page.get("Contents", []):
            key = item["Key"]
            shot.objects[key] = StoredObject(key=key, size=item["Size"], last_modified=item["LastModified"].timestamp())
    for key in list(shot.objects):
        match = _META.search(key)
        if match is None:
            continue
        try:
            meta = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as exc:  # recorded: the checker reports an unreadable meta.json as a lost result
            shot.unreadable[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        shot.metas[match["id"]] = meta
        for record in meta.get("images") or []:
            stored = shot.objects.get(record.get("key", ""))
            if stored is None:
                continue
            try:
                data = client.get_object(Bucket=bucket, Key=stored.key)["Body"].read()
            except Exception as exc:
                shot.unreadable[stored.key] = f"{type(exc).__name__}: {str(exc)[:200]}"
                continue
            stored.sha256 = hashlib.sha256(data).hexdigest()
    return shot
