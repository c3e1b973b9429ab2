"""The ingress: the HTTP routes and the Python handle API in front of the deployment graph.

- ``routes``: the Ingress deployment (FastAPI routes and the handle API methods), thin;
- ``generation``: generations on the graph: the plan, the pictures loaded, the flow run on deployment handles, the
  answer from what the store confirmed;
- ``faces``: ``POST /v1/faces``;
- ``inputs``: request bodies (JSON or multipart, size limits, slow clients) and pictures from base64 or ``s3://``;
- ``errors``: the one mapping from exceptions to HTTP statuses and JSON error bodies;
- ``auth``: API keys; ``idempotency``: at most one generation per ``Idempotency-Key``;
- ``openapi``: both request bodies of each POST route in ``/docs``; ``request_log``: one JSON line per request;
- ``autoscaling``: the policy that scales the ingress on admitted generations, not open streams.

Nothing here imports the model stack (torch, diffusers, transformers, onnxruntime, insightface, OpenCV), so an
ingress replica stays small.
"""
