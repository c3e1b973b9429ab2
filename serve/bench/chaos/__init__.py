"""``instantid bench chaos``: a soak that drives open-loop traffic at a fraction of measured capacity while faults
are injected on a schedule, then checks from the client's log and from S3 itself that nothing was lost, duplicated,
stuck or answered out of shape, that latency recovered after each fault and that no replica's memory grew.

Why a soak and not more unit tests: the failures that matter in production (a replica dying mid-request, a node
lost with its replicas, S3 stalling, a restart while jobs run) come together, under load, and show as a lost
image, a job that never ends or a webhook sent twice; only end-to-end invariants over a long run see them.

Modules (each does one thing; only ``arguments`` is imported by ``serve.bench``'s parser):

- ``arguments``: the command line;
- ``run``: the phases, from a fresh stack to the report;
- ``config``: the soak's Serve config derived from local.yaml (work folder, replicas on two nodes, webhooks);
- ``service``, ``node``, ``stack``: the service subprocess, the second Ray node, and every fault's operation;
- ``ray_ops``: Ray operations in short-lived driver processes (list, kill, wait for replicas);
- ``faults``: the schedule and the thread that runs it, announcing each fault on stderr;
- ``mix``, ``hostile``, ``client``, ``sse``, ``traffic``: the requests (the mix, the hostile corpus), recording
  each exchange, following job events, the open loop;
- ``receiver``: the webhook receiver;
- ``rss``, ``s3_audit``: replica memory sampling and reading S3 back;
- ``records``: everything recorded, as data; ``checks``, ``timing_checks``, ``verdicts``: the invariants, pure
  functions of the records; ``report``, ``plot``: the JSON and the PNG.
"""
