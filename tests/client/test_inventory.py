"""``mpilaunch pool list|show|resize|delete``, ``job list|delete`` and ``list`` through the CLI against the emulator."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher
from mpilaunch.client.local import LocalState
from tests.client.conftest import new_task_id

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(240)]


def mpl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, "mpilaunch", list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def doc(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    code, out, err = mpl(capsys, *args, "--local", "--output", "json")
    assert code == 0, err
    return json.loads(out)


def test_pools_jobs_and_tasks_listed_resized_and_deleted(local_services: LocalState,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    pools = doc(capsys, "pool", "list")
    assert isinstance(pools, list)
    local = next(p for p in pools if p["id"] == "local")
    assert local["target_dedicated"] >= 2 and local["state"] == "active"
    shown = doc(capsys, "pool", "show", "local")
    assert isinstance(shown, dict) and len(shown["nodes"]) >= 2  # the counts may still be catching up (resizing)
    code, out, err = mpl(capsys, "pool", "show", "local", "--local")
    assert code == 0 and "local" in out and "idle" in out, err

    done, other = new_task_id("listed"), new_task_id("other")
    code, _, err = mpl(capsys, "run", "--local", "-n", "2", "--task-id", done, "--timeout", "120", "--", "hostname")
    assert code == 0, err
    code, _, err = mpl(capsys, "run", "--local", "-n", "2", "--job", "scratch-job", "--task-id", other,
                       "--timeout", "120", "--", "hostname")
    assert code == 0, err
    tasks = doc(capsys, "list")
    assert isinstance(tasks, list)
    row = next(t for t in tasks if t["id"] == done)
    assert row["state"] == "completed" and row["instances"] == 2 and row["result"] == "success"
    assert row["exit_code"] == 0 and row["duration_s"] is not None
    assert all(t["id"] != other for t in tasks)  # another job's
    assert doc(capsys, "list", "--state", "running") == []
    code, out, err = mpl(capsys, "list", "--local")
    assert code == 0 and done in out and "success" in out, err
    code, _, err = mpl(capsys, "list", "--local", "--state", "bogus")
    assert code == 2 and "bogus" in err

    jobs = doc(capsys, "job", "list", "--pool", "local")
    assert isinstance(jobs, list) and {"mpilaunch", "scratch-job"} <= {j["id"] for j in jobs}
    code, _, err = mpl(capsys, "job", "delete", "scratch-job", "--local")  # stdin is not a terminal: no prompt
    assert code == 2 and "--yes" in err
    code, out, err = mpl(capsys, "job", "delete", "scratch-job", "--local", "--yes")
    assert code == 0 and "deleting (1 task(s))" in out, err
    assert all(j["id"] != "scratch-job" or j["state"] == "deleting" for j in doc(capsys, "job", "list"))

    code, out, err = mpl(capsys, "pool", "resize", "local", "--local", "-n", str(local["target_dedicated"] + 1))
    assert code == 0 and "resizing" in out, err
    assert doc(capsys, "pool", "show", "local")["target_dedicated"] == local["target_dedicated"] + 1
    code, _, err = mpl(capsys, "pool", "resize", "local", "--local")
    assert code == 2 and "--nodes" in err


def test_pool_delete_asks_and_refuses_while_tasks_run(local_services: LocalState,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    busy = new_task_id("busy")
    code, _, err = mpl(capsys, "submit", "--local", "-n", "2", "--task-id", busy, "--", "sleep", "60")
    assert code == 0, err
    deadline = time.monotonic() + 60
    while doc(capsys, "list", "--state", "running") == [] and time.monotonic() < deadline:
        time.sleep(0.5)
    code, _, err = mpl(capsys, "pool", "delete", "local", "--local", "--yes")
    assert code == 2 and "running tasks" in err and "--force" in err
    assert any(p["id"] == "local" and p["state"] == "active" for p in doc(capsys, "pool", "list"))
    code, _, err = mpl(capsys, "terminate", "--local", busy)
    assert code == 0, err

    code, _, err = mpl(capsys, "pool", "create", "spare", "--local", "-n", "1", "--ssh-from", "127.0.0.0/8")
    assert code == 0, err
    code, _, err = mpl(capsys, "pool", "delete", "spare", "--local")
    assert code == 2 and "--yes" in err
    code, out, err = mpl(capsys, "pool", "delete", "spare", "--local", "--yes")
    assert code == 0 and "deleting" in out, err
    assert all(p["id"] != "spare" or p["state"] == "deleting" for p in doc(capsys, "pool", "list"))
    code, _, err = mpl(capsys, "pool", "show", "nosuchpool", "--local")
    assert code == 4 and "nosuchpool" in err


def test_delete_and_cleanup_remove_tasks_and_what_was_staged(local_services: LocalState, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = Launcher.local().store
    shared, own = tmp_path / "shared.txt", tmp_path / "own.txt"
    shared.write_text(f"shared {uuid.uuid4()}\n")
    own.write_text(f"own {uuid.uuid4()}\n")
    first, second = new_task_id("first"), new_task_id("second")
    job = f"clean-{uuid.uuid4().hex[:6]}"
    for task, files in ((first, (shared, own)), (second, (shared,))):
        argv = ["run", "--local", "-n", "2", "--job", job, "--task-id", task, "--timeout", "120",
                "--collect", "result.txt", *(a for f in files for a in ("-i", str(f))), "--",
                "python3", "-c", "open('result.txt', 'w').write('r')"]
        code, _, err = mpl(capsys, *argv)
        assert code == 0, err
    inputs = {n.rsplit("/", 1)[1]: n for n in store.list_names("inputs/") if n.endswith(("/shared.txt", "/own.txt"))}
    assert set(inputs) == {"shared.txt", "own.txt"}
    assert store.list_names(f"outputs/{job}/{first}/logs/") and store.list_names(f"outputs/{job}/{first}/outputs/")

    code, out, err = mpl(capsys, "delete", "--local", "--job", job, first, "--dry-run")
    assert code == 0 and f"task  {job}/{first}" in out and inputs["own.txt"] in out, err
    assert inputs["shared.txt"] not in out and "1 input(s) kept" in err
    code, _, err = mpl(capsys, "delete", "--local", "--job", job, first)
    assert code == 2 and "--yes" in err  # nothing deleted without confirmation
    assert store.list_names(inputs["own.txt"])
    code, out, err = mpl(capsys, "delete", "--local", "--job", job, first, "--yes")
    assert code == 0 and "deleted" in err, err
    assert [t["id"] for t in doc(capsys, "list", "--job", job)] == [second]
    assert not store.list_names(inputs["own.txt"]) and store.list_names(inputs["shared.txt"])
    assert not store.list_names(f"outputs/{job}/{first}/logs/")
    assert store.list_names(f"outputs/{job}/{first}/outputs/")  # outputs are kept unless --outputs
    code, _, err = mpl(capsys, "delete", "--local", "--job", job, first, "--yes")
    assert code == 4 and first in err  # Batch's own "task not found"

    code, out, err = mpl(capsys, "cleanup", "--local", "--job", job, "--older-than", "1d", "--yes")
    assert code == 0 and "0 task(s)" in err, err  # the task just ended
    cleaned = doc(capsys, "cleanup", "--job", job, "--older-than", "0", "--outputs", "--yes")
    assert isinstance(cleaned, dict) and cleaned["tasks"] == [{"job_id": job, "task_id": second}]
    assert doc(capsys, "list", "--job", job) == []
    assert not store.list_names(inputs["shared.txt"]) and not store.list_names(f"outputs/{job}/{second}/")
