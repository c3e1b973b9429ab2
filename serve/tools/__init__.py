"""The command-line tools: ``cli`` (the ``instantid`` command and its subcommands), ``generate`` (``instantid
generate``, in process), ``runner`` (``instantid serve``: a Serve config with its embedded S3), ``demo``, ``seaweed``
(the embedded SeaweedFS), ``download`` (real weights), ``licenses`` (the weights' licences) and ``cluster`` (the
KubeRay manifest's render)."""


class CliError(Exception):
    """A one-line reason for a command to exit non-zero."""
