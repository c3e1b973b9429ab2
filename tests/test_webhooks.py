"""Webhook delivery (``serve.jobs.webhooks``) against a real local HTTP(S) receiver: no Ray, no network beyond
127.0.0.1.

The receiver is a ``ThreadingHTTPServer`` that answers a scripted sequence of statuses and records every request,
so each test can say both what ``deliver`` reported and what actually arrived (including "nothing at all" for
refusals, which must happen before any connection). Backoffs are hundredths of a second to keep this fast.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

from serve.jobs.webhooks import (
    DELIVERY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    DeliveryResult,
    WebhookRefused,
    WebhookSettings,
    deliver,
    is_public_address,
    resolve_and_check,
    sign,
    validate_callback_url,
    verify_signature,
)

SECRET = "whsec-test-0123456789abcdef"
JOB = {"id": "job-1", "status": "succeeded", "images": ["s3://results/job-1/0.png"], "note": "ünïcode"}


# ------------------------------------------------------------------------------------------------ receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A scripted local webhook receiver: answers ``statuses`` in order (the last one repeats)."""

    server: ThreadingHTTPServer
    statuses: list[int] = field(default_factory=lambda: [200])
    extra_headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def url(self, host: str = "127.0.0.1", path: str = "/hook", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}{path}"

    def answer(self, received: Received) -> int:
        with self.lock:
            self.requests.append(received)
            index = min(len(self.requests) - 1, len(self.statuses) - 1)
            return self.statuses[index]


def _handler(receiver_ref: list[Receiver]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            receiver = receiver_ref[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = receiver.answer(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            if receiver.delay_s:
                time.sleep(receiver.delay_s)
            self.send_response(status)
            for name, value in receiver.extra_headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


def _start(ssl_context: ssl.SSLContext | None = None) -> Iterator[Receiver]:
    ref: list[Receiver] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(ref))
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]  # aborted TLS is fine
    if ssl_context is not None:
        server.socket = ssl_context.wrap_socket(server.socket, server_side=True)
    receiver = Receiver(server)
    ref.append(receiver)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    yield from _start()


def local_settings(**overrides: Any) -> WebhookSettings:
    """What local tests need: loopback allowed, plain http allowed, tiny backoffs and timeouts."""
    values: dict[str, Any] = {
        "allowed_hosts": ["127.0.0.1", "localhost"],
        "allow_private_addresses": True,
        "allow_http": True,
        "backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "timeout_s": 2.0,
        "max_attempts": 5,
    }
    values.update(overrides)
    return WebhookSettings(**values)


def run_deliver(url: str, settings: WebhookSettings, body: dict[str, Any] = JOB, **kwargs: Any) -> DeliveryResult:
    return asyncio.run(deliver(url, body, SECRET, settings, **kwargs))


# ----------------------------------------------------------------------------------------------- delivery


def test_delivered_once_with_a_valid_signature(receiver: Receiver) -> None:
    result = run_deliver(receiver.url(path="/hook?token=abc"), local_settings())

    assert result == DeliveryResult(delivered=True, attempts=1, status=200, error=None)
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.path == "/hook?token=abc"
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == JOB
    assert request.body == json.dumps(JOB, separators=(",", ":"), ensure_ascii=False).encode()  # compact, once
    assert request.headers["host"] == f"127.0.0.1:{receiver.port}"
    assert request.headers[DELIVERY_HEADER.lower()]

    header = request.headers[SIGNATURE_HEADER.lower()]
    timestamp = request.headers[TIMESTAMP_HEADER.lower()]
    assert abs(int(timestamp) - time.time()) < 60
    assert verify_signature(request.body, header, SECRET)
    # Independently of serve.jobs.webhooks: HMAC-SHA256 over "<t>." + body, hex, in "t=<t>,v1=<hex>".
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256).hexdigest()
    assert header == f"t={timestamp},v1={expected}"


def test_two_500s_then_200_is_delivered_on_the_third_attempt(receiver: Receiver) -> None:
    receiver.statuses = [500, 500, 200]
    result = run_deliver(receiver.url(), local_settings())

    assert result == DeliveryResult(delivered=True, attempts=3, status=200, error=None)
    assert len(receiver.requests) == 3
    bodies = {request.body for request in receiver.requests}
    assert len(bodies) == 1  # serialized once: every retry sends the same bytes
    assert len({request.headers[DELIVERY_HEADER.lower()] for request in receiver.requests}) == 1
    for request in receiver.requests:
        assert verify_signature(request.body, request.headers[SIGNATURE_HEADER.lower()], SECRET)


