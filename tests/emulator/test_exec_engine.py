"""The execution engine through its store contract: real processes on loopback nodes, no HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpilaunch.emulator.nodes.process import ProcessProvider, isolation_available
from mpilaunch.emulator.store import StateStore
from tests.support.exec_engine import PY, hang_first_attempt, leftovers, py, rig, wait_for

ENV_DUMP = ("import json, os, socket; print(json.dumps({'host': socket.gethostname(), 'cwd': os.getcwd(), "
            "'env': {k: v for k, v in os.environ.items() "
            "if k.startswith(('AZ_BATCH', 'CCP', 'MPILAUNCH', 'X', 'TMPDIR'))}}))")


def test_multi_instance_task_runs_coordination_everywhere_then_command_on_primary(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool(nodes=3)
        r.job()
        r.task("mi", py(ENV_DUMP + "; print('MAIN')"), instances=3, coordination=py(ENV_DUMP),
               environmentSettings=[{"name": "X_USER", "value": "v 1"}])
        task = r.completed("mi")
        info = task["executionInfo"]
        assert (info["result"], info["exitCode"], info["retryCount"], info["requeueCount"]) == ("success", 0, 0, 0)
        subtasks = r.subtasks("mi")
        assert [s["id"] for s in subtasks] == [1, 2]
        assert all(s["state"] == "completed" and s["exitCode"] == 0 and s["result"] == "success" for s in subtasks)
        assert all(s["previousState"] == "running" and s["startTime"] <= s["endTime"] for s in subtasks)
        node_ids = [task["nodeInfo"]["nodeId"]] + [s["nodeInfo"]["nodeId"] for s in subtasks]
        assert len(set(node_ids)) == 3
        nodes = {n["id"]: n for n in r.store.list("node", ("pool",))}
        addresses = [nodes[n]["ipAddress"] for n in node_ids]

        primary_out = (Path(task["_taskDir"]) / "stdout.txt").read_text().splitlines()
        coord, main = json.loads(primary_out[0]), json.loads(primary_out[1])
        assert primary_out[2] == "MAIN"
        for dump in (coord, main):
            env = dump["env"]
            assert env["AZ_BATCH_HOST_LIST"] == ",".join(addresses)
            assert env["AZ_BATCH_NODE_LIST"] == ";".join(addresses)
            assert env["AZ_BATCH_MASTER_NODE"].split(":")[0] == addresses[0]
            assert env["AZ_BATCH_IS_CURRENT_NODE_MASTER"] == "true"
            assert env["CCP_NODES"] == "3 " + " ".join(f"{a} 1" for a in addresses)
            assert env["MPILAUNCH_NODE_ADDRESS"] == addresses[0]
            assert env["AZ_BATCH_TASK_SHARED_DIR"] == env["AZ_BATCH_TASK_DIR"]
            assert env["AZ_BATCH_TASK_WORKING_DIR"] == env["AZ_BATCH_TASK_DIR"] + "/wd" == dump["cwd"]
            assert env["X_USER"] == "v 1"
            assert (env["AZ_BATCH_JOB_ID"], env["AZ_BATCH_TASK_ID"], env["AZ_BATCH_POOL_ID"]) == ("job", "mi", "pool")
        hosts = {coord["host"]}
        for index, sub in enumerate(subtasks, start=1):
            dump = json.loads((Path(sub["_taskDir"]) / "stdout.txt").read_text())
            assert dump["env"]["AZ_BATCH_IS_CURRENT_NODE_MASTER"] == "false"
            assert dump["env"]["MPILAUNCH_NODE_ADDRESS"] == addresses[index]
            assert dump["env"]["AZ_BATCH_NODE_ID"] == node_ids[index]
            hosts.add(dump["host"])
            if isolation_available():  # same task paths on every node, as in Azure
                assert dump["env"]["AZ_BATCH_TASK_DIR"] == main["env"]["AZ_BATCH_TASK_DIR"]
                assert dump["env"]["AZ_BATCH_NODE_ROOT_DIR"] == "/mnt/batch/tasks"
        if isolation_available():
            assert len(hosts) == 3, "every node needs its own host name"
        wait_for(lambda: all(n["state"] == "idle" and n["totalTasksRun"] == 1 for n in r.store.list("node")),
                 10, "nodes idle again")


def test_coordination_failure_on_one_node_fails_and_retries_the_whole_task(tmp_path: Path) -> None:
    flag = tmp_path / "failed-once"
    # Attempt 1: subtask nodes fail fast, the master's coordination would hang: it must be killed, not awaited.
    # Every instance also leaves a daemon behind (like sshd) that must not survive the attempt.
    coordination = py(
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n"
        "master = os.environ['AZ_BATCH_IS_CURRENT_NODE_MASTER'] == 'true'\n"
        f"first = not os.path.exists({str(flag)!r})\n"
        "if first and master: time.sleep(300)\n"
        f"if first and os.environ['AZ_BATCH_NODE_ID'] == os.environ['FAIL_NODE']: open({str(flag)!r}, 'w'); "
        "sys.exit(7)\n")
    with rig(tmp_path / "data") as r:
        r.pool(nodes=3)
        r.job()
        fail_node = r.idle(3)[2]["id"]
        started = time.monotonic()
        r.task("retry", py("print('ran')"), instances=3, coordination=coordination,
               constraints={"maxTaskRetryCount": 2}, environmentSettings=[{"name": "FAIL_NODE", "value": fail_node}])
        task = r.completed("retry")
        assert time.monotonic() - started < 60
        info = task["executionInfo"]
        assert (info["result"], info["exitCode"], info["retryCount"], info["requeueCount"]) == ("success", 0, 1, 0)
        assert "lastRetryTime" in info and "failureInfo" not in info
        assert (Path(task["_taskDir"]) / "stdout.txt").read_text() == "ran\n"  # fresh directory on the retry
        assert flag.exists()
        assert not leftovers(r.node_ids()), "daemons of the attempts must be killed when the task ends"


def test_failure_after_last_retry_is_recorded_on_task_and_subtask(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool(nodes=2)
        r.job()
        nodes = r.idle(2)
        r.task("bad", py("print('never')"), instances=2, constraints={"maxTaskRetryCount": 1},
               coordination=py(f"import os, sys; sys.exit(5 if os.environ['AZ_BATCH_NODE_ID'] == {nodes[1]['id']!r} "
                               "else 0)"))
        task = r.completed("bad")
        info = task["executionInfo"]
        assert (info["result"], info["exitCode"], info["retryCount"]) == ("failure", 5, 1)
        assert info["failureInfo"]["code"] == "FailureExitCode"
        assert info["failureInfo"]["category"] == "usererror"
        details = {d["name"]: d["value"] for d in info["failureInfo"]["details"]}
        assert details["NodeId"] == nodes[1]["id"]
        (sub,) = r.subtasks("bad")
        assert (sub["exitCode"], sub["result"], sub["failureInfo"]["code"]) == (5, "failure", "FailureExitCode")
        assert "never" not in (Path(task["_taskDir"]) / "stdout.txt").read_text()


def test_task_stays_active_without_inter_node_communication_or_enough_nodes(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool("plain", nodes=2, enableInterNodeCommunication=False)
        r.pool("small", nodes=2)
        r.job("j1", "plain")
        r.job("j2", "small")
        r.idle(2, "plain")
        r.idle(2, "small")
        r.task("a", py("pass"), instances=2, coordination=py("pass"), job_id="j1")
        r.task("b", py("pass"), instances=3, coordination=py("pass"), job_id="j2")
        time.sleep(1.5)
        assert r.get("a", "j1")["state"] == "active"
        assert r.get("b", "j2")["state"] == "active"


def test_wall_clock_timeout_and_terminate_kill_every_instance(tmp_path: Path) -> None:
    sleeper = py("import time; time.sleep(300)")
    with rig(tmp_path) as r:
        r.pool(nodes=4)
        r.job()
        r.idle(4)
        r.task("slow", sleeper, instances=2, coordination=py("pass"), constraints={"maxWallClockTime": "PT1S",
                                                                                   "maxTaskRetryCount": 3})
        r.task("term", sleeper, instances=2, coordination=py("pass"))
        wait_for(lambda: r.get("term")["state"] == "running", 30, "term running")
        time.sleep(0.5)
        r.store.update("task", ("job",), "term", lambda d: d.update(_terminating=True))
        r.engine.wake()
        for task_id in ("slow", "term"):
            info = r.completed(task_id, 30)["executionInfo"]
            assert (info["result"], info["failureInfo"]["code"], info["retryCount"]) == ("failure", "TaskEnded", 0)
        assert not leftovers(r.node_ids())


def test_delete_running_task_kills_it_and_removes_the_documents(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool(nodes=2)
        r.job(onAllTasksComplete="terminatejob")
        r.task("gone", py("import time; time.sleep(300)"), instances=2, coordination=py("pass"))
        wait_for(lambda: r.get("gone")["state"] == "running", 30, "running")
        r.store.update("task", ("job",), "gone", lambda d: d.update(_deleting=True))
        r.engine.wake()
        wait_for(lambda: r.store.get("task", ("job",), "gone") is None, 30, "task deleted")
        assert r.store.list("subtask", ("job", "gone")) == []
        wait_for(lambda: not leftovers(r.node_ids()), 10, "processes gone")
        assert not list(tmp_path.glob("nodes/pool/*/workitems/job/job-1/gone")), "task dirs go with the task"
        r.task("ok", py("pass"))
        done = r.completed("ok")
        wait_for(lambda: r.doc("job", (), "job")["state"] == "completed", 10, "job completed")
        assert r.doc("job", (), "job")["executionInfo"]["terminateReason"] == "AllTasksComplete"
        r.store.update("task", ("job",), "ok", lambda d: d.update(_deleting=True))  # in a completed job
        r.engine.wake()
        wait_for(lambda: r.store.get("task", ("job",), "ok") is None, 10, "completed task deleted")
        assert not Path(done["_taskDir"]).exists()


def test_start_task_wait_for_success_retries_and_failure_states(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool("good", nodes=1, startTask={"commandLine": py("import os; print(os.environ['AZ_BATCH_TASK_DIR'])"),
                                            "waitForSuccess": True})
        r.pool("bad", nodes=1, startTask={"commandLine": py("import sys; sys.exit(3)"), "waitForSuccess": True,
                                           "maxTaskRetryCount": 1})
        (good,) = r.idle(1, "good")
        assert good["startTaskInfo"]["result"] == "success" and good["startTaskInfo"]["exitCode"] == 0
        out = (Path(good["_root"]) / "startup" / "stdout.txt").read_text().strip()
        assert out.endswith("startup")
        (bad,) = wait_for(lambda: r.store.list("node", ("bad",), states=["starttaskfailed"]), 30, "starttaskfailed")
        info = bad["startTaskInfo"]
        assert (info["result"], info["exitCode"], info["retryCount"]) == ("failure", 3, 1)
        assert info["failureInfo"]["code"] == "FailureExitCode"
        r.job("jb", "bad")
        r.task("never", py("pass"), job_id="jb")
        time.sleep(1)
        assert r.get("never", "jb")["state"] == "active"


def test_pool_resize_and_delete(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool(nodes=2)
        r.idle(2)
        pool = wait_for(lambda: (p := r.store.get("pool", (), "pool")) and p["allocationState"] == "steady" and p,
                        10, "steady")
        assert pool["currentDedicatedNodes"] == 2
        r.store.update("pool", (), "pool", lambda d: d.update(targetDedicatedNodes=1, allocationState="resizing"))
        r.engine.wake()
        wait_for(lambda: len(r.store.list("node", ("pool",))) == 1, 30, "one node left")
        wait_for(lambda: r.doc("pool", (), "pool")["currentDedicatedNodes"] == 1, 10, "count updated")
        r.store.update("pool", (), "pool", lambda d: d.update(state="deleting"))
        r.engine.wake()
        wait_for(lambda: r.store.get("pool", (), "pool") is None, 30, "pool deleted")
        assert not (tmp_path / "nodes" / "pool").exists()



def test_node_whose_root_cannot_be_made_is_unusable_and_its_pool_can_be_deleted(tmp_path: Path) -> None:
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "pool").write_text("a file where the pool's node roots should go")
    with rig(tmp_path) as r:
        r.pool(nodes=1)
        (node,) = wait_for(lambda: (ns := r.store.list("node", ("pool",))) and ns[0]["state"] == "unusable" and ns,
                           30, "the node to be unusable")
        assert node["errors"][0]["code"] == "NodeCreationFailed"
        assert str(tmp_path / "nodes" / "pool") in node["errors"][0]["message"]
        r.store.update("pool", (), "pool", lambda d: d.update(state="deleting"))
        r.engine.wake()
        wait_for(lambda: r.store.get("pool", (), "pool") is None, 30, "pool deleted")

RUNNER = """
import sys, time
from pathlib import Path
from mpilaunch.emulator.engine import Engine
from mpilaunch.emulator.store import StateStore
data = Path(sys.argv[1])
store = StateStore(data / "state.sqlite3")
engine = Engine(store, data, poll=0.1)
engine.start()
store.insert("pool", (), {"id": "pool", "state": "active", "allocationState": "resizing", "targetDedicatedNodes": 2,
                          "enableInterNodeCommunication": True, "taskSlotsPerNode": 1})
