"""InstantID model code: face analysis, keypoint image, face tokens, IdentityNet + SDXL denoising.

Nothing in this package imports Ray: a notebook can use it directly. Its modules, by concern:

- the request's vocabulary (light, pydantic/numpy only): ``options`` (every generation option's type, default, range
  and description, once), ``params`` (the denoiser's per-request parameters, mapped from the options by name),
  ``catalogue`` (bases, LoRAs and fast modes chosen by name), ``styles`` (prompt templates), ``errors`` (errors with
  stable codes and statuses), ``face_data`` (detected faces and the face condition as plain data), ``regions`` (the
  layout of several people), ``keypoints`` (the IdentityNet keypoint image and the size rules), ``images`` (safe
  decoding of uploads);
- faces: ``faces`` (antelopev2 detection and recognition), ``conditioning`` (one person's face condition),
  ``group`` (several people's), ``identity`` (combining several photos, the CFG negative), ``identity_score``
  (how well an image kept the identity);
- the prompt: ``text`` (SDXL dual text encoders, long and weighted prompts), ``prompt_syntax`` (the weighting
  syntax);
- control inputs: ``control_maps`` (canny and depth maps, the cover-crop rule), ``control_inputs`` (maps and the
  init image at the output size);
- denoising: ``resampler`` (16 face tokens), ``attention`` (decoupled face-token cross-attention),
  ``multi_identity`` (per-identity tokens, masks and IdentityNet), ``batch_rows`` (a job's rows, concatenated per
  step), ``denoiser`` (the loop, extra ControlNets, image-to-image, decoding), ``continuous`` (step-level batching),
  ``schedulers`` (the scheduler names), ``previews`` (latent previews for progress);
- weights: ``weights`` (sources and the folder layout), ``loading`` (components from a layout), ``bases`` (SDXL
  bases, folders or single files), ``sdxl_checkpoint`` (the original single-file key layout), ``loras``,
  ``licenses`` (each weight source's licence and whether it allows commercial use);
- outputs: ``safety`` (the safety check of generated images: a classifier shipped in a package, the policy, the
  blur).

The whole generation in one process is ``deployments.generation.local.InstantIDPipeline``; tiny weights in the
published formats are written by ``deployments.tiny``.
"""
