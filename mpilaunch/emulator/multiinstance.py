"""Pure helpers of the engine: Batch paths, the environment Batch gives a task instance, subtask/failure records.

No I/O here: everything is a function of its arguments, so it is unit-tested exactly.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Doc = dict[str, Any]

UNLIMITED_SECONDS = 10675199 * 86400.0
"""Batch's 'no limit' duration (``P10675199DT2H48M5.4775807S``, .NET TimeSpan.MaxValue), roughly."""

_DURATION = re.compile(
    r"^P(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<m>\d+(?:\.\d+)?)M)?(?:(?P<s>\d+(?:\.\d+)?)S)?)?$"
)


def parse_duration(text: str | None) -> float | None:
    """Seconds of an ISO-8601 duration as Batch sends it (``PT1H30M``, ``P1DT2H``, ``PT0.5S``); ``None`` = no limit.

    Raises ``ValueError`` naming the text if it is not such a duration.
    """
    if text is None:
        return None
    match = _DURATION.match(text)
    if not match or text in ("P", "PT") or text.endswith("T"):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    parts = {k: float(v) for k, v in match.groupdict().items() if v}
    seconds = parts.get("d", 0) * 86400 + parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)
    return None if seconds >= UNLIMITED_SECONDS else seconds


def split_command(command_line: str) -> list[str]:
    """Split a Batch command line into argv (Batch runs no shell); ``ValueError`` names a bad line."""
    try:
        argv = shlex.split(command_line)
    except ValueError as exc:
        raise ValueError(f"cannot split command line {command_line!r}: {exc}") from exc
    if not argv:
        raise ValueError(f"empty command line {command_line!r}")
    return argv


def task_rel_dir(job_id: str, task_id: str) -> str:
    """The task directory relative to the node root, as Batch lays it out (``taskRootDirectory``)."""
    return f"workitems/{job_id}/job-1/{task_id}"


@dataclass(frozen=True)
class Instance:
    """One node of a (multi-instance) task run: index 0 is the primary (master)."""

    index: int
    node_id: str
    address: str


def _join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}"


def node_env(*, pool_id: str, node_id: str, node_root: str, dedicated: bool = True) -> dict[str, str]:
    """Variables Batch sets for every task on a node (StartTask included)."""
    return {
        "AZ_BATCH_POOL_ID": pool_id,
        "AZ_BATCH_NODE_ID": node_id,
        "AZ_BATCH_NODE_IS_DEDICATED": "true" if dedicated else "false",
        "AZ_BATCH_NODE_ROOT_DIR": node_root,
        "AZ_BATCH_NODE_SHARED_DIR": _join(node_root, "shared"),
        "AZ_BATCH_NODE_STARTUP_DIR": _join(node_root, "startup"),
        "AZ_BATCH_NODE_MOUNTS_DIR": _join(node_root, "fsmounts"),
    }


def settings(pairs: Iterable[Mapping[str, Any]] | None) -> dict[str, str]:
    """``environmentSettings`` (``[{"name", "value"}]``) as a dict; a missing value is the empty string."""
    return {str(p["name"]): str(p.get("value") or "") for p in pairs or ()}


def instance_env(
    *,
    account: str,
    account_url: str,
    pool_id: str,
    job_id: str,
    task_id: str,
    node_root: str,
    instances: Sequence[Instance],
    index: int,
    primary_port: int,
    multi_instance: bool,
    job_settings: Iterable[Mapping[str, Any]] | None = None,
    task_settings: Iterable[Mapping[str, Any]] | None = None,
    cores: int = 1,
    dedicated: bool = True,
) -> dict[str, str]:
    """The environment of instance ``index`` of a task, as Batch sets it.

    The user's settings (job's ``commonEnvironmentSettings``, overridden by the task's ``environmentSettings``)
    come first; the ``AZ_BATCH_*`` variables Batch defines win over them. Multi-instance tasks also get the host
    list variables, with the primary (index 0) as master.
    """
    me = instances[index]
    task_dir = _join(node_root, task_rel_dir(job_id, task_id))
    env = settings(job_settings) | settings(task_settings)
    env |= node_env(pool_id=pool_id, node_id=me.node_id, node_root=node_root, dedicated=dedicated)
    env |= {
        "AZ_BATCH_ACCOUNT_NAME": account,
        "AZ_BATCH_ACCOUNT_URL": account_url,
        "AZ_BATCH_JOB_ID": job_id,
        "AZ_BATCH_TASK_ID": task_id,
        "AZ_BATCH_TASK_DIR": task_dir,
        "AZ_BATCH_TASK_WORKING_DIR": _join(task_dir, "wd"),
        "AZ_BATCH_TASK_USER": "_azbatch",
        "AZ_BATCH_TASK_USER_IDENTITY": "PoolNonAdmin",
    }
    if multi_instance:
        addresses = [i.address for i in instances]
        master = instances[0].address
        env |= {
            "AZ_BATCH_HOST_LIST": ",".join(addresses),
            "AZ_BATCH_NODE_LIST": ";".join(addresses),
            "AZ_BATCH_MASTER_NODE": f"{master}:{primary_port}",
            "AZ_BATCH_IS_CURRENT_NODE_MASTER": "true" if index == 0 else "false",
            "AZ_BATCH_TASK_SHARED_DIR": task_dir,
            "CCP_NODES": " ".join([str(len(addresses)), *(f"{a} {cores}" for a in addresses)]),
        }
    return env