store.insert("job", (), {"id": "job", "state": "active", "poolInfo": {"poolId": "pool"}})
mis = {"numberOfInstances": 2, "coordinationCommandLine": sys.argv[3]}
store.insert("task", ("job",), {"id": "t", "state": "active", "commandLine": sys.argv[2], "multiInstanceSettings": mis})
engine.wake()
time.sleep(600)
"""


def test_restart_mid_run_requeues_without_counting_a_retry(tmp_path: Path) -> None:
    marker = tmp_path / "attempts"
    command = hang_first_attempt(marker)
    data = tmp_path / "data"
    data.mkdir()
    crashed = subprocess.Popen([sys.executable, "-c", RUNNER, str(data), command, py("pass")])
    try:
        wait_for(marker.exists, 60, "first attempt running")
    finally:
        os.kill(crashed.pid, signal.SIGKILL)  # the emulator dies; its task processes live on
        crashed.wait(10)
    with rig(data) as r:
        task = r.completed("t", 60)
        info = task["executionInfo"]
        assert (info["result"], info["retryCount"], info["requeueCount"]) == ("success", 0, 1)
        assert "lastRequeueTime" in info
        assert marker.read_text() == "xx"
        assert [s["id"] for s in r.subtasks("t")] == [1]


@pytest.mark.parametrize("bad", ["echo 'unterminated", "/nonexistent/program"])
def test_bad_command_lines_fail_the_task_cleanly(tmp_path: Path, bad: str) -> None:
    with rig(tmp_path) as r:
        r.pool(nodes=1)
        r.job()
        r.task("t", bad)
        info = r.completed("t")["executionInfo"]
        assert info["result"] == "failure"
        assert info["failureInfo"]["code"] in ("CommandLineParseError", "FailureExitCode", "CommandStartFailed")


def test_plain_processes_without_namespaces_and_low_priority_nodes(tmp_path: Path) -> None:
    with rig(tmp_path, ProcessProvider(isolate=False)) as r:
        r.pool(nodes=1, targetLowPriorityNodes=1)
        r.job()
        r.task("plain", py(ENV_DUMP), instances=2, coordination=py(ENV_DUMP))
        task = r.completed("plain")
        assert task["executionInfo"]["result"] == "success"
        nodes = {n["id"]: n for n in r.store.list("node", ("pool",))}
        assert sorted(n["isDedicated"] for n in nodes.values()) == [False, True]
        assert (r.doc("pool", (), "pool")["currentDedicatedNodes"], r.doc("pool", (), "pool")[
            "currentLowPriorityNodes"]) == (1, 1)
        (sub,) = r.subtasks("plain")
        for task_dir, node_id in ((task["_taskDir"], task["nodeInfo"]["nodeId"]),
                                  (sub["_taskDir"], sub["nodeInfo"]["nodeId"])):
            env = json.loads((Path(task_dir) / "stdout.txt").read_text().splitlines()[0])["env"]
            root = nodes[node_id]["_root"]
            assert env["AZ_BATCH_NODE_ROOT_DIR"] == root, "without namespaces commands see the host paths"
            assert env["AZ_BATCH_TASK_DIR"] == task_dir
            assert env["AZ_BATCH_NODE_IS_DEDICATED"] == str(nodes[node_id]["isDedicated"]).lower()
            assert env["MPILAUNCH_NODE_ADDRESS"] == nodes[node_id]["ipAddress"]
            assert env["TMPDIR"] == f"{root}/tmp", "a TMPDIR per node instead of a host name per node"


def test_graceful_stop_kills_everything_and_the_next_start_requeues(tmp_path: Path) -> None:
    marker = tmp_path / "attempts"
    command = hang_first_attempt(marker)
    data = tmp_path / "data"
    data.mkdir()
    with rig(data) as first:
        first.pool(nodes=2)
        first.job()
        first.task("t", command, instances=2, coordination=py("import subprocess, sys; subprocess.Popen("
                                                              "[sys.executable, '-c', 'import time; time.sleep(300)'],"
                                                              " start_new_session=True)"))
        wait_for(marker.exists, 60, "first attempt running")
        nodes = first.node_ids()
    # the rig stopped the engine and asserted that no process of its nodes is left; the documents stay as they were
    kept = StateStore(data / "state.sqlite3")
    assert (kept.get("task", ("job",), "t") or {}).get("state") == "running"
    kept.close()
    with rig(data) as second:
        assert sorted(second.node_ids()) == sorted(nodes)
        info = second.completed("t")["executionInfo"]
        assert (info["result"], info["retryCount"], info["requeueCount"]) == ("success", 0, 1)


def test_pool_deleted_while_nodes_are_created_or_running_their_start_task(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool("fresh", nodes=3)
        r.store.update("pool", (), "fresh", lambda d: d.update(state="deleting"))  # before the nodes exist
        r.pool("busy", nodes=2, startTask={"commandLine": py("import time; time.sleep(300)"), "waitForSuccess": True})
        wait_for(lambda: len(r.store.list("node", ("busy",), states=["waitingforstarttask"])) == 2, 30, "StartTasks")
        busy_nodes = r.node_ids()
        wait_for(lambda: leftovers(busy_nodes), 10, "StartTask processes")
        r.store.update("pool", (), "busy", lambda d: d.update(state="deleting"))
        r.engine.wake()
        wait_for(lambda: r.store.list("pool") == [], 30, "both pools deleted")
        assert r.store.list("node") == []
        assert not leftovers(busy_nodes), "a node leaving the pool takes its StartTask processes with it"
        assert not (tmp_path / "nodes" / "busy").exists()


@pytest.mark.skipif(not isolation_available(), reason="per-node namespaces need root and unshare")
def test_isolated_node_sees_azure_paths_and_keeps_the_hosts_mnt_entries(tmp_path: Path) -> None:
    host_mnt = sorted(p.name for p in Path("/mnt").iterdir())
    provider = ProcessProvider(isolate=True)
    node = provider.create_node({"id": "p"}, "tvmps_x_d", tmp_path / "root", [])
    (tmp_path / "root" / "marker").write_text("here")
    code = ("import os, socket; print(sorted(os.listdir('/mnt')), socket.gethostname(), "
            "open('/mnt/batch/tasks/marker').read(), os.getcwd())")
    execution = provider.run(node, [PY, "-c", code], env={}, cwd="/mnt/batch/tasks", stdout=tmp_path / "out",
                             stderr=tmp_path / "err", tag="t")
    assert execution.wait(30) == 0, (tmp_path / "err").read_text()
    expected = sorted({*host_mnt, "batch"})
    assert (tmp_path / "out").read_text().strip() == f"{expected} tvmps-x-d here /mnt/batch/tasks"
    assert sorted(p.name for p in Path("/mnt").iterdir()) == host_mnt, "nothing is created on the host"


def test_job_wall_clock_expiry_terminates_the_job_and_its_tasks(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool(nodes=2)
        r.job(constraints={"maxWallClockTime": "PT2S"})
        r.task("long", py("import time; time.sleep(300)"), instances=2, coordination=py("pass"))
        r.task("queued", py("pass"), instances=3, coordination=py("pass"))  # can never run on 2 nodes
        wait_for(lambda: r.doc("job", (), "job")["state"] == "completed", 30, "job completed")
        assert r.doc("job", (), "job")["executionInfo"]["terminateReason"] == "MaxWallClockTimeExpiry"
        for task_id in ("long", "queued"):
            task = r.get(task_id)
            assert (task["state"], task["executionInfo"]["failureInfo"]["code"]) == ("completed", "TaskEnded")


def test_plain_tasks_share_a_node_up_to_its_task_slots(tmp_path: Path) -> None:
    with rig(tmp_path) as r:
        r.pool(nodes=1, taskSlotsPerNode=2, enableInterNodeCommunication=False)
        r.job()
        (node,) = r.idle(1)
        for name in ("a", "b", "c"):
            r.task(name, py("import time; time.sleep(1.5)"))
        wait_for(lambda: sum(r.get(t)["state"] == "running" for t in "abc") == 2, 30, "two tasks running")
        assert r.doc("node", ("pool",), node["id"])["runningTaskSlotsCount"] == 2
        for name in "abc":
            assert r.completed(name)["executionInfo"]["result"] == "success"
        done = wait_for(lambda: (d := r.doc("node", ("pool",), node["id"]))["state"] == "idle" and d, 10, "idle")
        assert (done["totalTasksRun"], done["totalTasksSucceeded"], done["runningTaskSlotsCount"]) == (3, 3, 0)
        assert sorted(t["taskId"] for t in done["recentTasks"]) == ["a", "b", "c"]


def test_daemons_forked_while_an_attempt_is_killed_do_not_survive(tmp_path: Path) -> None:
    spawner = ("import os, subprocess, sys, time\n"
               "if os.environ['AZ_BATCH_IS_CURRENT_NODE_MASTER'] == 'false': time.sleep(0.5); sys.exit(1)\n"
               "while True:\n"
               f"    subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(300)'], start_new_session=True)\n")
    with rig(tmp_path) as r:
        r.pool(nodes=2)
        r.job()
        for name in ("f1", "f2", "f3"):
            r.task(name, py("pass"), instances=2, coordination=py(spawner))
            assert r.completed(name)["executionInfo"]["result"] == "failure"
            assert not leftovers(r.node_ids()), "a daemon forked during the kill survived"
