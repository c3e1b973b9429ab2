"""InstantID Serve deployments.

``deployments.instantid`` holds the model code (plain PyTorch/diffusers/insightface, no Ray);
the modules next to it (``face``, ``prompt``, ``denoise``, ``store``) are thin Ray Serve wrappers.
"""
