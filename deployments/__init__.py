"""InstantID Serve deployments.

``deployments.instantid`` holds the model code (plain PyTorch/diffusers/insightface, no Ray) and
``deployments.storage`` the S3 code (no Ray); the modules next to them are thin Ray Serve wrappers, one per
deployment and named after it (``face_analyzer``, ``prompt_encoder``, ``denoiser``, ``result_store``), and
``messages`` holds every type they pass to each other.
"""
