"""Tiny random weights in exactly the published formats, for tests, CI and the local demo (no Ray).

``weights.write_tiny_weights`` writes a whole weights folder (a diffusers SDXL folder, a single-file base, the
InstantID folder with ``ControlNetModel/`` and ``ip-adapter.bin``, the antelopev2 ``.onnx`` files, extra ControlNets,
a depth model and LoRAs in both published layouts), loaded through the same loaders as real weights; ``faces``,
``controls`` and ``loras`` write their parts. The pictures these make are meaningless; everything around them is
real.
"""
