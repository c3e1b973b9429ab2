"""InstantID model code: face analysis, keypoint image, face tokens, IdentityNet + SDXL denoising.

Nothing in this package imports Ray: a notebook can use it directly.
"""
