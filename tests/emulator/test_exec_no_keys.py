"""Nothing Batch's file APIs serve holds a private key or the task secret: every task file and every file of every node
of the pool, listed recursively and downloaded with the real azure-batch SDK over HTTP, while the coordination
services run and after a real MPI job; the keys live outside the node root, and go with the services."""

from __future__ import annotations

import base64
import re
import secrets
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from mpilaunch.emulator.nodes.process import isolation_available
from tests.support.azurite import free_port
from tests.support.exec_engine import py, wait_for
from tests.support.exec_sdk import Batch, add_mi_task, completed, probe_ranks

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(240)]
PROBE = Path(__file__).resolve().parents[1] / "programs" / "mpi_probe.py"
KEY_MARKS = (b"PRIVATE KEY", b"openssh-key-v1")
SLEEP = py("import time; open('running', 'w').close(); time.sleep(300)")
"""A command line that marks its start in the working dir, then sleeps (the services keep running meanwhile)."""


@pytest.fixture(autouse=True)
def _needs_sshd() -> None:
    if shutil.which("ssh") is None or not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        pytest.skip("ssh/sshd missing: run scripts/setup")


def task_env(nodes: int) -> tuple[dict[str, str], str]:
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    return {"AZ_BATCH_NODE_COUNT": str(nodes), "MPILAUNCH_TASK_SECRET": secret,
            "MPILAUNCH_SSH_PORT": str(free_port())}, secret


def _download(download: Any, *args: str) -> bytes | None:
    try:
        return b"".join(download(*args))
    except ResourceNotFoundError:  # gone since the listing (a lock file, a session dir being removed)
        return None


def served_files(client: Any, pool_id: str, job_id: str, task_id: str) -> dict[str, bytes]:
    """Every file the file APIs list for the task (recursively) and for each node of the pool (its whole root:
    the subtasks' dirs, the shared and startup dirs), downloaded; keyed by where it was served."""
    found: dict[str, bytes] = {}
    for f in client.list_task_files(job_id, task_id, recursive=True):
        if not f.is_directory and (data := _download(client.download_task_file, job_id, task_id, f.name)) is not None:
            found[f"task {task_id}: {f.name}"] = data
    for node in client.list_nodes(pool_id):
        for f in client.list_node_files(pool_id, node.id, recursive=True):
            if not f.is_directory and (data := _download(client.download_node_file, pool_id, node.id,
                                                         f.name)) is not None:
                found[f"node {node.id}: {f.name}"] = data
    return found


def assert_no_key_and_no_secret(files: dict[str, bytes], secret: str) -> None:
    with_keys = [name for name, data in files.items() if any(mark in data for mark in KEY_MARKS)]
    assert not with_keys, f"the file APIs serve private keys: {with_keys}"
    with_secret = [name for name, data in files.items() if secret.encode() in data or secret in name]
    assert not with_secret, f"the file APIs serve the task secret: {with_secret}"


def key_dirs(files: dict[str, bytes]) -> list[Path]:
    """The key dirs the nodes' services use, as their sshd_config (served: it holds no secret) names them."""
    configs = [data.decode() for name, data in files.items() if name.endswith("/.mpilaunch/sshd_config")]
    return [Path(found[1]).parent for config in configs if (found := re.search(r"^HostKey (\S+)$", config, re.M))]


def test_no_key_is_served_while_the_services_run(batch: Batch, emulator: Any) -> None:
    client = batch.client
    pool_id = batch.pool(2)
    job_id = batch.job(pool_id)
    env, secret = task_env(2)
    task_id = add_mi_task(client, job_id, SLEEP, "node-runtime coordinate", instances=2, env=env)
    wait_for(lambda: any(f.name == "wd/running" for f in client.list_task_files(job_id, task_id, recursive=True)),
             60, "the command line running (coordination done on both nodes)")
    files = served_files(client, pool_id, job_id, task_id)
    assert sum(name.endswith("/.mpilaunch/sshd.pid") for name in files) == 2, sorted(files)
    assert_no_key_and_no_secret(files, secret)
    private = key_dirs(files)
    roots = [emulator.data_dir / "nodes" / pool_id / n.id for n in client.list_nodes(pool_id)]
    assert len(private) == 2 and all(d.is_dir() for d in private), "the live services' keys are elsewhere"
    assert not any(d.is_relative_to(root) for d in private for root in roots)
    for name, data in files.items():  # the services' sshd never had the secret in its environment
        if name.endswith("/.mpilaunch/sshd.pid"):
            assert secret.encode() not in Path(f"/proc/{int(data)}/environ").read_bytes()
    client.terminate_task(job_id, task_id)
    completed(client, job_id, task_id, 30)
    assert_no_key_and_no_secret(served_files(client, pool_id, job_id, task_id), secret)


def test_no_key_is_served_and_none_is_left_after_an_mpi_job(batch: Batch) -> None:
    if not isolation_available() or shutil.which("mpirun") is None:
        pytest.skip("mpirun across emulated nodes needs root, unshare and Open MPI")
    client = batch.client
    pool_id = batch.pool(3)
    job_id = batch.job(pool_id)
    env, secret = task_env(3)
    launch = shlex.join(["node-runtime", "launch", "--", sys.executable, str(PROBE), "--env"])
    task_id = add_mi_task(client, job_id, launch, "node-runtime coordinate", instances=3, env=env)
    _, ranks = probe_ranks(client, job_id, task_id)
    assert sorted(r["rank"] for r in ranks) == [0, 1, 2]
    files = served_files(client, pool_id, job_id, task_id)
    assert any(name.endswith("wd/launch-report.json") for name in files), sorted(files)
    assert_no_key_and_no_secret(files, secret)
    private = key_dirs(files)
    assert len(private) == 3
    wait_for(lambda: not any(d.exists() for d in private), 10, "every node's keys removed with its service")
