"""Webhook delivery for async jobs: when a job finishes, its final body is POSTed to the request's ``callback_url``.

A callback URL makes *this* server send a request to a place a client chose, so it is an SSRF vector first and
a convenience second. Every guard below exists for that reason:

* **Off unless configured.** ``WebhookSettings.allowed_hosts`` empty means webhooks are off; a non-empty list
  names the exact hostnames (or ``*.suffix`` wildcards for subdomains) that may receive them.
* **Checked twice.** :func:`validate_callback_url` runs synchronously at request time (scheme, no userinfo,
  allow-list, IP literals; no DNS) so a bad URL is a 4xx for the client instead of a silent failure later.
  :func:`resolve_and_check` runs at every delivery attempt: it resolves the hostname and refuses it when *any*
  address it resolves to is private, loopback, link-local, multicast, reserved or unspecified (unless
  ``allow_private_addresses``), because an attacker who controls DNS chooses which of several records a
  client would use.
* **Rebinding-safe connection.** Resolving once to check and letting the HTTP client resolve again to connect
  would let a short-TTL DNS record answer "public" to the check and "127.0.0.1" to the connect. So the
  request is sent to a URL whose host is the *checked IP address*, with the original ``Host`` header and,
  for https, the ``sni_hostname`` request extension of httpx/httpcore, which makes httpcore send SNI for
  and verify the certificate against the original hostname (``ssl.SSLContext.wrap_socket(server_hostname=)``)
  while the TCP connection goes to the IP. Verified with httpx 0.28.1 / httpcore 1.0.9 (the tests run a
  TLS receiver whose certificate names only ``localhost`` and connect to 127.0.0.1 that way). The
  alternative, a custom ``httpcore`` network backend, needs httpx's private ``AsyncHTTPTransport._pool``
  because the transport takes no ``network_backend`` argument, so it is not used. Environment proxies are
  ignored (``trust_env=False``) and redirects are never followed: either would connect somewhere unchecked.

Signature scheme (what receivers verify; :func:`verify_signature` is the reference implementation)::

    X-InstantID-Timestamp: <t>                      unix seconds when this attempt was signed
    X-InstantID-Signature: t=<t>,v1=<hex>           hex = HMAC-SHA256(secret, f"{t}.".encode() + raw_body)
    X-InstantID-Delivery:  <id>                     the same for every retry of one delivery (deduplicate on it)
    Content-Type:          application/json

The timestamp is inside the MAC so a captured request cannot be replayed later with a fresh timestamp;
receivers should refuse timestamps more than a few minutes from their clock (default tolerance 300 s) and
compare in constant time. The MAC covers the exact bytes sent (compact JSON, serialized once), so receivers
must verify the raw body before parsing it. The secret is the job owner's API key when API keys are on, else
``WebhookSettings.secret``; it is never logged or put in a result.

Retries: connection errors, timeouts, 5xx and 429 are retried up to ``max_attempts`` tries in all, waiting
``backoff_s * 2**(try - 1)`` seconds after a failed try (a numeric ``Retry-After`` replaces that), both capped
at ``max_backoff_s``. Other 4xx, 3xx and refusals end the delivery at once. Each try re-resolves and re-checks
the hostname, so a record that turns private between retries is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

logger = logging.getLogger("ray.serve")

SIGNATURE_HEADER = "X-InstantID-Signature"
TIMESTAMP_HEADER = "X-InstantID-Timestamp"
DELIVERY_HEADER = "X-InstantID-Delivery"
USER_AGENT = "instantid-serve-webhooks/1"
MAX_URL_LENGTH = 2048

# One DNS label; a hostname is labels joined by dots. Letters, digits and inner hyphens only, which also
# keeps underscores, percent-encoding and other parser-differential material out of allowed hosts.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
# NAT64 (RFC 6052): the well-known prefix carries an IPv4 address in its low 32 bits; inside the local-use prefix
# (RFC 8215) a translator's own prefix may be /48, /56, /64 or /96, which puts the address elsewhere (see below).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+")

ClientFactory = Callable[[], httpx.AsyncClient]


class WebhookRefused(ValueError):
    """A callback URL (or what its hostname resolves to) may not receive webhooks; the message says why."""


class WebhookSettings(BaseModel):
    """Who may receive webhooks and how hard delivery tries; the defaults are off and strict."""

    model_config = ConfigDict(extra="forbid")

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hostnames that may receive webhooks, exact or '*.example.com' (subdomains only). Empty: off.",
    )
    allow_private_addresses: bool = Field(
        default=False,
        description="Allow hosts resolving to private/loopback/link-local/reserved addresses (local testing only).",
    )
    secret: str | None = Field(
        default=None,
        repr=False,  # kept out of reprs, so logging the settings never logs it
        description="HMAC signing secret when API keys are off (else the job owner's API key signs).",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="Per attempt: resolution, connect, send and answer.")
    max_attempts: int = Field(default=5, ge=1, le=10, description="Tries in all, the first one included.")
    backoff_s: float = Field(default=1.0, ge=0, description="Wait after failed try n: backoff_s * 2**(n-1).")
    max_backoff_s: float = Field(default=60.0, ge=0, description="Cap on any wait, Retry-After included.")
    allow_http: bool = Field(default=False, description="Allow plain http:// callback URLs (https only otherwise).")

    @field_validator("allowed_hosts")
    @classmethod
    def _normalize_hosts(cls, hosts: list[str]) -> list[str]:
        """Lowercase, strip brackets/trailing dot, and refuse entries that are not a host (a URL, a bare '*')."""
        normalized = []
        for raw in hosts:
            entry = raw.strip().lower().rstrip(".")
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            name = entry[2:] if entry.startswith("*.") else entry
            if _ip_or_none(name) is None and not _HOSTNAME.match(name):
                raise ValueError(f"allowed_hosts entry {raw!r} is not a hostname, '*.hostname' or IP address")
            ip = _ip_or_none(name)
            if entry.startswith("*.") and ip is not None:
                raise ValueError(f"allowed_hosts entry {raw!r}: wildcards apply to hostnames, not addresses")
            normalized.append(str(ip) if ip is not None else entry)
        return normalized


@dataclass(frozen=True)
class DeliveryResult:
    """How one delivery ended. ``attempts`` counts tries started (0: refused before any, e.g. a bad URL)."""

    delivered: bool
    attempts: int
    status: int | None
    error: str | None


# ----------------------------------------------------------------------------------------------- addresses


def _ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_public_address(address: str | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True only for globally routable unicast addresses, looking inside IPv6 forms that carry an IPv4 one.

    An IPv6 address that carries IPv4 addresses (IPv4-mapped ``::ffff:0:0/96``, 6to4 ``2002::/16``, NAT64
    ``64:ff9b::/96`` and ``64:ff9b:1::/48``, Teredo ``2001::/32``) is public exactly when every IPv4 address it
    carries is: a packet to it is delivered to (or through) them. So ``::ffff:127.0.0.1``, ``2002:7f00:1::`` and
    ``64:ff9b::7f00:1`` are refused although ``is_global`` calls the last two global, and NAT64 of a public address
    is accepted although ``ipaddress`` calls its prefix reserved (Teredo: private).
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address):
        carried = _carried_ipv4(ip)
        if carried:
            return all(is_public_address(inner) for inner in carried)
    flags = (ip.is_private, ip.is_loopback, ip.is_link_local, ip.is_multicast, ip.is_reserved, ip.is_unspecified)
    return ip.is_global and not any(flags)


def _carried_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (none: it is not one of those forms).

    Teredo carries its server's address and its client's. In the local-use NAT64 prefix the translator's prefix
    length is the network's own configuration, unknown here, so each place RFC 6052 allows for it is read (the
    ``u`` octet, byte 8, is always skipped) and all must be public: a crafted address cannot show a public one
    where this check looks and hold a private one where the translator does. The places overlap, and the zero
    bytes of the common /96 form read as 0.x.y.z elsewhere ("this network", which nothing routes to), so readings
    in 0.0.0.0/8 are left out, except that of the low 32 bits, which is always checked.
    """
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    raw = ip.packed
    if ip in _NAT64:
        return [ipaddress.IPv4Address(raw[12:])]
    if ip in _NAT64_LOCAL:
        places = [ipaddress.IPv4Address(place) for place in (raw[6:8] + raw[9:11], raw[7:8] + raw[9:12], raw[9:13])]
        return [ipaddress.IPv4Address(raw[12:])] + [place for place in places if place not in _THIS_NETWORK]
    return []


