"""The Azure CLI (`az batch`, azure-cli with its own azure-batch SDK and api-version 2024-02-01.19.0) drives the
emulator with a shared key: pools, jobs and tasks created, listed, shown, reset and deleted, a task's output
downloaded.

azure-cli is installed once into its own venv under .tools/azure-cli (pinned; ~1 minute from PyPI, 700 MB) by the
first run; the test is skipped, saying why, when it cannot be installed. ``az batch`` authenticates with a shared key
against any endpoint through ``AZURE_BATCH_ACCOUNT``/``AZURE_BATCH_ACCESS_KEY``/``AZURE_BATCH_ENDPOINT`` (or
``--account-name``/``--account-key``/``--account-endpoint``): no ``az login`` and no ``az batch account login``.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support.emulator import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

AZURE_CLI = "2.91.0"
TOOL = REPO / ".tools" / "azure-cli"


def install_azure_cli() -> Path:
    """``az`` of azure-cli :data:`AZURE_CLI` in .tools/azure-cli, installed if missing (one installer at a time)."""
    az = TOOL / "bin" / "az"
    stamp = TOOL / ".version"
    TOOL.parent.mkdir(parents=True, exist_ok=True)
    with (TOOL.parent / "azure-cli.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if az.exists() and stamp.exists() and stamp.read_text().strip() == AZURE_CLI:
            return az
        log = TOOL.parent / "azure-cli-install.log"
        with log.open("w") as out:
            ok = subprocess.run([sys.executable, "-m", "venv", str(TOOL)], stdout=out, stderr=out,
                                check=False).returncode == 0
            ok = ok and subprocess.run(
                [str(TOOL / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                 f"azure-cli=={AZURE_CLI}"], stdout=out, stderr=out, check=False, timeout=800).returncode == 0
        if not ok or not az.exists():
            tail = log.read_text(errors="replace")[-1500:]
            pytest.skip(f"azure-cli {AZURE_CLI} could not be installed into {TOOL}: {tail}")
        stamp.write_text(AZURE_CLI + "\n")
    return az


@pytest.fixture(scope="module")
def az(emulator, tmp_path_factory):
    exe = install_azure_cli()
    env = {**os.environ, "AZURE_CONFIG_DIR": str(tmp_path_factory.mktemp("azure-config")),
           "AZURE_CORE_COLLECT_TELEMETRY": "false", "AZURE_CORE_NO_COLOR": "true",
           "AZURE_BATCH_ACCOUNT": emulator.account, "AZURE_BATCH_ACCESS_KEY": emulator.key,
           "AZURE_BATCH_ENDPOINT": emulator.endpoint}

    def run(*args: str, check: bool = True) -> object:
        result = subprocess.run([str(exe), "batch", *args, "--only-show-errors", "-o", "json"], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        if check:
            assert result.returncode == 0, (args, result.stdout[-2000:], result.stderr[-2000:])
        elif result.returncode != 0:
            return result
        return json.loads(result.stdout) if result.stdout.strip() else None

    return run


def wait(what: str, predicate, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_az_batch_pool_job_task_lifecycle(az, tmp_path):
    tag = uuid.uuid4().hex[:6]
    pool, job, task = f"az-pool-{tag}", f"az-job-{tag}", f"az-task-{tag}"
    # pool: create (azure-cli sends targetDedicatedNodes as the string "1"), show, list, wait for its node
    az("pool", "create", "--id", pool, "--vm-size", "standard_d2s_v3", "--target-dedicated-nodes", "1",
       "--image", "canonical:ubuntu-24_04-lts:server", "--node-agent-sku-id", "batch.node.ubuntu 24.04",
       "--start-task-command-line", "/bin/true", "--metadata", "owner=az")
    assert az("pool", "show", "--pool-id", pool)["vmSize"] == "standard_d2s_v3"
    assert pool in [p["id"] for p in az("pool", "list")]
    wait("an idle node", lambda: [n["state"] for n in az("node", "list", "--pool-id", pool)] == ["idle"])
    # pool reset (Pool Replace): the StartTask it leaves out is removed, metadata replaced
    az("pool", "reset", "--pool-id", pool, "--application-package-references", "", "--metadata", "owner=cli")
    shown = az("pool", "show", "--pool-id", pool)
    assert shown.get("startTask") is None and shown["metadata"] == [{"name": "owner", "value": "cli"}]

    # job: create, show, list, reset (Job Update, a replace: priority back to 0)
    az("job", "create", "--id", job, "--pool-id", pool, "--priority", "7")
    assert az("job", "show", "--job-id", job)["priority"] == 7
    assert job in [j["id"] for j in az("job", "list")]
    az("job", "reset", "--job-id", job, "--pool-id", pool)
    assert az("job", "show", "--job-id", job)["priority"] == 0

    # task: create (constraints as strings: "PT01H00M00S", "2"), runs, show, list, files, download
    az("task", "create", "--job-id", job, "--task-id", task, "--command-line", "/bin/sh -c 'echo hello-from-az'",
       "--max-task-retry-count", "2", "--max-wall-clock-time", "PT1H")
    done = wait("the task completed",
                lambda: (t := az("task", "show", "--job-id", job, "--task-id", task))["state"] == "completed" and t)
    assert done["executionInfo"]["exitCode"] == 0 and done["constraints"]["maxTaskRetryCount"] == 2
    assert [t["id"] for t in az("task", "list", "--job-id", job)] == [task]
    names = {f["name"] for f in az("task", "file", "list", "--job-id", job, "--task-id", task)}
    assert {"stdout.txt", "stderr.txt"} <= names
    out = tmp_path / "stdout.txt"
    az("task", "file", "download", "--job-id", job, "--task-id", task, "--file-path", "stdout.txt",
       "--destination", str(out))
    assert out.read_text() == "hello-from-az\n"
    node = az("node", "list", "--pool-id", pool)[0]["id"]
    node_out = tmp_path / "node-stdout.txt"
    az("node", "file", "download", "--pool-id", pool, "--node-id", node, "--file-path",
       f"workitems/{job}/job-1/{task}/stdout.txt", "--destination", str(node_out))
    assert node_out.read_text() == "hello-from-az\n"

    # task reset (Task Update, a replace): constraints it leaves out go back to their defaults
    az("task", "reset", "--job-id", job, "--task-id", task, "--max-task-retry-count", "4")
    constraints = az("task", "show", "--job-id", job, "--task-id", task)["constraints"]
    assert constraints["maxTaskRetryCount"] == 4 and constraints["maxWallClockTime"] == "P10675199DT2H48M5.4775807S"

    # errors come back as Batch errors through az
    missing = az("task", "show", "--job-id", job, "--task-id", "nope", check=False)
    assert missing.returncode != 0 and "TaskNotFound" in missing.stderr

    # delete: task, job, pool; all gone
    az("task", "delete", "--job-id", job, "--task-id", task, "--yes")
    az("job", "delete", "--job-id", job, "--yes")
    az("pool", "delete", "--pool-id", pool, "--yes")
    wait("the job and pool gone", lambda: job not in [j["id"] for j in az("job", "list")]
         and pool not in [p["id"] for p in az("pool", "list")])
