"""The served application: ``app`` (the builder: typed config -> the deployment graph), ``config`` (the typed
configuration), ``schemas`` (the public request and response models), ``ingress/`` (the HTTP routes and the handle
API), ``jobs/`` (async jobs: leases, takeover, events, webhooks), ``tools/`` (the ``instantid`` command line, the
embedded S3, downloads, the cluster render), ``bench/`` (the benchmarks), ``configs/`` and ``static/`` (the page).

Ray Serve itself is imported as ``ray_serve`` throughout, since this package is called ``serve`` too.
"""
