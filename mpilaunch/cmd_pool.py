"""``mpilaunch pool create``: a pool that can run multi-instance MPI tasks."""

from __future__ import annotations

from typing import Any

import click

from mpilaunch.client import cliopts
from mpilaunch.client.pools import DEFAULT_IMAGE, DEFAULT_NODE_AGENT, DEFAULT_VM_SIZE, PoolSpec


@click.group()
def pool() -> None:
    """Manage Batch pools for MPI tasks."""


@pool.command()
@click.argument("pool_id")
@click.option("-n", "--nodes", type=int, default=2, show_default=True, help="Dedicated nodes.")
@click.option("--low-priority", type=int, default=0, show_default=True, help="Low-priority/spot nodes.")
@click.option("--vm-size", default=DEFAULT_VM_SIZE, show_default=True)
@click.option("--image", "image", default=":".join(DEFAULT_IMAGE), show_default=True,
              help="Marketplace image PUBLISHER:OFFER:SKU.")
@click.option("--node-agent", default=DEFAULT_NODE_AGENT, show_default=True, help="Node agent SKU id.")
@click.option("--container-image", multiple=True, help="Give the pool a container configuration and prefetch this "
                                                       "image (repeatable).")
@click.option("--start-task", help="StartTask command line (run as admin; Batch runs no shell).")
@click.option("--install-runtime", is_flag=True, help="Add a StartTask installing Open MPI, sshd and mpilaunch.")
@click.option("--package", default="mpilaunch", show_default=True, help="pip spec --install-runtime installs.")
@cliopts.connection_options
def create(**opts: Any) -> int:
    """Create POOL_ID with inter-node communication and one task slot per node (or grow it if it exists)."""
    from mpilaunch.client.pools import ensure_pool
    from node_runtime.errors import InvalidInput

    parts = tuple(opts["image"].split(":"))
    if len(parts) != 3 or not all(parts):
        raise InvalidInput(f"invalid --image {opts['image']!r}: expected PUBLISHER:OFFER:SKU")
    spec = PoolSpec(opts["pool_id"], opts["nodes"], opts["low_priority"], opts["vm_size"], parts,
                    opts["node_agent"], tuple(opts["container_image"]), opts["start_task"], opts["install_runtime"],
                    opts["package"]).validate()
    launch = cliopts.launcher(opts)
    with launch.errors():
        outcome = ensure_pool(launch.batch, spec)
    if opts["output"] == "json":
        cliopts.emit_json({"pool_id": spec.id, "outcome": outcome, "nodes": spec.nodes,
                           "low_priority_nodes": spec.low_priority_nodes})
    else:
        click.echo(f"pool {spec.id}: {outcome} ({spec.nodes} dedicated + {spec.low_priority_nodes} low-priority "
                   f"node(s), inter-node communication on, 1 task slot per node)")
    return 0
