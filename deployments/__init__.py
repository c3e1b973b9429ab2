"""InstantID Serve deployments: the model code, the generation's stages and flow, and the Ray Serve wrappers.

- ``instantid/``: the model code (plain PyTorch/diffusers/insightface, no Ray); its package docstring maps it;
- ``generation/``: a generation as stages over typed messages, no Ray: ``messages`` (every type the deployments
  pass each other), ``plan`` (a request resolved once: every cross-field rule, each stage's input, the effective
  parameters), ``flow`` (the numbered steps every path runs), the stages the deployments serve (``face_stage``,
  ``prompt_stage``, ``control_stage``, ``denoise_stage``) and ``local`` (the whole flow in one process);
- ``storage/``: the S3 code (no Ray): generations, conditional records (jobs, idempotency), inputs, the spool;
- ``tiny/``: tiny random weights in the published formats, for tests and the demo;
- the thin Serve wrappers, one per deployment: ``face_analyzer``, ``prompt_encoder``, ``control_maps``,
  ``denoiser``, ``result_store``; beside them ``base_slots`` (bases behind Serve's multiplexing), ``job_events``
  (the job event channel actor), ``metrics``, ``config`` (the settings they take) and ``replica``.
"""
