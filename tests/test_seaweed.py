"""The embedded SeaweedFS store: real auth, generated+persisted credentials, persistence, clean lifecycle."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from deployments.storage import S3Settings, make_client
from serve.tools.seaweed import EmbeddedS3, find_weed_binary

pytestmark = pytest.mark.slow


def _client_with(store: EmbeddedS3, access_key: str, secret_key: str):
    session = boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key)
    return make_client(store.settings(attempts=1), session=session)


def _pids_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a reaper that is not us counts as gone)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (ProcessLookupError, FileNotFoundError):
        return False
    return state != "Z"


def test_signed_requests_work_and_settings_are_complete(embedded_s3: EmbeddedS3) -> None:
    settings = embedded_s3.settings()
    assert isinstance(settings, S3Settings)
    assert settings.endpoint_url == embedded_s3.endpoint_url
    assert settings.endpoint_url.startswith("http://127.0.0.1:")
    assert settings.addressing_style == "path"
    names = [b["Name"] for b in embedded_s3.client().list_buckets()["Buckets"]]
    assert embedded_s3.bucket in names
    env = embedded_s3.env()
    assert env["AWS_ACCESS_KEY_ID"] == embedded_s3.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == embedded_s3.secret_key
    assert env["AWS_ENDPOINT_URL_S3"] == embedded_s3.endpoint_url


def test_wrong_secret_key_is_refused(embedded_s3: EmbeddedS3) -> None:
    """SigV4 is really verified: the right access key with a wrong secret fails."""
    bad = _client_with(embedded_s3, embedded_s3.access_key, "0" * 40)
    with pytest.raises(ClientError) as info:
        bad.list_objects_v2(Bucket=embedded_s3.bucket)
    assert info.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    unknown = _client_with(embedded_s3, "AKIAUNKNOWNUNKNOWN00", embedded_s3.secret_key)
    with pytest.raises(ClientError):
        unknown.put_object(Bucket=embedded_s3.bucket, Key="auth-test/x", Body=b"x")


def test_anonymous_access_is_refused(embedded_s3: EmbeddedS3) -> None:
    embedded_s3.client().put_object(Bucket=embedded_s3.bucket, Key="anon-test/secret.txt", Body=b"private")
    anonymous = boto3.session.Session().client(
        "s3",
        endpoint_url=embedded_s3.endpoint_url,
        region_name="us-east-1",
        config=Config(signature_version=UNSIGNED, retries={"total_max_attempts": 1}),
    )
    with pytest.raises(ClientError):
        anonymous.get_object(Bucket=embedded_s3.bucket, Key="anon-test/secret.txt")
    with pytest.raises(ClientError):
        anonymous.put_object(Bucket=embedded_s3.bucket, Key="anon-test/new.txt", Body=b"x")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{embedded_s3.endpoint_url}/{embedded_s3.bucket}/anon-test/secret.txt", timeout=5)
    assert info.value.code == 403


def test_loopback_only_and_no_secret_on_command_line_or_in_logs(embedded_s3: EmbeddedS3) -> None:
    ports = embedded_s3.ports
    assert len(set(ports.values())) == len(ports) == 10
    argv = embedded_s3.command()
    assert "-ip.bind=127.0.0.1" in argv and "-disableHttp" in argv
    assert embedded_s3.secret_key not in " ".join(argv)
    proc = embedded_s3._proc
    assert proc is not None
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
    assert embedded_s3.secret_key not in cmdline and embedded_s3.access_key not in cmdline
    for path in (embedded_s3.data_dir / "logs").iterdir():
        if path.is_file():
            assert embedded_s3.secret_key not in path.read_text(errors="replace"), path
    assert embedded_s3.secret_key not in repr(embedded_s3)
    assert embedded_s3.secret_key not in repr(embedded_s3.settings())


def test_filer_http_backdoor_is_closed(embedded_s3: EmbeddedS3) -> None:
    """The filer's HTTP API would serve objects without S3 auth; ``-disableHttp`` must keep it shut."""
    embedded_s3.client().put_object(Bucket=embedded_s3.bucket, Key="backdoor/x.txt", Body=b"private")
    url = f"http://127.0.0.1:{embedded_s3.ports['filer.port']}/buckets/{embedded_s3.bucket}/backdoor/x.txt"
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(url, timeout=5)


def test_same_data_dir_cannot_be_used_twice(embedded_s3: EmbeddedS3) -> None:
    with pytest.raises(RuntimeError, match="already used"):
        EmbeddedS3(embedded_s3.data_dir).start()


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    assert find_weed_binary().name == "weed"
    store = EmbeddedS3(tmp_path / "s3", weed_binary=tmp_path / "no-such-weed")
    with pytest.raises((FileNotFoundError, OSError)):
        store.start(timeout_s=5)
    assert not store.running


