"""The served application: the ingress (``api``: routes; ``inputs``: request reading; ``errors``: the error
mapping; ``schemas``: request and response models), the typed configuration (``config``), the app builder
(``app``), the command line (``cli``, ``runner``, ``demo``) and the benchmarks (``bench``).

Ray Serve itself is imported as ``ray_serve`` throughout, since this package is called ``serve`` too.
"""
