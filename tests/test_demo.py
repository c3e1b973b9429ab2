"""`instantid demo` as a new user runs it: local Ray + embedded S3 + tiny weights + one HTTP request."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from serve.tools.seaweed import EmbeddedS3

pytestmark = pytest.mark.slow


def test_demo_prints_an_s3_object_that_exists_and_a_local_copy(tmp_path: Path):
    env = {**os.environ, "INSTANTID_HOME": str(tmp_path / "home")}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS"):
        env.pop(name, None)  # the demo must bring its own S3 and Ray
    result = subprocess.run(
        [sys.executable, "-m", "serve.tools.cli", "demo"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    uri = re.search(r"^S3 object:\s+(s3://\S+)$", result.stdout, re.MULTILINE).group(1)
    local = Path(re.search(r"^local copy:\s+(\S+)$", result.stdout, re.MULTILINE).group(1))
    assert local.is_file() and Image.open(local).size == (512, 512)
    assert (tmp_path / "home" / "weights" / "tiny" / "sdxl" / "model_index.json").is_file()

    # The embedded store keeps its data folder: start it again and find the object the demo named.
    bucket, key = uri[len("s3://") :].split("/", 1)
    with EmbeddedS3(tmp_path / "home" / "s3", bucket=bucket) as store:  # starts it
        stored = store.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    assert stored == local.read_bytes()
