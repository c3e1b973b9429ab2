"""API keys (bearer tokens) for the HTTP API.

Keys come from an environment variable and/or a file of ``name:token`` lines (``#`` comments allowed).
The file is re-read when it changes, so revoking a key is deleting its line: no restart. Only SHA-256
digests are kept in memory, every presented token is compared against every digest in constant time, and
a failure never says which part was wrong. The ``name`` is the principal: generations record it as their
owner, and only the owner may read or delete them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

ANONYMOUS = "anonymous"


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    required: bool = Field(default=True, description="Refuse requests without a valid key (off only for local demos).")
    keys_env: str = Field(default="INSTANTID_API_KEYS", description="Env var with comma-separated name:token pairs.")
    keys_file: str | None = Field(default=None, description="File of name:token lines, re-read when it changes.")


class AuthError(Exception):
    """Missing, malformed, unknown or revoked key; deliberately one message for all."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_keys(text: str, separator: str = "\n") -> dict[bytes, str]:
    """``{sha256(token): name}`` from ``name:token`` entries; malformed entries are skipped."""
    keys: dict[bytes, str] = {}
    for raw in text.split(separator):
        entry = raw.strip()
        if not entry or entry.startswith("#") or ":" not in entry:
            continue
        name, token = (part.strip() for part in entry.split(":", 1))
        if name and len(token) >= 16:  # short tokens are guessable: refuse to load them
            keys[_digest(token)] = name
    return keys


class ApiKeys:
    def __init__(self, config: AuthConfig, reload_interval_s: float = 1.0) -> None:
        self.config = config
        self.reload_interval_s = reload_interval_s
        self._lock = threading.Lock()
        self._env_keys = parse_keys(os.environ.get(config.keys_env, ""), separator=",")
        self._file_keys: dict[bytes, str] = {}
        self._file_stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._reload_file(force=True)

    @property
    def count(self) -> int:
        return len(self._env_keys) + len(self._file_keys)

    def _reload_file(self, force: bool = False) -> None:
        if self.config.keys_file is None:
            return
        now = time.monotonic()
        if not force and now - self._checked < self.reload_interval_s:
            return
        self._checked = now
        path = Path(self.config.keys_file).expanduser()
        try:
            stat = path.stat()
            stamp = (stat.st_mtime, stat.st_size)
            if stamp != self._file_stamp:
                self._file_keys = parse_keys(path.read_text())
                self._file_stamp = stamp
        except OSError:
            self._file_keys, self._file_stamp = {}, None  # a missing file means no file keys: fail closed

    def authenticate(self, authorization: str | None) -> str:
        """The principal for an ``Authorization`` header value; AuthError when it does not pass."""
        if not self.config.required:
            return ANONYMOUS
        with self._lock:
            self._reload_file()
            keys = {**self._env_keys, **self._file_keys}
        scheme, _, token = (authorization or "").partition(" ")
        presented = _digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else b"\0" * 32
        principal = None
        for digest, name in keys.items():  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, presented):
                principal = name
        if principal is None:
            raise AuthError("missing or invalid API key")
        return principal

    def webhook_secret(self, principal: str) -> str | None:
        """The secret a key's webhooks are signed with: the hex SHA-256 of the key itself, which its holder can
        compute and which the service keeps anyway (keys are stored as their digests, never in clear)."""
        with self._lock:
            keys = {**self._env_keys, **self._file_keys}
        for digest, name in keys.items():
            if name == principal:
                return digest.hex()
        return None
