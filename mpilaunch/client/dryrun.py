"""``submit --dry-run``: the exact Add Task body and the pool checks a submission would make, with no request sent.

Nothing is uploaded, signed or created: staged inputs show the blob names their content gives (``inputs/<md5>/...``)
with ``<read SAS>`` in place of a signature, and the secrets (the task secret, a registry password, a SAS in the
checkpoint location) are masked; a Blob checkpoint location without a SAS gets its SAS only at submission.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from mpilaunch.client import pools, storage, taskbuild
from mpilaunch.client.pools import PoolSpec
from mpilaunch.client.runtime import INSTALL_SCRIPT
from mpilaunch.client.spec import TaskSpec
from node_runtime.contract import CHECKPOINT_VARIABLE, RUNTIME_VERSION

HIDDEN = "<hidden>"


def pool_checks(spec: TaskSpec, pool: str) -> list[str]:
    """The checks :func:`mpilaunch.client.preflight.preflight` would make on ``pool`` for ``spec``, in words."""
    checks = [f"pool {pool} exists and is not being deleted",
              "it enables inter-node communication and has taskSlotsPerNode=1",
              f"it targets at least {spec.nodes} node(s) (dedicated + Spot), or autoscales (warning)",
              f"at least {spec.nodes} of its nodes are usable (none stuck in unusable, starttaskfailed, offline, "
              "unknown), with the first failed StartTask's stderr if not"]
    checks.append(f"it has a container configuration (the task runs in {spec.container.image})" if spec.container
                  else "it has no container configuration (the task runs on the host)")
    return checks


def dry_run(spec: TaskSpec, *, container_url: str | None, pool: str | None,
            auto_pool: PoolSpec | None = None) -> dict[str, Any]:
    """``{"task": <Add Task JSON>, "pool": ..., "pool_checks": [...], "job": ...}`` for ``spec``, offline
    (``container_url``: the configured Blob container's, if known); with ``auto_pool``, also ``"add_job"``: the Add
    Job JSON of the task's own job and pool."""
    spec = spec.validate()
    container = container_url or "https://<storage account>.blob.core.windows.net/<container>"
    staged = {kind: [storage.StagedFile(f"{container}/{f.blob_name}?<read SAS>", f.rel,
                                          "0755" if f.executable else None) for f in storage.walk_inputs(paths)]
              for kind, paths in (("common", spec.inputs), ("primary", spec.primary_inputs))}
    outputs = taskbuild.OutputTarget(f"{container}?<create+write SAS>", f"outputs/{spec.job_id}/{spec.task_id}")
    if spec.container and spec.container.registry and spec.container.registry.password:
        registry = dataclasses.replace(spec.container.registry, password=HIDDEN)
        spec = dataclasses.replace(spec, container=dataclasses.replace(spec.container, registry=registry))
    secret = taskbuild.new_task_secret()
    task = taskbuild.build_task(spec, common_files=staged["common"], primary_files=staged["primary"],
                                outputs=outputs if spec.inputs or spec.primary_inputs or spec.outputs
                                or spec.upload_logs else None, secret=secret)
    body = json.loads(taskbuild.request_body(task).decode().replace(secret, HIDDEN))
    for setting in body.get("environmentSettings", []):
        if setting["name"] == CHECKPOINT_VARIABLE and "?" in setting["value"]:  # a SAS the user gave
            setting["value"] = setting["value"].split("?")[0] + f"?{HIDDEN}"
    if auto_pool is not None:
        runtime = [storage.StagedFile(f"{container}/inputs/<md5>/{name}?<read SAS>", name)
                   for name in (f"mpilaunch-{RUNTIME_VERSION}-py3-none-any.whl", INSTALL_SCRIPT.name)]
        job = pools.auto_pool_job(spec.job_id, auto_pool, runtime if auto_pool.install_runtime else ())
        return {"job": spec.job_id, "pool": f"job {spec.job_id}'s own (autoPoolSpecification; deleted with the job)",
                "pool_checks": pool_checks(spec, "(the job's auto pool)"), "add_job": job.as_dict(), "task": body}
    chosen = pool or "<--pool or MPILAUNCH_POOL>"
    return {"job": spec.job_id, "pool": f"job {spec.job_id}'s pool if the job exists, else {chosen}",
            "pool_checks": pool_checks(spec, chosen), "task": body}
