"""End to end, what Azure does to nodes under a checkpointed task: `examples/sweep.py --checkpoint` on a pool with
Spot nodes and no retries loses a node three times while it runs (preempted with `mpilaunch local fault`, rebooted
with `mpilaunch local fault reboot`, i.e. the SDK's requeue reboot, removed with the SDK's remove nodes and requeue);
each time Batch requeues the whole task, which resumes from its checkpoint and ends with every result exactly once.
A reboot with `terminate` fails the task instead, and `mpilaunch reactivate` runs it again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from azure.batch import models as bm
from azure.batch.models._models import BatchNodeRebootOptions  # the SDK takes it, but does not export it

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher
from mpilaunch.client.local import LocalState
from tests.client.conftest import new_task_id
from tests.support.exec_engine import load_file, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(300)]

SWEEP = Path(__file__).resolve().parents[2] / "examples" / "sweep.py"
GRID, STEPS, BATCH, RANKS = 16, 3000, 16, 2
PROGRESS = 24
"""Items the current attempt computes before the next fault hits it (so each fault lands mid-run)."""
COUNTED = """
import os, sweep
simulate = sweep.simulate
def counted(point):
    result = simulate(point)
    with open(os.path.join(os.environ["SWEEP_LOG"], f"{os.getpid()}.log"), "a") as log:
        log.write(f"{point[0]!r},{point[1]!r}\\n")
    return result
