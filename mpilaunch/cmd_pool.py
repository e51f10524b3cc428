"""``mpilaunch pool create``: a pool that can run multi-instance MPI tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mpilaunch.client import cliopts
from mpilaunch.client.pools import DEFAULT_CONTAINER_IMAGE, DEFAULT_IMAGE, DEFAULT_VM_SIZE, PoolSpec
from mpilaunch.emulator.defaults import KIND_VM


@click.group()
def pool() -> None:
    """Manage Batch pools for MPI tasks."""


@pool.command()
@click.argument("pool_id")
@click.option("-n", "--nodes", type=int, default=2, show_default=True, help="Dedicated nodes.")
@click.option("--spot", "--low-priority", "spot", type=click.IntRange(min=0), default=0, show_default=True,
              help="Spot (low-priority) nodes: cheaper, but Azure may preempt them, which requeues the whole task "
                   "running on them (checkpoint it: docs/checkpointing.md). Alias --low-priority.")
@click.option("--vm-size", default=DEFAULT_VM_SIZE, show_default=True)
@click.option("--image", help=f"Marketplace image PUBLISHER:OFFER:SKU [default: {DEFAULT_IMAGE.name}; with "
                              f"--container-image: {DEFAULT_CONTAINER_IMAGE.name}].")
@click.option("--node-agent", help="Node agent SKU id [default: the image's, for the images docs/azure.md lists].")
@click.option("--container-image", multiple=True, help="Give the pool a container configuration and prefetch this "
                                                       "image (repeatable).")
@click.option("--start-task", help="StartTask command line (run as admin; Batch runs no shell).")
@click.option("--install-runtime", is_flag=True,
              help="Add a StartTask installing Open MPI, sshd and this client's own version of the node runtime "
                   "(a wheel staged in Blob storage). With --local: VM-like nodes that really install it.")
@click.option("--runtime-wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The runtime wheel to install [default: built from this client's source tree].")
@cliopts.connection_options
def create(**opts: Any) -> int:
    """Create POOL_ID with inter-node communication and one task slot per node (or grow it if it exists)."""
    from mpilaunch.client.pools import ensure_pool

    spec = PoolSpec(opts["pool_id"], opts["nodes"], opts["spot"], opts["vm_size"], opts["image"],
                    opts["node_agent"], tuple(opts["container_image"]), opts["start_task"], opts["install_runtime"],
                    emulator_nodes=KIND_VM if opts["local"] and opts["install_runtime"] else None).validate()
    launch = cliopts.launcher(opts)
    runtime = launch.stage_runtime(opts["runtime_wheel"]) if spec.install_runtime else []
    with launch.errors():
        outcome = ensure_pool(launch.batch, spec, runtime)
    if opts["output"] == "json":
        cliopts.emit_json({"pool_id": spec.id, "outcome": outcome, "nodes": spec.nodes,
                           "low_priority_nodes": spec.low_priority_nodes, "image": ":".join(spec.image_reference),
                           "install_runtime": spec.install_runtime})
    else:
        click.echo(f"pool {spec.id}: {outcome} ({spec.nodes} dedicated + {spec.low_priority_nodes} Spot "
                   f"node(s) of {':'.join(spec.image_reference)}, inter-node communication on, 1 task slot per node"
                   f"{', runtime installed by the StartTask' if spec.install_runtime else ''})")
    if runtime and launch.store.max_sas_validity is not None:
        cliopts.note(f"the runtime's download links expire in {launch.store.max_sas_validity.days} days (Entra ID "
                     "user delegation SAS): nodes that start or reimage later fail their StartTask; use a storage "
                     "account key to sign them for a year")
    return 0