def test_always_500_gives_up_after_max_attempts(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.statuses = [500]
    with caplog.at_level(logging.DEBUG, logger="ray.serve"):
        result = run_deliver(receiver.url(path="/hook?token=query-secret"), local_settings(max_attempts=3))

    assert result == DeliveryResult(delivered=False, attempts=3, status=500, error="HTTP 500")
    assert len(receiver.requests) == 3
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0].getMessage()
    assert SECRET not in caplog.text and "query-secret" not in caplog.text


def test_400_is_not_retried(receiver: Receiver) -> None:
    receiver.statuses = [400, 200]
    result = run_deliver(receiver.url(), local_settings())

    assert result == DeliveryResult(delivered=False, attempts=1, status=400, error="HTTP 400")
    assert len(receiver.requests) == 1


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.statuses = [302]
    receiver.extra_headers = {"Location": "http://169.254.169.254/latest/meta-data/"}
    result = run_deliver(receiver.url(), local_settings())

    assert not result.delivered and result.attempts == 1 and result.status == 302
    assert len(receiver.requests) == 1


def test_retry_after_is_honoured_and_capped(receiver: Receiver) -> None:
    # backoff_s would wait 30 s; Retry-After: 0 must replace it.
    receiver.statuses = [503, 200]
    receiver.extra_headers = {"Retry-After": "0"}
    started = time.monotonic()
    assert run_deliver(receiver.url(), local_settings(backoff_s=30, max_backoff_s=60)).attempts == 2
    assert time.monotonic() - started < 10

    # Retry-After: 3600 must be capped by max_backoff_s.
    receiver.requests.clear()
    receiver.statuses = [429, 200]
    receiver.extra_headers = {"Retry-After": "3600"}
    started = time.monotonic()
    result = run_deliver(receiver.url(), local_settings(max_backoff_s=0.05))
    assert result.delivered and result.attempts == 2
    assert time.monotonic() - started < 10


def test_timeouts_and_refused_connections_are_retried_then_reported(receiver: Receiver) -> None:
    receiver.delay_s = 1.0
    result = run_deliver(receiver.url(), local_settings(timeout_s=0.2, max_attempts=2))
    assert not result.delivered and result.attempts == 2 and result.status is None
    assert result.error and "Timeout" in result.error

    with socket.socket() as probe:  # a port with nothing listening
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    result = run_deliver(f"http://127.0.0.1:{closed_port}/hook", local_settings(max_attempts=2))
    assert not result.delivered and result.attempts == 2 and result.error and "ConnectError" in result.error


def test_unserializable_body_and_missing_secret_fail_without_raising(receiver: Receiver) -> None:
    result = run_deliver(receiver.url(), local_settings(), body={"value": float("nan")})
    assert not result.delivered and result.attempts == 0 and "JSON" in (result.error or "")
    result = asyncio.run(deliver(receiver.url(), JOB, "", local_settings()))
    assert not result.delivered and result.attempts == 0 and "secret" in (result.error or "")
    assert receiver.requests == []


# ---------------------------------------------------------------------------------------------- refusals


def test_loopback_is_refused_at_resolution_before_any_connection(receiver: Receiver) -> None:
    strict = local_settings(allow_private_addresses=False)
    # The request-time check does no DNS, so "localhost" passes it; the delivery-time check refuses it.
    assert validate_callback_url(receiver.url(host="localhost"), strict) == receiver.url(host="localhost")
    result = run_deliver(receiver.url(host="localhost"), strict)
    assert not result.delivered and result.status is None
    assert result.error and result.error.startswith("refused:") and "127.0.0.1" in result.error
    assert result.attempts == 1  # refusals are final: no retries

    # An IP literal is refused at request time already.
    with pytest.raises(WebhookRefused, match="private"):
        validate_callback_url(receiver.url(), strict)
    result = run_deliver(receiver.url(), strict)
    assert not result.delivered and result.attempts == 0
    with pytest.raises(WebhookRefused, match=r"127\.0\.0\.1"):
        asyncio.run(resolve_and_check("localhost", receiver.port, strict))
    assert receiver.requests == []