sweep.simulate = counted
sweep.main()
"""
"""examples/sweep.py with every computed item logged (one file per rank process), to count recomputations."""


def cli_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, "mpilaunch", list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def computed(log: Path) -> list[str]:
    return [line for f in log.glob("*.log") for line in f.read_text().splitlines()]


def requeues(client: Any, task: str) -> tuple[str, int]:
    t = client.get_task("mpilaunch", task)
    return str(t.state.value), t.execution_info.requeue_count or 0


def running_again(client: Any, task: str, requeued: int, log: Path) -> None:
    """Wait until attempt ``requeued + 1`` runs and has computed :data:`PROGRESS` items."""
    wait_for(lambda: requeues(client, task) == ("running", requeued), 120, f"attempt {requeued + 1} running")
    start = len(computed(log))
    wait_for(lambda: len(computed(log)) >= start + PROGRESS, 120, f"attempt {requeued + 1} computing")


def task_nodes(client: Any, task: str) -> list[str]:
    t = client.get_task("mpilaunch", task)
    return [t.node_info.node_id, *(s.node_info.node_id for s in client.list_subtasks("mpilaunch", task))]


def test_preempted_rebooted_and_removed_nodes_requeue_a_checkpointed_sweep(
        local_services: LocalState, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pool = f"spot-{new_task_id('p')[-8:]}"
    code, out, err = cli_run(capsys, "pool", "create", pool, "--local", "-n", "1", "--spot", "2", "--output", "json")
    assert code == 0, err
    assert json.loads(out)["low_priority_nodes"] == 2
    client = Launcher.local().batch
    wait_for(lambda: [n.state for n in client.list_nodes(pool)] == ["idle"] * 3, 60, "3 idle nodes")

    shared, task = tmp_path / "shared", new_task_id("sweep")
    (shared / "log").mkdir(parents=True)
    (tmp_path / "counted_sweep.py").write_text(COUNTED)
    code, _, err = cli_run(
        capsys, "submit", "--local", "--pool", pool, "-n", str(RANKS), "--ppn", "1", "--retries", "0",
        "--task-id", task, "--checkpoint", f"file://{shared}/ckpt", "-i", str(SWEEP), "-i",
        str(tmp_path / "counted_sweep.py"), "-e", f"SWEEP_LOG={shared / 'log'}", "--", "python3", "counted_sweep.py",
        "--grid", str(GRID), "--steps", str(STEPS), "--batch", str(BATCH), "--out", str(shared / "out.json"))
    assert code == 0, err
    assert f"pool '{pool}' has 2 Spot/low-priority node(s)" in err and "resumes from its --checkpoint" in err

    log = shared / "log"
    running_again(client, task, 0, log)
    code, out, err = cli_run(capsys, "local", "fault", "preempt", "--random", "--when", "running", "--pool", pool,
                             "--down", "5")
    assert code == 0, err
    victim = out.split("node ")[1].split()[0]
    wait_for(lambda: requeues(client, task)[1] == 1, 30, "the preemption's requeue")
    code, _, err = cli_run(capsys, "status", "--local", task)
    assert code == 0, err
    assert f"node {victim} was preempted" in err or f"{victim} (preempted)" in err, err  # moved on already or not

    running_again(client, task, 1, log)
    code, _, err = cli_run(capsys, "local", "fault", "reboot", "--random", "--when", "running", "--pool", pool)
    assert code == 0, err

    running_again(client, task, 2, log)
    removed = task_nodes(client, task)[1]
    client.begin_remove_nodes(pool, bm.BatchNodeRemoveOptions(node_ids=[removed],
                                                              node_deallocation_option="requeue"))

    code, out, err = cli_run(capsys, "wait", "--local", task, "--timeout", "240", "--interval", "0.5",
                             "--output", "json", "--logs", str(tmp_path / "logs"))
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["result"], doc["requeue_count"], doc["retry_count"], doc["max_task_retry_count"]) == \
        ("success", 3, 0, 0)
    assert doc["attempt"] == 4 and "the task was requeued 3 times (attempt 4" in err
    assert "retries used: 0 of 0" in doc["notes"][0]
    assert removed not in {n.id for n in client.list_nodes(pool)}

    sweep = load_file("sweep_example", SWEEP)
    points = sweep.grid(GRID, STEPS)
    results = json.loads((shared / "out.json").read_text())
    assert sorted(results) == sorted(points)  # every result, once (keyed)
    for key in sorted(points)[::51]:
        assert results[key] == pytest.approx(sweep.simulate(points[key]))
    done = computed(log)
    assert {tuple(map(float, line.split(","))) for line in done} == {p[:2] for p in points.values()}
    assert len(done) - len(points) < 3 * RANKS * BATCH  # each requeue recomputed less than one batch per rank
    assert "items already committed" in (tmp_path / "logs" / "instance-0" / "stderr.txt").read_text()


def test_a_reboot_with_terminate_fails_the_task_and_reactivate_runs_it_again(
        local_services: LocalState, capsys: pytest.CaptureFixture[str]) -> None:
    task = new_task_id("rebooted")
    code, _, err = cli_run(capsys, "submit", "--local", "-n", "2", "--retries", "2", "--task-id", task, "--",
                           "python3", "-c", "import time; time.sleep(120)")
    assert code == 0, err
    client = Launcher.local().batch
    wait_for(lambda: requeues(client, task)[0] == "running", 60, "the task running")
    primary = client.get_task("mpilaunch", task).node_info  # the job's pool: 'local', or the one made above
    client.begin_reboot_node(primary.pool_id, primary.node_id, BatchNodeRebootOptions(node_reboot_kind="terminate"))

    code, out, err = cli_run(capsys, "wait", "--local", task, "--timeout", "60", "--output", "json")
    assert code == 1, err
    doc = json.loads(out)
    assert (doc["result"], doc["retry_count"], doc["requeue_count"]) == ("failure", 0, 0)  # no retry, no requeue
    assert doc["failure"]["code"] == "TaskEnded" and "rebooted" in doc["failure"]["message"]
    assert "TaskEnded" in err

    code, out, err = cli_run(capsys, "reactivate", "--local", task)
    assert code == 0, err
    assert out.strip() == f"reactivated mpilaunch/{task}" and f"mpilaunch wait --job mpilaunch {task} --local" in err
    assert requeues(client, task)[0] in ("active", "running")
    code, _, err = cli_run(capsys, "reactivate", "--local", task)  # not failed (any more): Batch refuses
    assert code == 4 and "TaskNotCompleted" in err, err
    client.terminate_task("mpilaunch", task)