def node_info(*, account_url: str, pool_id: str, node_id: str, task_rel: str) -> Doc:
    """``BatchNodeInfo`` for a task or subtask that ran on ``node_id`` with its root at ``task_rel``."""
    node_url = f"{account_url.rstrip('/')}/pools/{pool_id}/nodes/{node_id}"
    return {
        "affinityId": f"TVM:{node_id}",
        "nodeUrl": node_url,
        "poolId": pool_id,
        "nodeId": node_id,
        "taskRootDirectory": task_rel,
        "taskRootDirectoryUrl": f"{node_url}/files/{task_rel}",
    }


def failure_info(code: str, message: str, *, category: str = "usererror",
                 details: Mapping[str, str] | None = None) -> Doc:
    """``BatchTaskFailureInfo`` (``category`` usererror|servererror, invariant ``code``, ``details`` pairs)."""
    info: Doc = {"category": category, "code": code, "message": message}
    if details:
        info["details"] = [{"name": k, "value": v} for k, v in details.items()]
    return info


def exit_failure(exit_code: int, what: str) -> Doc:
    """The failure info of a command that exited non-zero (``FailureExitCode``, as Batch reports it)."""
    return failure_info("FailureExitCode", "The task process exited with an unexpected exit code",
                        details={"Message": f"{what} exited with code {exit_code}"})


SUBTASK_ENDED = {
    "terminated": "The subtask was terminated because its task was terminated by user request",
    "timeout": "The subtask was terminated because its task exceeded its maxWallClockTime",
    "evicted": "The subtask was terminated because a node of its task was rebooted, reimaged, removed or had its "
               "scheduling disabled with the terminate option",
}
"""Why a subtask still running when its task was ended from outside was ended (``TaskEnded``), per outcome kind."""


def subtask_failure(kind: str, code: int | None, failure: Doc | None) -> Doc | None:
    """The ``failureInfo`` of a subtask when its task's attempt ends as ``kind`` (taskrun's ``Outcome.kind``), its
    coordination command having exited with ``code`` (None: it had not) or failed with ``failure``: its own failure;
    else ``TaskEnded`` when the task was terminated, timed out or evicted (a terminated instance is never a success:
    Batch terminates the subtasks of a terminated multi-instance task, REST spec ``Tasks_TerminateTask``; the subtask
    is then ``completed``, ``BatchSubtaskState``, with a failure, ``BatchSubtask.result``), or when it was killed
    before its coordination command ended; None (a success) otherwise."""
    if failure is not None:
        return failure
    if kind in SUBTASK_ENDED:
        return failure_info("TaskEnded", SUBTASK_ENDED[kind])
    if code is None and kind != "success":
        return failure_info("TaskEnded", "The subtask was ended because its task ended")
    return None


def multi_instance_blocker(pool: Mapping[str, Any], task: Mapping[str, Any]) -> str | None:
    """Why ``pool`` can never run the multi-instance ``task`` (it would stay active), or ``None`` if it can.

    Batch needs inter-node communication, one task slot per node, ``requiredSlots`` 1 and at least as many
    nodes as instances (target count; idle nodes are the scheduler's business).
    """
    wanted = int(task.get("multiInstanceSettings", {}).get("numberOfInstances", 1))
    nodes = int(pool.get("targetDedicatedNodes") or 0) + int(pool.get("targetLowPriorityNodes") or 0)
    if not pool.get("enableInterNodeCommunication"):
        return f"pool {pool['id']!r} does not have enableInterNodeCommunication"
    if int(pool.get("taskSlotsPerNode") or 1) != 1:
        return f"pool {pool['id']!r} has taskSlotsPerNode={pool.get('taskSlotsPerNode')}, multi-instance needs 1"
    if int(task.get("requiredSlots") or 1) != 1:
        return f"task {task['id']!r} has requiredSlots={task.get('requiredSlots')}, multi-instance needs 1"
    if wanted > nodes:
        return f"task {task['id']!r} needs {wanted} nodes, pool {pool['id']!r} targets {nodes}"
    return None
