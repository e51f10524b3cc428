"""Pools able to run multi-instance MPI tasks: inter-node communication on, one task slot per node.

:func:`build_pool` is pure; :func:`ensure_pool` creates (or grows) a pool through a ``BatchClient``. The VM images
we know (:data:`IMAGES`, see docs/azure.md for the sources) decide the node agent, whether Batch can run containers
on them and whether ``--install-runtime`` can serve them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mpilaunch.client.runtime import INSTALL_SCRIPT, start_task_command
from mpilaunch.client.spec import check_id
from mpilaunch.emulator.defaults import KIND_METADATA
from node_runtime.errors import InvalidInput

if TYPE_CHECKING:
    from mpilaunch.client.storage import StagedFile

MIN_PYTHON = (3, 10)  # node_runtime's oldest Python (pyproject requires-python)


@dataclass(frozen=True)
class Image:
    """A marketplace VM image as Batch offers it, and what we know of it."""

    publisher: str
    offer: str
    sku: str
    node_agent: str
    python: tuple[int, int]
    """The version of the image's ``python3`` (the one ``--install-runtime`` installs the runtime with)."""
    containers: bool
    """Whether Batch lists it as able to run container workloads (capability ``DockerCompatible``)."""

    @property
    def name(self) -> str:
        return f"{self.publisher}:{self.offer}:{self.sku}"


UBUNTU_2404 = Image("canonical", "ubuntu-24_04-lts", "server", "batch.node.ubuntu 24.04", (3, 12), False)
UBUNTU_2204 = Image("canonical", "0001-com-ubuntu-server-jammy", "22_04-lts", "batch.node.ubuntu 22.04", (3, 10),
                    False)
UBUNTU_HPC_2404 = Image("microsoft-dsvm", "ubuntu-hpc", "2404", "batch.node.ubuntu 24.04", (3, 12), True)
UBUNTU_HPC_2204 = Image("microsoft-dsvm", "ubuntu-hpc", "2204", "batch.node.ubuntu 22.04", (3, 10), True)
UBUNTU_2004 = Image("canonical", "0001-com-ubuntu-server-focal", "20_04-lts", "batch.node.ubuntu 20.04", (3, 8),
                    False)
IMAGES = {i.name: i for i in (UBUNTU_2404, UBUNTU_2204, UBUNTU_HPC_2404, UBUNTU_HPC_2204, UBUNTU_2004)}
DEFAULT_IMAGE = UBUNTU_2404
DEFAULT_CONTAINER_IMAGE = UBUNTU_HPC_2404
DEFAULT_VM_SIZE = "standard_d2s_v3"