def _host_allowed(host: str, allowed_hosts: list[str]) -> bool:
    """Exact match (IP literals by value), or ``*.suffix`` matching subdomains of ``suffix`` at any depth: the host
    ends with ``.suffix`` at a label boundary, so neither the suffix itself nor ``evil-suffix`` matches."""
    ip = _ip_or_none(host)
    if ip is not None:
        return str(ip) in allowed_hosts
    for entry in allowed_hosts:
        if entry == host:
            return True
        if entry.startswith("*.") and host.endswith(entry[1:]) and len(host) > len(entry) - 1:
            return True
    return False


# ---------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Target:
    url: httpx.URL
    host: str  # normalized: lowercase ASCII (punycode), no brackets, no trailing dot
    port: int


def _parse_target(url: str, settings: WebhookSettings) -> _Target:
    if not settings.allowed_hosts:
        raise WebhookRefused("webhooks are off on this server (no webhooks.allowed_hosts configured)")
    if not isinstance(url, str) or not url:
        raise WebhookRefused("callback_url must be a non-empty string")
    if len(url) > MAX_URL_LENGTH:
        raise WebhookRefused(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    if not url.isascii() or any(char <= " " or char in "\x7f\\" for char in url):
        raise WebhookRefused(
            "callback_url must be ASCII without spaces, control characters or backslashes "
            "(write international hostnames in punycode, xn--...)"
        )
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    schemes = ("https", "http") if settings.allow_http else ("https",)
    if scheme not in schemes:
        raise WebhookRefused(f"callback_url scheme must be {' or '.join(schemes)}, not {scheme or 'missing'!r}")
    if "@" in parts.netloc:
        raise WebhookRefused("callback_url must not contain credentials (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise WebhookRefused("callback_url has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookRefused(f"callback_url has an invalid port: {exc}") from None
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        raise WebhookRefused(f"callback_url is not a valid URL: {exc}") from None
    # The check and the delivery must agree on the host; two parsers that disagree are an SSRF classic.
    if parsed.raw_host.decode("ascii").lower().rstrip(".") != host:
        raise WebhookRefused("callback_url host is ambiguous")
    if not _host_allowed(host, settings.allowed_hosts):
        raise WebhookRefused(f"callback_url host {host!r} is not in this server's webhook allow-list")
    ip = _ip_or_none(host)
    if ip is not None and not settings.allow_private_addresses and not is_public_address(ip):
        raise WebhookRefused(f"callback_url address {host} is private, loopback, link-local or reserved")
    return _Target(url=parsed, host=host, port=port)


def validate_callback_url(url: str, settings: WebhookSettings) -> str:
    """The request-time check (no DNS): raise :class:`WebhookRefused` saying why, else return ``url``.

    Refuses when webhooks are off, for schemes other than https (or http with ``allow_http``), credentials
    in the URL, hosts outside the allow-list, private IP literals, and URLs two parsers read differently.
    Any port is accepted: the allow-list, not the port, decides who receives webhooks.
    """
    _parse_target(url, settings)
    return url


async def resolve_and_check(host: str, port: int, settings: WebhookSettings) -> list[str]:
    """Every address ``host`` resolves to, refusing (:class:`WebhookRefused`) if any of them is not public.

    All addresses are checked, not just the first, because the one a connection would use is the
    resolver's (an attacker's) choice. DNS failures propagate as ``OSError`` (``socket.gaierror``): they
    are usually transient, so delivery retries them. The caller must connect to one of the returned
    addresses, never resolve ``host`` again.
    """
    host = host.strip("[]")
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise WebhookRefused(f"{host} resolves to no addresses")
    if not settings.allow_private_addresses:
        for address in addresses:
            if not is_public_address(address.split("%", 1)[0]):
                raise WebhookRefused(
                    f"{host} resolves to {address}, a private, loopback, link-local or reserved address"
                )
    return addresses


# ------------------------------------------------------------------------------------------------- signing


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """Hex HMAC-SHA256 of ``f"{timestamp}.".encode() + body`` with ``secret`` (see the module docstring)."""
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_headers(body: bytes, secret: str, timestamp: int) -> dict[str, str]:
    """The two signature headers for ``body`` signed at ``timestamp``."""
    return {SIGNATURE_HEADER: f"t={timestamp},v1={sign(body, secret, timestamp)}", TIMESTAMP_HEADER: str(timestamp)}


def verify_signature(body: bytes, header: str, secret: str, tolerance_s: float = 300, now: float | None = None) -> bool:
    """True if ``header`` (``t=<ts>,v1=<hex>``, several ``v1`` allowed) signs ``body`` with ``secret``.

    For receivers and tests. False, never an exception, for a malformed header, an empty secret, a
    timestamp more than ``tolerance_s`` from ``now`` (either way: replays and skewed clocks) or a wrong MAC.
    The comparison is constant-time.
    """
    if not secret or not header:
        return False
    timestamp: int | None = None
    candidates: list[str] = []
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit() and value.isascii():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = sign(body, secret, timestamp).encode("ascii")
    # Compare every candidate (no early exit) so the time taken does not say which one matched.
    matches = [hmac.compare_digest(expected, candidate.encode("utf-8", "replace")) for candidate in candidates]
    return any(matches)


# ------------------------------------------------------------------------------------------------ delivery


@dataclass(frozen=True)
class _Try:
    delivered: bool
    retry: bool
    status: int | None = None
    error: str | None = None
    retry_after_s: float | None = None


def _default_client(settings: WebhookSettings) -> httpx.AsyncClient:
    """No environment proxies (they would connect somewhere unchecked), no redirects, the settings' timeout."""
    return httpx.AsyncClient(timeout=settings.timeout_s, trust_env=False, follow_redirects=False)


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds; HTTP-date values are ignored (the exponential backoff applies)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None


def _describe(exc: BaseException) -> str:
    """``Type: message`` with any URL in the message masked, so a query string (a token?) never leaks."""
    message = _URL_IN_TEXT.sub("<url>", str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _post(client: httpx.AsyncClient, request: httpx.Request) -> tuple[int, str | None]:
    """Send and close without reading the answer's body: only its status matters, and it may be huge."""
    response = await client.send(request, stream=True, follow_redirects=False)
    await response.aclose()
    return response.status_code, response.headers.get("retry-after")


async def _send_pinned(
    client: httpx.AsyncClient,
    target: _Target,
    payload: bytes,
    headers: dict[str, str],
    attempt: int,
    settings: WebhookSettings,
) -> tuple[int, str | None]:
    """Resolve and check ``target.host``, then POST to a checked address (never to the name: no re-resolution).

    Addresses are tried in turn on connection failures (e.g. an AAAA record with nothing listening), starting
    at a different one each try so that one dead address does not sink the delivery.
    """
    addresses = await resolve_and_check(target.host, target.port, settings)
    # SNI and certificate verification use the hostname; an IP literal host needs neither override.
    extensions = {} if _ip_or_none(target.host) is not None else {"sni_hostname": target.host}
    first = (attempt - 1) % len(addresses)
    ordered = addresses[first:] + addresses[:first]

    def pinned(address: str) -> httpx.Request:
        url = target.url.copy_with(host=address.split("%", 1)[0])
        return client.build_request(
            "POST", url, content=payload, headers=headers, extensions=extensions, timeout=settings.timeout_s
        )

    for address in ordered[:-1]:
        try:
            return await _post(client, pinned(address))
        except httpx.ConnectError:
            continue
    return await _post(client, pinned(ordered[-1]))


async def _try_once(
    client: httpx.AsyncClient,
    target: _Target,
    payload: bytes,
    secret: str,
    delivery_id: str,
    attempt: int,
    settings: WebhookSettings,
) -> _Try:
    """One try, bounded by ``timeout_s`` in all, classified as delivered, worth retrying, or final."""
    headers = {
        "Host": target.url.netloc.decode("ascii"),
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        DELIVERY_HEADER: delivery_id,
        **signature_headers(payload, secret, int(time.time())),
    }
    try:
        status, retry_after = await asyncio.wait_for(
            _send_pinned(client, target, payload, headers, attempt, settings), settings.timeout_s
        )
    except WebhookRefused as exc:
        return _Try(delivered=False, retry=False, error=f"refused: {exc}")
    except httpx.UnsupportedProtocol as exc:
        return _Try(delivered=False, retry=False, error=_describe(exc))
    except (httpx.TransportError, OSError, asyncio.TimeoutError) as exc:
        # Connection refused/reset, TLS failures, DNS failures, timeouts: maybe transient.
        return _Try(delivered=False, retry=True, error=_describe(exc))
    except Exception as exc:  # anything else is not going to improve by retrying, and must not crash the job
        return _Try(delivered=False, retry=False, error=_describe(exc))
    if 200 <= status < 300:
        return _Try(delivered=True, retry=False, status=status)
    if status == 429 or status >= 500:
        return _Try(False, True, status, f"HTTP {status}", _retry_after_s(retry_after))
    if 300 <= status < 400:
        return _Try(False, False, status, f"HTTP {status}: redirects are not followed")
    return _Try(False, False, status, f"HTTP {status}")


async def deliver(
    url: str,
    body: dict[str, Any],
    secret: str,
    settings: WebhookSettings,
    *,
    client_factory: ClientFactory | None = None,
) -> DeliveryResult:
    """POST ``body`` (a finished job) to ``url``, signed with ``secret``, retrying what may be transient.

    Never raises for a failed delivery (a refused URL, an unserializable body, an unreachable or unhappy
    receiver): the result says what happened and a warning naming only the host is logged. Cancellation
    still propagates. ``client_factory`` (no arguments, an ``httpx.AsyncClient``) is for callers that need
    another CA bundle or transport; it must not use a proxy, and redirects are never followed whatever it
    sets. The body is serialized once, so every retry sends, and signs, the same bytes.
    """
    try:
        target = _parse_target(url, settings)
    except WebhookRefused as exc:
        return _gave_up(_safe_host(url), DeliveryResult(False, 0, None, f"refused: {exc}"))
    if not secret:
        return _gave_up(
            target.host, DeliveryResult(False, 0, None, "no signing secret (webhooks.secret or an API key)")
        )
    try:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        return _gave_up(target.host, DeliveryResult(False, 0, None, f"body is not JSON-serializable: {exc}"))

    delivery_id = uuid.uuid4().hex
    last = _Try(delivered=False, retry=False)
    attempt = 0
    try:
        client = client_factory() if client_factory is not None else _default_client(settings)
    except Exception as exc:  # a broken factory is a failed delivery, not a crash of the job
        return _gave_up(target.host, DeliveryResult(False, 0, None, f"client_factory failed: {_describe(exc)}"))
    async with client:
        for attempt in range(1, settings.max_attempts + 1):
            last = await _try_once(client, target, payload, secret, delivery_id, attempt, settings)
            if last.delivered:
                return DeliveryResult(True, attempt, last.status, None)
            if not last.retry or attempt == settings.max_attempts:
                break
            delay = last.retry_after_s if last.retry_after_s is not None else settings.backoff_s * 2 ** (attempt - 1)
            delay = min(delay, settings.max_backoff_s)
            logger.debug(
                "webhook to %s: try %d failed (%s), retrying in %.2fs", target.host, attempt, last.error, delay
            )
            await asyncio.sleep(delay)
    return _gave_up(target.host, DeliveryResult(False, attempt, last.status, last.error))


def _safe_host(url: str) -> str:
    """The host of a URL for a log line, never the URL itself (its query may hold a token)."""
    try:
        return urlsplit(url).hostname or "?"
    except (ValueError, TypeError, AttributeError):
        return "?"


def _gave_up(host: str, result: DeliveryResult) -> DeliveryResult:
    logger.warning(
        "webhook to %s not delivered after %d attempt(s): %s", host, result.attempts, result.error or "unknown error"
    )
    return result