def test_host_outside_the_allow_list_is_refused(receiver: Receiver) -> None:
    settings = local_settings(allowed_hosts=["hooks.example.com"])
    with pytest.raises(WebhookRefused, match="allow-list"):
        validate_callback_url(receiver.url(), settings)
    result = run_deliver(receiver.url(), settings)
    assert not result.delivered and result.attempts == 0 and "allow-list" in (result.error or "")
    assert receiver.requests == []


def test_http_is_refused_unless_allowed() -> None:
    settings = WebhookSettings(allowed_hosts=["hooks.example.com"])
    assert validate_callback_url("https://hooks.example.com/x", settings) == "https://hooks.example.com/x"
    with pytest.raises(WebhookRefused, match="scheme must be https"):
        validate_callback_url("http://hooks.example.com/x", settings)
    for url in ("ftp://hooks.example.com/x", "javascript:alert(1)", "//hooks.example.com/x", "hooks.example.com"):
        with pytest.raises(WebhookRefused, match="scheme"):
            validate_callback_url(url, settings)
    assert validate_callback_url("http://hooks.example.com/x", settings.model_copy(update={"allow_http": True}))


def test_empty_allow_list_means_webhooks_are_off(receiver: Receiver) -> None:
    off = WebhookSettings()
    with pytest.raises(WebhookRefused, match="webhooks are off"):
        validate_callback_url("https://hooks.example.com/x", off)
    result = run_deliver(receiver.url(), local_settings(allowed_hosts=[]))
    assert not result.delivered and "webhooks are off" in (result.error or "")
    assert receiver.requests == []


# The allow-list's rule, case by case: an exact entry is that host only; "*.example.com" is every subdomain of
# example.com at any depth, never example.com itself (the README and the setting say "subdomains"), and never a
# name that merely ends in the same letters.
ALLOW_LIST_CASES = [
    (["*.example.com"], "a.example.com", True),
    (["*.example.com"], "b.a.example.com", True),
    (["*.example.com"], "x.y.z.b.a.example.com", True),
    (["*.example.com"], "A.Example.COM", True),
    (["*.example.com"], "a.example.com.", True),  # the root's dot
    (["*.example.com"], "xn--bcher-kva.example.com", True),
    (["*.example.com"], "example.com", False),  # the apex is not a subdomain
    (["*.example.com"], "example.com.", False),
    (["*.example.com"], "evil-example.com", False),
    (["*.example.com"], "evilexample.com", False),
    (["*.example.com"], "aexample.com", False),
    (["*.example.com"], "xample.com", False),
    (["*.example.com"], "a-example.com", False),
    (["*.example.com"], "a.evilexample.com", False),
    (["*.example.com"], "example.com.evil.org", False),
    (["*.example.com"], "a.example.com.evil.org", False),
    (["*.example.com"], "a.example.co", False),
    (["*.example.com"], "a.example.comm", False),
    (["*.example.com"], "a.eexample.com", False),
    (["*.a.example.com"], "b.a.example.com", True),
    (["*.a.example.com"], "a.example.com", False),
    (["*.a.example.com"], "b.example.com", False),
    (["*.a.example.com"], "ba.example.com", False),
    (["hooks.example.com"], "hooks.example.com", True),
    (["hooks.example.com"], "a.hooks.example.com", False),  # an exact entry covers no subdomain
    (["hooks.example.com"], "example.com", False),
    (["hooks.example.com"], "xhooks.example.com", False),
    (["hooks.example.com", "*.example.org"], "a.example.org", True),
    (["hooks.example.com", "*.example.org"], "example.org", False),
]


@pytest.mark.parametrize(
    ("allowed", "host", "accepted"), ALLOW_LIST_CASES, ids=[f"{'+'.join(a)}-{h}" for a, h, _ in ALLOW_LIST_CASES]
)
def test_allow_list_matches_exact_hosts_and_subdomains_of_wildcards_only(
    allowed: list[str], host: str, accepted: bool
) -> None:
    settings = WebhookSettings(allowed_hosts=allowed)
    url = f"https://{host}:8443/hook"
    if accepted:
        assert validate_callback_url(url, settings) == url
    else:
        with pytest.raises(WebhookRefused, match="allow-list"):
            validate_callback_url(url, settings)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:pass@hooks.example.com/x",
        "https://hooks.example.com@evil.org/x",
        "https://hooks.example.com\\@evil.org/x",
        "https://hooks.example.com /x",
        "https://bücher.example.com/x",
        "https://hooks.example.com:99999/x",
        "https:///x",
    ],
)
def test_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(WebhookRefused):
        validate_callback_url(url, WebhookSettings(allowed_hosts=["hooks.example.com", "evil.org"]))


