"""``ray start`` for a second node of a loopback-only Ray cluster on this machine (``python -m`` this module).

``instantid serve`` runs Ray in its single-machine mode (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) so that every Ray
server listens on 127.0.0.1 only. In that mode ``ray start --address`` refuses to add a node; outside it, Ray replaces
a loopback address (the head's, and ``--node-ip-address``) with the machine's own (``resolve_ip_for_localhost``),
where the head does not listen, and the new node never registers. This runs Ray's own ``ray start`` with the node's
address pinned to 127.0.0.1 instead: the node joins the head on loopback and its raylet, agents and workers listen
there too. For the soak only: a node on another machine could not join such a cluster anyway.
"""

from __future__ import annotations

import os
import sys

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def main() -> None:
    os.environ[SINGLE_MACHINE_ENV] = "1"  # read once, at import: lets this `ray start` add a node
    from ray._private import services
    from ray.scripts.scripts import main as ray_main

    os.environ[SINGLE_MACHINE_ENV] = "0"  # the node's raylet and workers run in single-machine mode, as the head's
    services.get_node_ip_address = lambda address=None: LOOPBACK
    sys.argv = ["ray", *sys.argv[1:]]
    ray_main()


if __name__ == "__main__":
    main()
