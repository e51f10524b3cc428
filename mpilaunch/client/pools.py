"""Pools able to run multi-instance MPI tasks: inter-node communication on, one task slot per node.

:func:`build_pool` is pure; :func:`ensure_pool` creates (or grows) a pool through a ``BatchClient``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from mpilaunch.client.spec import check_id
from node_runtime.errors import InvalidInput

# Ubuntu 22.04 LTS, the marketplace image Batch documents for Linux MPI pools.
DEFAULT_IMAGE = ("canonical", "0001-com-ubuntu-server-jammy", "22_04-lts")
DEFAULT_NODE_AGENT = "batch.node.ubuntu 22.04"
DEFAULT_VM_SIZE = "standard_d2s_v3"
RUNTIME_PACKAGES = "openmpi-bin libopenmpi-dev openssh-server python3-pip python3-venv"


@dataclass(frozen=True)
class PoolSpec:
    """A pool for MPI tasks. ``install_runtime`` adds a StartTask that installs Open MPI, sshd and mpilaunch."""

    id: str
    nodes: int = 0
    low_priority_nodes: int = 0
    vm_size: str = DEFAULT_VM_SIZE
    image: tuple[str, str, str] = DEFAULT_IMAGE
    node_agent_sku: str = DEFAULT_NODE_AGENT
    container_images: tuple[str, ...] = ()
    start_task: str | None = None
    install_runtime: bool = False
    package: str = "mpilaunch"

    def validate(self) -> PoolSpec:
        check_id("pool", self.id)
        if self.nodes < 0 or self.low_priority_nodes < 0 or self.nodes + self.low_priority_nodes < 1:
            raise InvalidInput(f"a pool needs at least one node (dedicated={self.nodes}, "
                               f"low-priority={self.low_priority_nodes})")
        if self.start_task is not None and self.install_runtime:
            raise InvalidInput("give either a start task command or --install-runtime, not both")
        return self


def runtime_start_task_command(package: str) -> str:
    """A StartTask command line installing Open MPI, sshd and ``package`` (pip spec) on an Ubuntu node."""
    script = (f"set -e; export DEBIAN_FRONTEND=noninteractive; apt-get update -q; "
              f"apt-get install -yq --no-install-recommends {RUNTIME_PACKAGES}; "
              f"python3 -m venv /opt/mpilaunch; /opt/mpilaunch/bin/pip install -q {shlex.quote(package)}; "
              f"ln -sf /opt/mpilaunch/bin/node-runtime /usr/local/bin/node-runtime")
    return shlex.join(["/bin/bash", "-c", script])


def build_pool(spec: PoolSpec) -> Any:
    """The ``BatchPoolCreateOptions`` for ``spec``."""
    from azure.batch import models as bm

    spec.validate()
    container = None
    if spec.container_images:
        container = bm.BatchContainerConfiguration(type="dockerCompatible",
                                                   container_image_names=list(spec.container_images))
    command = runtime_start_task_command(spec.package) if spec.install_runtime else spec.start_task
    start_task = None
    if command:
        start_task = bm.BatchStartTask(
            command_line=command, wait_for_success=True, max_task_retry_count=2,
            user_identity=bm.UserIdentity(auto_user=bm.AutoUserSpecification(scope="pool", elevation_level="admin")))
    publisher, offer, sku = spec.image
    return bm.BatchPoolCreateOptions(
        id=spec.id,
        vm_size=spec.vm_size,
        virtual_machine_configuration=bm.VirtualMachineConfiguration(
            image_reference=bm.BatchVmImageReference(publisher=publisher, offer=offer, sku=sku, version="latest"),
            node_agent_sku_id=spec.node_agent_sku,
            container_configuration=container,
        ),
        target_dedicated_nodes=spec.nodes,
        target_low_priority_nodes=spec.low_priority_nodes,
        enable_inter_node_communication=True,
        task_slots_per_node=1,
        start_task=start_task,
    )


def ensure_pool(client: Any, spec: PoolSpec) -> str:
    """Create the pool unless it exists; grow a fixed-size pool whose dedicated target is below ``spec.nodes``.

    Returns ``"created"``, ``"resized"`` or ``"exists"``.
    """
    from azure.batch import models as bm
    from azure.core.exceptions import ResourceNotFoundError

    try:
        pool = client.get_pool(spec.id)
    except ResourceNotFoundError:
        client.create_pool(build_pool(spec))
        return "created"
    if not pool.enable_auto_scale and (pool.target_dedicated_nodes or 0) < spec.nodes:
        client.begin_resize_pool(spec.id, bm.BatchPoolResizeOptions(
            target_dedicated_nodes=spec.nodes, target_low_priority_nodes=pool.target_low_priority_nodes or 0,
        ), polling_interval=1).result()
        return "resized"
    return "exists"