def test_any_port_is_fine_and_ip_literals_match_by_value() -> None:
    settings = WebhookSettings(allowed_hosts=["hooks.example.com", "2606:4700::1111"], allow_http=True)
    assert validate_callback_url("https://hooks.example.com:1/x?y=1#z", settings)
    assert validate_callback_url("http://[2606:4700:0:0:0:0:0:1111]:8080/x", settings)


@pytest.mark.parametrize("host", ["::1", "169.254.169.254", "10.0.0.1", "0.0.0.0", "::ffff:127.0.0.1"])
def test_private_literals_are_refused_at_request_time_and_at_resolution(host: str) -> None:
    settings = WebhookSettings(allowed_hosts=[host])
    literal = f"[{host}]" if ":" in host else host
    with pytest.raises(WebhookRefused, match="private"):
        validate_callback_url(f"https://{literal}/hook", settings)
    with pytest.raises(WebhookRefused, match="private"):
        asyncio.run(resolve_and_check(host, 443, settings))


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("169.254.169.254", False),
        ("fe80::1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT: not private, not global either
        ("224.0.0.1", False),
        ("ff0e::1", False),  # global-scope multicast: is_global says True
        ("240.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("::ffff:10.0.0.1", False),
        ("64:ff9b::7f00:1", False),  # NAT64 of 127.0.0.1: is_global says True
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1: is_global says True
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    ("address", "public"),
    [
        # NAT64, the well-known prefix (RFC 6052): the IPv4 address in the low 32 bits is where a gateway sends it.
        ("64:ff9b::808:808", True),  # 8.8.8.8 (ipaddress calls the prefix reserved: only the IPv4 decides)
        ("64:ff9b::7f00:1", False),  # 127.0.0.1
        ("64:ff9b::a00:1", False),  # 10.0.0.1
        ("64:ff9b::a9fe:a9fe", False),  # 169.254.169.254, the cloud metadata service
        ("64:ff9b::", False),  # 0.0.0.0
        # NAT64, the local-use prefix (RFC 8215): the translator's prefix length is local configuration, so every
        # place RFC 6052 allows inside the /48 is read, and each address found must be public.
        ("64:ff9b:1::808:808", True),  # /96: 8.8.8.8
        ("64:ff9b:1::a00:1", False),  # /96: 10.0.0.1
        ("64:ff9b:1::7f00:1", False),  # /96: 127.0.0.1
        ("64:ff9b:1:a00:0:100:808:808", False),  # /48: 10.0.0.1 (and 8.8.8.8 in the low bits)
        ("64:ff9b:1:0:7f:0:808:808", False),  # /64: 127.0.0.8 (and 8.8.8.8 in the low bits)
        # Teredo (2001::/32): the server's address and the client's (stored inverted); a relay sends to both.
        ("2001:0:808:808::fefe:fefe", True),  # server 8.8.8.8, client 1.1.1.1
        ("2001:0:808:808::f5ff:fffe", False),  # client 10.0.0.1
        ("2001:0:808:808::80ff:fffe", False),  # client 127.0.0.1
        ("2001:0:808:808::5601:5601", False),  # client 169.254.169.254
        ("2001:0:a00:1::fefe:fefe", False),  # server 10.0.0.1
        # IPv4-mapped and 6to4 carry one address too, by the same rule.
        ("::ffff:8.8.8.8", True),
        ("::ffff:127.0.0.1", False),
        ("2002:808:808::1", True),
        ("2002:a00:1::1", False),
    ],
)
def test_ipv6_forms_that_carry_an_ipv4_address_are_as_public_as_what_they_carry(address: str, public: bool) -> None:
    """These inputs reach the unwrapping: a public IPv4 inside is accepted although ``ipaddress`` calls the NAT64 and
    Teredo prefixes reserved or private, and a private one inside is refused although the form is otherwise fine."""
    assert is_public_address(address) is public
    if not public:  # and a host that resolves to one is refused before any connection
        with pytest.raises(WebhookRefused, match="private"):
            asyncio.run(resolve_and_check(address, 443, WebhookSettings(allowed_hosts=["hook.test"])))


# ------------------------------------------------------------------------------------------ DNS pinning


def _fake_dns(answers: dict[str, list[str]], calls: list[str]) -> Callable[..., Any]:
    async def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in answers[host]
        ]

    return getaddrinfo