@dataclass(frozen=True)
class PoolSpec:
    """A pool for MPI tasks. ``install_runtime`` adds a StartTask installing Open MPI, sshd and this client's runtime
    wheel; ``image`` is ``PUBLISHER:OFFER:SKU`` (default: :data:`DEFAULT_IMAGE`, or :data:`DEFAULT_CONTAINER_IMAGE`
    with container images); ``node_agent`` defaults to the image's."""

    id: str
    nodes: int = 0
    low_priority_nodes: int = 0
    vm_size: str = DEFAULT_VM_SIZE
    image: str | None = None
    node_agent: str | None = None
    container_images: tuple[str, ...] = ()
    start_task: str | None = None
    install_runtime: bool = False
    emulator_nodes: str | None = None
    """Pool metadata :data:`~mpilaunch.emulator.defaults.KIND_METADATA` for the local emulator (``vm``: VM-like
    nodes, bare OS containers), or none; Azure gives metadata no meaning (``BatchPool.metadata``)."""
    ssh_from: tuple[str, ...] = ()
    """Source address prefixes (CIDR, an IP or a service tag) allowed to reach the nodes' SSH port through an
    inbound NAT pool (``mpilaunch ssh``); none: no NAT pool, so no SSH from outside the pool's network."""

    @property
    def image_reference(self) -> tuple[str, str, str]:
        name = self.image or (DEFAULT_CONTAINER_IMAGE if self.container_images else DEFAULT_IMAGE).name
        parts = name.split(":")
        if len(parts) != 3 or not all(parts):
            raise InvalidInput(f"invalid image {name!r}: expected PUBLISHER:OFFER:SKU")
        publisher, offer, sku = parts
        return publisher, offer, sku

    @property
    def known_image(self) -> Image | None:
        return IMAGES.get(":".join(self.image_reference).lower())

    @property
    def node_agent_sku(self) -> str:
        if self.node_agent:
            return self.node_agent
        if self.known_image is None:
            raise InvalidInput(f"image {':'.join(self.image_reference)!r} is not one we know the node agent of: "
                               f"give --node-agent (`az batch pool supported-images list` lists them)")
        return self.known_image.node_agent

    def validate(self) -> PoolSpec:
        """Raise :class:`InvalidInput` naming the value if Batch or the image could not serve this pool."""
        check_id("pool", self.id)
        if self.nodes < 0 or self.low_priority_nodes < 0 or self.nodes + self.low_priority_nodes < 1:
            raise InvalidInput(f"a pool needs at least one node (dedicated={self.nodes}, "
                               f"low-priority={self.low_priority_nodes})")
        if self.start_task is not None and self.install_runtime:
            raise InvalidInput("give either a start task command or --install-runtime, not both")
        image, name = self.known_image, ":".join(self.image_reference)
        if self.container_images and self.install_runtime:
            raise InvalidInput("--install-runtime installs the runtime on the VM, but container tasks run the "
                               "container image's: build the task image (scripts/build-image) instead")
        if self.container_images and image is not None and not image.containers:
            raise InvalidInput(f"image {name!r} cannot run containers on Batch (it is not DockerCompatible): use "
                               f"{DEFAULT_CONTAINER_IMAGE.name} (the default for container pools)")
        if self.install_runtime and image is not None and image.python < MIN_PYTHON:
            raise InvalidInput(
                f"image {name!r} has Python {'.'.join(map(str, image.python))}, but the node runtime needs "
                f">= {'.'.join(map(str, MIN_PYTHON))}: use {DEFAULT_IMAGE.name} or {UBUNTU_2204.name}")
        self.node_agent_sku  # noqa: B018 - raises for an unknown image without --node-agent
        bad = [p for p in self.ssh_from if not _SOURCE_PREFIX.fullmatch(p)]
        if bad:
            raise InvalidInput(f"--ssh-from {bad[0]!r} is not an address prefix (an IP, a CIDR such as "
                               "203.0.113.0/24, or a service tag such as Internet)")
        if len(self.ssh_from) > MAX_SSH_RULES:
            raise InvalidInput(f"--ssh-from is given {len(self.ssh_from)} times: a pool takes at most "
                               f"{MAX_SSH_RULES} (Batch allows 25 rules, one is the final deny)")
        return self


def build_pool(spec: PoolSpec, runtime_files: Sequence[StagedFile] = ()) -> Any:
    """The ``BatchPoolCreateOptions`` for ``spec``; ``runtime_files`` (the runtime wheel and the install script,
    staged) are needed with ``install_runtime``."""
    from azure.batch import models as bm

    spec.validate()
    container = None
    if spec.container_images:
        container = bm.BatchContainerConfiguration(type="dockerCompatible",
                                                   container_image_names=list(spec.container_images))
    start_task = None
    if spec.install_runtime:
        start_task = runtime_start_task(runtime_files)
    elif spec.start_task:
        start_task = bm.BatchStartTask(command_line=spec.start_task, wait_for_success=True, max_task_retry_count=2,
                                       user_identity=_admin())
    publisher, offer, sku = spec.image_reference
    metadata = None
    if spec.emulator_nodes:
        metadata = [bm.BatchMetadataItem(name=KIND_METADATA, value=spec.emulator_nodes)]
    return bm.BatchPoolCreateOptions(
        id=spec.id,
        network_configuration=ssh_network(spec.ssh_from, spec.nodes + spec.low_priority_nodes),
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
        metadata=metadata,
    )


SSH_FRONTEND_START = 40000  # frontend ports; Batch reserves 50000-55000
MAX_SSH_RULES = 24
_SOURCE_PREFIX = re.compile(r"[0-9A-Za-z.:/*_-]{1,80}")


