"""Pre-flight: refuse a task the pool can never run (the causes of "the task stays active forever").

:func:`check_pool` is pure (a ``BatchPool`` model and the spec in, warnings out, :class:`PreflightError` raised);
:func:`preflight` fetches the pool first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mpilaunch.client.spec import TaskSpec
from node_runtime.errors import PreflightError


def check_pool(pool: Any, spec: TaskSpec) -> list[str]:
    """Raise :class:`PreflightError` if ``pool`` cannot run ``spec``; return warnings for doubtful cases."""
    pid = pool.id
    if not pool.enable_inter_node_communication:
        raise PreflightError(
            f"pool {pid!r} does not enable inter-node communication, which multi-instance tasks need",
            fix=f"create a pool with enableInterNodeCommunication=true, e.g. `mpilaunch pool create {pid}-mpi "
                f"--nodes {spec.nodes}` (the setting cannot be changed on an existing pool)")
    slots = pool.task_slots_per_node or 1
    if slots != 1:
        raise PreflightError(
            f"pool {pid!r} has taskSlotsPerNode={slots}; multi-instance tasks need 1",
            fix=f"use a pool with taskSlotsPerNode=1, e.g. `mpilaunch pool create {pid}-mpi --nodes {spec.nodes}`")
    if str(getattr(pool.state, "value", pool.state)).lower() == "deleting":
        raise PreflightError(f"pool {pid!r} is being deleted", fix="use or create another pool")
    warnings = _check_size(pool, spec)
    _check_container(pool, spec)
    return warnings


def _check_size(pool: Any, spec: TaskSpec) -> list[str]:
    pid, n = pool.id, spec.nodes
    if pool.enable_auto_scale:
        return [f"pool {pid!r} autoscales: the task waits until the formula gives it {n} nodes "
                f"(check that it can)"]
    target = (pool.target_dedicated_nodes or 0) + (pool.target_low_priority_nodes or 0)
    if target < n:
        raise PreflightError(
            f"pool {pid!r} targets {target} node(s) (dedicated {pool.target_dedicated_nodes or 0} + low-priority "
            f"{pool.target_low_priority_nodes or 0}) but the task needs {n}",
            fix=f"resize the pool to at least {n} nodes, or run on {target} node(s) (--nodes {target})")
    warnings = []
    current = (pool.current_dedicated_nodes or 0) + (pool.current_low_priority_nodes or 0)
    if current < n:
        warnings.append(f"pool {pid!r} has {current} of its {target} node(s) so far; the task waits for {n}")
    if pool.target_low_priority_nodes:
        then = ("it resumes from its --checkpoint" if spec.checkpoint_url else
                "it starts over unless it checkpoints its work (--checkpoint, see docs/checkpointing.md)")
        warnings.append(f"pool {pid!r} has {pool.target_low_priority_nodes} Spot/low-priority node(s): if Azure "
                        f"preempts one, Batch requeues the whole multi-instance task (without using a retry) and "
                        f"{then}")
    return warnings


def _check_container(pool: Any, spec: TaskSpec) -> None:
    vmc = pool.virtual_machine_configuration
    config = vmc.container_configuration if vmc is not None else None
    pid = pool.id
    if spec.container is not None and config is None:
        raise PreflightError(
            f"the task runs in container image {spec.container.image!r} but pool {pid!r} has no container "
            f"configuration",
            fix=f"create the pool with a container configuration, e.g. `mpilaunch pool create {pid}-mpi --nodes "
                f"{spec.nodes} --container-image {spec.container.image}`")
    if spec.container is None and config is not None:
        raise PreflightError(
            f"pool {pid!r} has a container configuration, so Batch requires every task to name a container image",
            fix="pass --image IMAGE (one of the pool's: "
                f"{', '.join(config.container_image_names or []) or 'none prefetched'})")


# Node states in which a node will not run tasks until someone acts (reboot, reimage, enable scheduling, remove).
STUCK_STATES = ("unusable", "starttaskfailed", "offline", "unknown")
STDERR_LINES = 10


def check_nodes(pool: Any, states: list[str], spec: TaskSpec, why: Sequence[str] = ()) -> None:
    """Refuse if too few of the pool's nodes can ever run the task (the others are stuck in :data:`STUCK_STATES`);
    ``why`` (from :func:`start_task_failure`) details the refusal."""
    if pool.enable_auto_scale:
        return
    stuck = [s for s in states if s in STUCK_STATES]
    target = (pool.target_dedicated_nodes or 0) + (pool.target_low_priority_nodes or 0)
    if stuck and target - len(stuck) < spec.nodes:
        counts = ", ".join(f"{stuck.count(s)} {s}" for s in STUCK_STATES if s in stuck)
        raise PreflightError(
            f"pool {pool.id!r} has only {target - len(stuck)} usable node(s) for a task that needs {spec.nodes} "
            f"({counts})",
            fix="look at the nodes' errors (start task output, `az batch node show`), then reboot/reimage or remove "
                "them, or enable scheduling on offline nodes", details=why)


def start_task_failure(client: Any, pool_id: str, node: Any, lines: int = STDERR_LINES) -> list[str]:
    """Why ``node``'s StartTask failed: its exit code or failure, and the tail of its stderr (from the node's
    ``startup/stderr.txt``, through the file API)."""
    from azure.core.exceptions import HttpResponseError

    info = node.start_task_info
    failure = getattr(info, "failure_info", None) if info is not None else None
    said = f"exit code {info.exit_code}" if info is not None and info.exit_code is not None else "no exit code"
    if failure is not None:
        said += f", {failure.code}: {failure.message}"
    why = [f"node {node.id}: the StartTask failed ({said}); the end of its stderr:"]
    try:
        text = b"".join(client.download_node_file(pool_id, node.id, "startup/stderr.txt")).decode(errors="replace")
    except HttpResponseError as exc:
        return [*why, f"  (cannot read startup/stderr.txt: {exc.reason})"]
    return why + [f"  {line}" for line in text.strip().splitlines()[-lines:]]


def preflight(client: Any, pool_id: str, spec: TaskSpec) -> list[str]:
    """Fetch pool ``pool_id`` and its nodes, and check them (:func:`check_pool`, :func:`check_nodes`, with the
    first failed StartTask's reason)."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        pool = client.get_pool(pool_id)
    except ResourceNotFoundError:
        raise PreflightError(f"pool {pool_id!r} does not exist",
                             fix=f"create it: `mpilaunch pool create {pool_id} --nodes {spec.nodes}`") from None
    warnings = check_pool(pool, spec)
    nodes = list(client.list_nodes(pool_id, select=["id", "state", "startTaskInfo"]))
    states = [str(getattr(n.state, "value", n.state)) for n in nodes]
    failed = [n for n, state in zip(nodes, states, strict=True) if state == "starttaskfailed"]
    check_nodes(pool, states, spec, start_task_failure(client, pool_id, failed[0]) if failed else ())
    return warnings
