"""The command-line tools: ``cli`` (the ``instantid`` command and its subcommands), ``generate`` (``instantid
generate``, in process), ``runner`` (``instantid serve``: a Serve config with its embedded S3), ``local_ray`` (the
single-machine Ray those commands start), ``demo``, ``seaweed`` (the embedded SeaweedFS) and ``supervisor``
(which restarts it), ``download`` (real weights), ``licenses`` (the weights' licences) and ``cluster`` (the
KubeRay manifest's render)."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "INSTANTID_HOME"


class CliError(Exception):
    """A one-line reason for a command to exit non-zero."""


def instantid_home() -> Path:
    """Where the tools keep tiny weights, the embedded S3 data, the spool and demo outputs (``INSTANTID_HOME``).

    One definition for the CLI's defaults and for ``${INSTANTID_HOME}`` in Serve config files (``runner``).
    """
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".instantid").expanduser().absolute()