def ssh_network(sources: Sequence[str], nodes: int) -> Any:
    """A network configuration whose inbound NAT pool maps each node's port 22 to a frontend port (a range of at
    least 40 and of one per node), allowing ``sources`` and denying everyone else; ``None`` without sources.
    Batch no longer maps SSH by default (docs/azure.md [ENDPOINTS])."""
    from azure.batch import models as bm

    if not sources:
        return None
    rules = [bm.NetworkSecurityGroupRule(priority=150 + i, access="allow", source_address_prefix=source)
             for i, source in enumerate(sources)]
    rules.append(bm.NetworkSecurityGroupRule(priority=4095, access="deny", source_address_prefix="*"))
    end = SSH_FRONTEND_START + max(40, nodes) - 1
    return bm.NetworkConfiguration(endpoint_configuration=bm.BatchPoolEndpointConfiguration(inbound_nat_pools=[
        bm.BatchInboundNatPool(name="ssh", protocol="tcp", backend_port=22, frontend_port_range_start=
                               SSH_FRONTEND_START, frontend_port_range_end=end, network_security_group_rules=rules)]))


def _admin() -> Any:
    from azure.batch import models as bm

    return bm.UserIdentity(auto_user=bm.AutoUserSpecification(scope="pool", elevation_level="admin"))


def runtime_start_task(files: Sequence[StagedFile]) -> Any:
    """The StartTask installing the runtime: the install script on the staged wheel, as the pool's admin user,
    waited for (tasks never start on a node without the runtime), retried twice (apt mirrors fail at times)."""
    from azure.batch import models as bm

    from mpilaunch.client.taskbuild import resource_files

    names = {f.file_path for f in files}
    wheels = sorted(n for n in names if n.endswith(".whl"))
    if INSTALL_SCRIPT.name not in names or len(wheels) != 1:
        raise InvalidInput(f"the runtime StartTask needs {INSTALL_SCRIPT.name} and one wheel; got {sorted(names)}")
    return bm.BatchStartTask(command_line=start_task_command(wheels[0]), resource_files=resource_files(files),
                             wait_for_success=True, max_task_retry_count=2, user_identity=_admin())


def ensure_pool(client: Any, spec: PoolSpec, runtime_files: Sequence[StagedFile] = ()) -> str:
    """Create the pool unless it exists; grow a fixed-size pool whose dedicated or Spot target is below the spec's.

    Returns ``"created"``, ``"resized"`` or ``"exists"``.
    """
    from azure.batch import models as bm
    from azure.core.exceptions import ResourceNotFoundError

    try:
        pool = client.get_pool(spec.id)
    except ResourceNotFoundError:
        client.create_pool(build_pool(spec, runtime_files))
        return "created"
    dedicated, spot = pool.target_dedicated_nodes or 0, pool.target_low_priority_nodes or 0
    if not pool.enable_auto_scale and (dedicated < spec.nodes or spot < spec.low_priority_nodes):
        client.begin_resize_pool(spec.id, bm.BatchPoolResizeOptions(
            target_dedicated_nodes=max(dedicated, spec.nodes),
            target_low_priority_nodes=max(spot, spec.low_priority_nodes),
        ), polling_interval=1).result()
        return "resized"
    return "exists"


AUTO_POOL_PREFIX = "mpilaunch"  # Batch appends a unique id to it (autoPoolIdPrefix: up to 20 characters)


def auto_pool_job(job_id: str, spec: PoolSpec, runtime_files: Sequence[StagedFile] = ()) -> Any:
    """A ``BatchJobCreateOptions`` whose job gets a pool of its own (``autoPoolSpecification``, lifetime ``job``,
    not kept alive): Batch creates the pool with the job and deletes it when the job completes. The job starts with
    ``onAllTasksComplete: noaction``; set it to ``terminatejob`` once the task is added (Batch's advice: a job with
    no task yet counts as having all its tasks complete)."""
    from azure.batch import models as bm

    pool = build_pool(spec, runtime_files).as_dict()
    pool.pop("id")
    return bm.BatchJobCreateOptions(
        id=job_id, all_tasks_complete_mode="noaction",
        pool_info=bm.BatchPoolInfo(auto_pool_specification=bm.BatchAutoPoolSpecification(
            auto_pool_id_prefix=AUTO_POOL_PREFIX, pool_lifetime_option="job", keep_alive=False,
            pool=bm.BatchPoolSpecification(pool))))


def as_pool(spec: PoolSpec) -> Any:
    """The ``BatchPool`` that ``spec`` will give, with all its nodes (to run the pre-flight checks before the pool
    exists)."""
    from azure.batch import models as bm

    return bm.BatchPool({**build_pool(spec).as_dict(), "currentDedicatedNodes": spec.nodes,
                         "currentLowPriorityNodes": spec.low_priority_nodes})
