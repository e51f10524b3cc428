"""``mpilaunch pool create|list|show|resize|delete``: pools that can run multi-instance MPI tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from mpilaunch.cli import cliopts
from mpilaunch.cli.confirm import confirm
from mpilaunch.cli.tabulate import Column, show_rows
from mpilaunch.client.pools import DEFAULT_CONTAINER_IMAGE, DEFAULT_IMAGE, DEFAULT_VM_SIZE, PoolSpec
from mpilaunch.emulator.defaults import KIND_VM
from node_runtime.errors import InvalidInput


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
@click.option("--ssh-from", multiple=True, metavar="PREFIX",
              help="Let this address prefix (CIDR, IP or service tag) reach the nodes by SSH, for `mpilaunch ssh` "
                   "(an inbound NAT pool for port 22; everyone else is denied). Repeatable.")
@click.option("--runtime-wheel", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The runtime wheel to install [default: built from this client's source tree].")
@cliopts.connection_options
def create(**opts: Any) -> int:
    """Create POOL_ID with inter-node communication and one task slot per node (or grow it if it exists)."""
    from mpilaunch.client.pools import ensure_pool

    spec = PoolSpec(opts["pool_id"], opts["nodes"], opts["spot"], opts["vm_size"], opts["image"],
                    opts["node_agent"], tuple(opts["container_image"]), opts["start_task"], opts["install_runtime"],
                    emulator_nodes=KIND_VM if opts["local"] and opts["install_runtime"] else None,
                    ssh_from=tuple(opts["ssh_from"])).validate()
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


POOL_COLUMNS: list[Column] = [
    ("pool", lambda r: r.id), ("state", lambda r: r.state), ("allocation", lambda r: r.allocation_state),
    ("vm size", lambda r: r.vm_size), ("dedicated", lambda r: f"{r.dedicated}/{r.target_dedicated}"),
    ("spot", lambda r: f"{r.spot}/{r.target_spot}"), ("created", lambda r: r.created)]


@pool.command("list")
@cliopts.connection_options
def list_(**opts: Any) -> int:
    """List the account's pools: state and nodes (current/target), dedicated and Spot."""
    from mpilaunch.client.inventory import pool_rows

    launch = cliopts.launcher(opts)
    with launch.errors():
        rows = pool_rows(launch.batch)
    show_rows(rows, POOL_COLUMNS, opts["output"], empty="no pools")
    return 0


@pool.command()
@click.argument("pool_id")
@cliopts.connection_options
def show(**opts: Any) -> int:
    """Show POOL_ID and each of its nodes."""
    from mpilaunch.client.inventory import pool_detail

    launch = cliopts.launcher(opts)
    with launch.errors():
        row = pool_detail(launch.batch, opts["pool_id"])
    if opts["output"] == "json":
        cliopts.emit_json(row.to_json())
        return 0
    show_rows([row], POOL_COLUMNS, "table", empty="")
    show_rows([_Node(n) for n in row.nodes], [("node", lambda n: n.doc["id"]), ("state", lambda n: n.doc["state"]),
                                               ("address", lambda n: n.doc["ip_address"]),
                                               ("spot", lambda n: "yes" if n.doc["spot"] else "")],
              "table", empty="no nodes")
    return 0


@pool.command()
@click.argument("pool_id")
@click.option("-n", "--nodes", type=click.IntRange(min=0), help="Target dedicated nodes.")
@click.option("--spot", "--low-priority", "spot", type=click.IntRange(min=0), help="Target Spot nodes.")
@click.option("--deallocation", type=click.Choice(["requeue", "terminate", "taskcompletion", "retaineddata"]),
              help="What happens to tasks on removed nodes [Batch's default: requeue].")
@cliopts.connection_options
def resize(**opts: Any) -> int:
    """Resize POOL_ID to --nodes dedicated and/or --spot nodes (the other count keeps its target)."""
    from azure.batch.models import BatchPoolResizeOptions

    if opts["nodes"] is None and opts["spot"] is None:
        raise InvalidInput("pool resize needs --nodes N and/or --spot N")
    launch = cliopts.launcher(opts)
    with launch.errors():
        current = launch.batch.get_pool(opts["pool_id"])
        dedicated = current.target_dedicated_nodes if opts["nodes"] is None else opts["nodes"]
        spot = current.target_low_priority_nodes if opts["spot"] is None else opts["spot"]
        launch.batch.begin_resize_pool(opts["pool_id"], BatchPoolResizeOptions(
            target_dedicated_nodes=dedicated, target_low_priority_nodes=spot,
            node_deallocation_option=opts["deallocation"]))
    if opts["output"] == "json":
        cliopts.emit_json({"pool_id": opts["pool_id"], "target_dedicated": dedicated, "target_spot": spot})
    else:
        click.echo(f"pool {opts['pool_id']}: resizing to {dedicated} dedicated + {spot} Spot node(s)")
    return 0


@pool.command()
@click.argument("pool_id")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--force", is_flag=True, help="Delete even while nodes run tasks (those tasks are requeued or lost).")
@cliopts.connection_options
def delete(**opts: Any) -> int:
    """Delete POOL_ID and its nodes (billing stops). Asks first unless --yes; refuses while nodes run tasks unless
    --force."""
    from mpilaunch.client.inventory import pool_detail

    launch = cliopts.launcher(opts)
    with launch.errors():
        row = pool_detail(launch.batch, opts["pool_id"])
    if row.busy_nodes and not opts["force"]:
        raise InvalidInput(f"pool {row.id} has {row.busy_nodes} node(s) running tasks; wait for them "
                           f"(`mpilaunch list --job JOB --state running`) or delete anyway with --force")
    confirm(f"delete pool {row.id} and its {len(row.nodes)} node(s)?", opts["yes"])
    with launch.errors():
        launch.batch.begin_delete_pool(row.id)
    if opts["output"] == "json":
        cliopts.emit_json({"pool_id": row.id, "deleting": True})
    else:
        click.echo(f"pool {row.id}: deleting")
    return 0


class _Node:
    """A node of ``pool show`` as a row."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc

    def to_json(self) -> dict[str, Any]:
        return self.doc
