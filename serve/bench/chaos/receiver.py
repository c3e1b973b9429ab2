"""The soak's webhook receiver: an HTTP server on 127.0.0.1 that verifies each delivery's signature with the
project's own ``verify_signature``, records its delivery id, and acknowledges it with a 204.

It acknowledges every POST (signed or not): a receiver that acknowledged a delivery id must never get it again,
so a second arrival of one id is a duplicate the checker reports.
"""

from __future__ import annotations

import http.server
import json
import threading
import time

from serve.jobs.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, verify_signature

from .records import Delivery

MAX_BODY = 4 << 20  # a job's final body is a few KB; anything near this is not a webhook


class WebhookReceiver:
    """Start with :meth:`start`, stop with :meth:`stop`; ``deliveries`` grows as POSTs arrive."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.deliveries: list[Delivery] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "the receiver is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def record(self, headers: dict[str, str], body: bytes) -> int:
        """Verify and record one POST; the status to answer (always 204: acknowledged)."""
        signature_ok = verify_signature(body, headers.get(SIGNATURE_HEADER.lower(), ""), self.secret)
        try:
            payload = json.loads(body)
        except ValueError:
            payload = {}
        delivery = Delivery(
            delivery_id=headers.get(DELIVERY_HEADER.lower()),
            job_id=payload.get("id") if isinstance(payload, dict) else None,
            status=payload.get("status") if isinstance(payload, dict) else None,
            received_at=time.time(),
            signature_ok=signature_ok,
            answered=204,
        )
        with self._lock:
            self.deliveries.append(delivery)
        return delivery.answered

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if not 0 <= length <= MAX_BODY:
                    self.send_response(413)
                    self.end_headers()
                    return
                body = self.rfile.read(length)
                status = receiver.record({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:  # quiet: the bench's stderr is for the fault log
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="webhook-receiver").start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def snapshot(self) -> list[Delivery]:
        with self._lock:
            return list(self.deliveries)