def run_with_dns(answers: dict[str, list[str]], calls: list[str], coroutine_factory: Callable[[], Any]) -> Any:
    """Run a coroutine on a loop whose ``getaddrinfo`` answers from ``answers`` (what an attacker's DNS says)."""

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        loop.getaddrinfo = _fake_dns(answers, calls)  # type: ignore[method-assign]
        return await coroutine_factory()

    return asyncio.run(main())


def test_every_resolved_address_is_checked() -> None:
    settings = WebhookSettings(allowed_hosts=["hook.test"])
    calls: list[str] = []
    answers = {"hook.test": ["93.184.216.34", "10.0.0.5"]}
    with pytest.raises(WebhookRefused, match=r"10\.0\.0\.5"):
        run_with_dns(answers, calls, lambda: resolve_and_check("hook.test", 443, settings))
    answers = {"hook.test": ["93.184.216.34", "2606:2800:220:1::1"]}
    assert run_with_dns(answers, calls, lambda: resolve_and_check("hook.test", 443, settings)) == [
        "93.184.216.34",
        "2606:2800:220:1::1",
    ]


def test_delivery_connects_to_the_checked_address_with_the_original_host(receiver: Receiver) -> None:
    """``hook.test`` exists only in the fake resolver: if httpx resolved the name itself, this could not arrive."""
    settings = local_settings(allowed_hosts=["hook.test"])
    calls: list[str] = []
    url = receiver.url(host="hook.test")
    result = run_with_dns({"hook.test": ["127.0.0.1"]}, calls, lambda: deliver(url, JOB, SECRET, settings))

    assert result.delivered and result.attempts == 1
    assert calls == ["hook.test"]  # resolved exactly once, by the check
    assert receiver.requests[0].headers["host"] == f"hook.test:{receiver.port}"


def test_dead_address_falls_through_to_the_next_checked_one(receiver: Receiver) -> None:
    settings = local_settings(allowed_hosts=["hook.test"])
    calls: list[str] = []
    url = receiver.url(host="hook.test")
    # 127.0.0.2 answers no connection on the receiver's port (it listens on 127.0.0.1 only).
    answers = {"hook.test": ["127.0.0.2", "127.0.0.1"]}
    result = run_with_dns(answers, calls, lambda: deliver(url, JOB, SECRET, settings))
    assert result.delivered and result.attempts == 1


def test_each_try_rechecks_so_rebinding_between_retries_is_refused() -> None:
    """First answer public (the mock receiver says 503), then the record rebinds to 127.0.0.1: refused, not sent.

    ``httpx.MockTransport`` stands in for the network here (a public address cannot be reached from tests);
    it also shows what the real transport is asked for: the checked IP, the original Host, SNI for the name.
    """
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503)

    settings = WebhookSettings(allowed_hosts=["hook.test"], backoff_s=0.01, max_attempts=5)
    answers = {"hook.test": ["93.184.216.34"]}
    calls: list[str] = []
    resolve = _fake_dns(answers, calls)

    async def rebinding_dns(*args: Any, **kwargs: Any) -> list[Any]:
        result = await resolve(*args, **kwargs)
        answers["hook.test"] = ["127.0.0.1"]  # short TTL: the next answer is loopback
        return result

    async def scenario() -> DeliveryResult:
        asyncio.get_running_loop().getaddrinfo = rebinding_dns  # type: ignore[method-assign]
        return await deliver(
            "https://hook.test/cb?x=1",
            JOB,
            SECRET,
            settings,
            client_factory=lambda: httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        )

    result = asyncio.run(scenario())
    assert result.attempts == 2 and not result.delivered
    assert result.error and result.error.startswith("refused:") and "127.0.0.1" in result.error
    assert calls == ["hook.test", "hook.test"]
    assert len(seen) == 1
    request = seen[0]
    assert request.url.host == "93.184.216.34" and request.url.path == "/cb" and request.url.query == b"x=1"
    assert request.headers["host"] == "hook.test"
    assert request.extensions["sni_hostname"] == "hook.test"


# ---------------------------------------------------------------------------------------------------- TLS