def test_credentials_file_reuse_persistence_and_side_by_side(tmp_path: Path, embedded_s3: EmbeddedS3) -> None:
    """A second instance runs beside the session one; its credentials (0600) and data survive a restart."""
    data_dir = tmp_path / "s3"
    store = EmbeddedS3(data_dir, bucket="persist-test")
    t0 = time.monotonic()
    store.start()
    start_s = time.monotonic() - t0
    try:
        assert store.endpoint_url != embedded_s3.endpoint_url
        assert not set(store.ports.values()) & set(embedded_s3.ports.values())
        creds_path = data_dir / "credentials.json"
        assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600
        saved = json.loads(creds_path.read_text())
        assert saved == {"access_key_id": store.access_key, "secret_access_key": store.secret_key}
        assert store.secret_key != embedded_s3.secret_key
        store.client().put_object(Bucket="persist-test", Key="keep/me.txt", Body=b"still here")
        pid = store._proc.pid if store._proc else -1
    finally:
        t0 = time.monotonic()
        store.stop()
        stop_s = time.monotonic() - t0
    assert not store.running and not _pids_alive(pid)
    assert start_s < 20 and stop_s < 12

    again = EmbeddedS3(data_dir, bucket="persist-test")
    with again:
        assert (again.access_key, again.secret_key) == (saved["access_key_id"], saved["secret_access_key"])
        body = again.client().get_object(Bucket="persist-test", Key="keep/me.txt")["Body"].read()
        assert body == b"still here"
    assert not again.running
    assert stat.S_IMODE(creds_path.stat().st_mode) == 0o600


_CHILD = """
import os, sys
from pathlib import Path
from serve.tools.seaweed import EmbeddedS3
store = EmbeddedS3(Path(sys.argv[1]))
store.start()
print(store._proc.pid, store.ports["admin.port.grpc"], store.ports["s3.port.grpc"], flush=True)
if sys.argv[2] == "sigkill":
    os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("how", ["normal-exit", "sigkill"])
def test_weed_does_not_outlive_its_owner(tmp_path: Path, how: str) -> None:
    """``atexit`` stops weed on a normal exit; the parent-death signal covers a SIGKILLed owner."""
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "s3"), how],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    pid, *grpc_ports = (int(word) for word in child.stdout.split()[:3])
    deadline = time.monotonic() + 15
    while _pids_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pids_alive(pid), f"weed {pid} survived its owner ({how})"
    # A SIGKILLed owner cannot tidy up the sockets weed leaves in /tmp; do it for it.
    for component, port in zip(("admin", "s3"), grpc_ports, strict=True):
        Path(f"/tmp/seaweedfs-{component}-grpc-{port}.sock").unlink(missing_ok=True)


def test_restart_after_a_crash_keeps_endpoint_credentials_and_objects(tmp_path: Path) -> None:
    """What the supervisor relies on: a killed weed comes back where clients (Ray workers) already point."""
    with EmbeddedS3(tmp_path / "s3", bucket="restart-test") as store:
        env, ports, pid = store.env(), store.ports, store.pid
        store.client().put_object(Bucket="restart-test", Key="keep/me.txt", Body=b"before the crash")
        os.kill(pid, 9)
        assert store.wait(10) == -9 and not store.running
        store.restart(timeout_s=60)
        assert store.running and store.pid != pid
        assert (store.env(), store.ports) == (env, ports)
        body = store.client().get_object(Bucket="restart-test", Key="keep/me.txt")["Body"].read()
        assert body == b"before the crash"
        store.client().put_object(Bucket="restart-test", Key="after.txt", Body=b"after")
    assert not store.running


_STALLING_WEED = """
import signal, sys, time
def on_term(signum, frame):
    sys.stdout.write("  Shutting down SeaweedFS Mini ...\\n  S3           stopped   0.0s\\n")
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(60)  # weed's admin server stalled in a maintenance job, as it sometimes does
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
time.sleep(120)
"""


def test_a_weed_whose_admin_stalls_after_s3_stopped_is_not_waited_for(tmp_path: Path) -> None:
    """weed 4.48 sometimes spends 10 s on its admin server after its S3 gateway closed; stop() does not wait."""
    store = EmbeddedS3(tmp_path / "s3")
    log_path = store.data_dir / "logs" / "weed.out"  # where weed's console goes
    log_path.parent.mkdir(parents=True)
    with open(log_path, "wb") as output:
        store._proc = subprocess.Popen([sys.executable, "-c", _STALLING_WEED], stdout=output, stderr=output)
    deadline = time.monotonic() + 10
    while b"ready" not in log_path.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = store._proc.pid
    started = time.monotonic()
    store.stop(timeout_s=10)
    assert time.monotonic() - started < 6 and not _pids_alive(pid)
