"""Async jobs at the ingress: ``POST /v1/jobs`` runs a generation in the background and clients follow it.

- ``state``: a job's durable state (one S3 document, replaced only conditionally), its status enum, the body a
  client sees, and the async store the ingress reads and writes it through;
- ``leases``: who runs a job and until when, on a clock that tests can replace;
- ``admission``: the ingress's generation slots (a request gets one now or a 503; a job waits its turn);
- ``runner``: a job from acceptance to its outcome: the lease kept while it runs, takeover of jobs whose replica
  died, the outcome written once, the webhook sent;
- ``events``: the Server-Sent Events a client follows a job with, one channel poll per job per replica;
- ``webhooks``: signed, SSRF-safe delivery of the final body to ``callback_url``.
"""