def _self_signed(tmp_path: Path, dns_name: str) -> tuple[Path, Path]:
    """A certificate naming only ``dns_name`` (no IP address), and its key."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{dns_name}.pem", tmp_path / f"{dns_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.parametrize(("cert_name", "delivered"), [("localhost", True), ("other.test", False)])
def test_https_verifies_the_hostname_while_connecting_to_the_ip(
    tmp_path: Path, cert_name: str, delivered: bool
) -> None:
    """The request goes to 127.0.0.1 yet the certificate is checked against ``localhost`` (``sni_hostname``)."""
    cert, key = _self_signed(tmp_path, cert_name)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    settings = local_settings(allow_http=False, max_attempts=1)

    def client_factory() -> httpx.AsyncClient:
        return httpx.AsyncClient(verify=client_context, trust_env=False)

    for receiver in _start(server_context):
        url = receiver.url(host="localhost", scheme="https")
        result = run_deliver(url, settings, client_factory=client_factory)
        assert result.delivered is delivered, result
        if delivered:
            assert receiver.requests[0].headers["host"] == f"localhost:{receiver.port}"
            assert verify_signature(
                receiver.requests[0].body, receiver.requests[0].headers["x-instantid-signature"], SECRET
            )
            # Sanity: the same IP without the hostname for verification fails (the certificate has no IP SAN).
            with pytest.raises(httpx.ConnectError, match=r"certificate|hostname|IP address"):
                httpx.post(f"https://127.0.0.1:{receiver.port}/", verify=client_context, trust_env=False)
        else:
            assert result.error and "CERTIFICATE_VERIFY_FAILED" in result.error
            assert receiver.requests == []


# -------------------------------------------------------------------------------------------- signatures


def test_verify_signature_rejects_tampering_wrong_secrets_and_stale_timestamps() -> None:
    body = b'{"id":"job-1","status":"succeeded"}'
    now = 1_700_000_000
    header = f"t={now},v1={sign(body, SECRET, now)}"
    assert verify_signature(body, header, SECRET, now=now)
    assert verify_signature(body, header, SECRET, now=now + 299)

    assert not verify_signature(body.replace(b"succeeded", b"failed"), header, SECRET, now=now)  # tampered body
    assert not verify_signature(body, header, "another-secret", now=now)  # wrong secret
    assert not verify_signature(body, header, SECRET, now=now + 301)  # too old (a replay)
    assert not verify_signature(body, header, SECRET, now=now - 301)  # from the future
    assert not verify_signature(body, header.replace(f"t={now}", f"t={now + 1}"), SECRET, now=now)  # t is signed
    unprefixed = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert not verify_signature(body, f"t={now},v1={unprefixed}", SECRET, now=now)
    for malformed in ("", "v1=abc", f"t={now}", "t=abc,v1=00", "garbage", f"t=-{now},v1={sign(body, SECRET, now)}"):
        assert not verify_signature(body, malformed, SECRET, now=now)
    assert not verify_signature(body, header, "", now=now)
    # Several v1 values (a receiver rotating secrets, or a sender signing with two): any match is enough.
    assert verify_signature(body, f"t={now},v1=deadbeef,v1={sign(body, SECRET, now)}", SECRET, now=now)


def test_sign_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(b"k", b"42.payload", hashlib.sha256).hexdigest()
    assert sign(b"payload", "k", 42) == expected


# ---------------------------------------------------------------------------------------------- settings


def test_settings_are_strict() -> None:
    assert WebhookSettings().allowed_hosts == []
    with pytest.raises(pydantic.ValidationError):
        WebhookSettings(unknown=True)  # type: ignore[call-arg]
    for attempts in (0, 11):
        with pytest.raises(pydantic.ValidationError):
            WebhookSettings(max_attempts=attempts)
    for entry in ("*", "https://hooks.example.com", "hooks.example.com/x", "*.10.0.0.1", "a_b.example.com"):
        with pytest.raises(pydantic.ValidationError):
            WebhookSettings(allowed_hosts=[entry])
    normalized = WebhookSettings(allowed_hosts=["Hooks.Example.COM.", "[0:0:0:0:0:0:0:1]"]).allowed_hosts
    assert normalized == ["hooks.example.com", "::1"]
    assert SECRET not in repr(WebhookSettings(secret=SECRET))  # logging the settings must not log the secret
