"""The engine at scale and under bad records: shell start-up files, the teardown sweep, records it cannot act on,
per-instance subtask times, history-independent queries."""

from __future__ import annotations

import base64
import json
import secrets
import shlex
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.azurite import free_port
from tests.support.exec_engine import py, require_mpi, rig, wait_for

PROBE = Path(__file__).resolve().parents[1] / "programs" / "mpi_probe.py"
HOSTILE_RC = 'echo hostile-rc-output; touch "$HOME/sourced.$$"; sleep 4\n'


def _mi_env(instances: int) -> list[dict[str, str]]:
    secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    env = {"AZ_BATCH_NODE_COUNT": str(instances), "MPILAUNCH_TASK_SECRET": secret,
           "MPILAUNCH_SSH_PORT": str(free_port())}
    return [{"name": k, "value": v} for k, v in env.items()]


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_launch_never_reads_the_users_shell_startup_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ~/.bashrc (and BASH_ENV) that prints, leaves a mark and sleeps: neither coordinate nor launch (its control
    masters' LocalCommand, the remote sessions, mpirun's ssh) may run it."""
    require_mpi()
    home = tmp_path / "home"
    home.mkdir()
    for name in (".bashrc", ".bash_profile", ".profile", "bash_env.sh"):
        (home / name).write_text(HOSTILE_RC)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SHELL", "/bin/bash")
    monkeypatch.setenv("BASH_ENV", str(home / "bash_env.sh"))
    monkeypatch.delenv("SHLVL", raising=False)
    with rig(tmp_path / "data") as r:
        r.pool(nodes=3)
        r.job()
        r.idle(3)
        launch = shlex.join(["node-runtime", "launch", "--ppn", "1", "--", sys.executable, str(PROBE)])
        started = time.monotonic()
        r.task("mpi", launch, instances=3, coordination="node-runtime coordinate", environmentSettings=_mi_env(3))
        task = r.completed("mpi", timeout=120)
        took = time.monotonic() - started
        out = (Path(task["_taskDir"]) / "stdout.txt").read_text()
        err = (Path(task["_taskDir"]) / "stderr.txt").read_text()
        assert task["executionInfo"]["result"] == "success", err
        assert sorted(json.loads(line)["rank"] for line in out.splitlines() if line.startswith("{")) == [0, 1, 2]
        report = json.loads((Path(task["_taskDir"]) / "wd" / "launch-report.json").read_text())
    sourced = sorted(p.name for p in home.glob("sourced.*"))
    assert not sourced, f"a shell start-up file ran {len(sourced)} time(s)"
    assert "hostile-rc-output" not in out + err
    assert report["timings"]["wait_services_s"] < 4, report["timings"]
    assert took < 60


def _plant(store_path: Path, kind: str, parent: str, lid: str, state: str | None, text: str) -> None:
    """Write a row straight into the store's SQLite file, as a hand edit, an older version or a bug could."""
    with sqlite3.connect(store_path) as db:
        db.execute("INSERT INTO docs (kind, parent, lid, state, doc) VALUES (?, ?, ?, ?, ?)",
                   (kind, parent, lid, state, text))


def _bad_records(path: Path) -> None:
    pool = {"id": "badvm", "state": "active", "allocationState": "resizing", "targetDedicatedNodes": 1,
            "taskSlotsPerNode": 1, "virtualMachineConfiguration": None}
    _plant(path, "pool", "", "badvm", "active", json.dumps(pool))
    _plant(path, "pool", "", "badsize", "active", json.dumps(pool | {"id": "badsize", "targetDedicatedNodes": "x",
                                                                      "virtualMachineConfiguration": {}}))
    _plant(path, "job", "", "badjob", "active", json.dumps({"id": "badJob", "state": "active", "poolInfo": None}))
    _plant(path, "task", "badjob", "t", "active", json.dumps({"id": "t", "state": "active", "commandLine": "true"}))
    _plant(path, "task", "job", "badmi", "active", json.dumps(
        {"id": "badmi", "state": "active", "commandLine": "true", "multiInstanceSettings": {"numberOfInstances": "x"}}))
    _plant(path, "task", "job", "badwall", "active", json.dumps(
        {"id": "badwall", "state": "active", "commandLine": "true", "constraints": {"maxWallClockTime": "soon"}}))
    _plant(path, "task", "job", "corrupt", "active", "{not json")


@pytest.mark.slow
def test_records_the_engine_cannot_act_on_are_marked_and_everything_else_runs(tmp_path: Path) -> None:
    """Bad pools, a bad job and bad tasks planted in the SQLite store: each is marked with an error a Batch client
    reads; a good pool, job and tasks run meanwhile, and again after a restart of the engine on the same store."""
    data = tmp_path / "data"
    with rig(data) as r:
        r.pool("good", nodes=1, enableInterNodeCommunication=False)
        r.job("job", pool_id="good")
        _bad_records(r.store.path)
        r.task("before", py("print('ok')"))
        assert r.completed("before")["executionInfo"]["result"] == "success"
        wait_for(lambda: all(r.doc("pool", (), p).get("resizeErrors") for p in ("badvm", "badsize")), 30,
                 "both bad pools marked")
        for pool_id in ("badvm", "badsize"):
            pool = r.doc("pool", (), pool_id)
            assert pool["allocationState"] == "steady"
            assert pool["resizeErrors"][0]["code"] == "InvalidPropertyValue"
            assert f"pool '{pool_id}'" in pool["resizeErrors"][0]["message"]
        job = wait_for(lambda: (j := r.doc("job", (), "badjob")).get("executionInfo", {}).get("schedulingError")
                       and j, 30, "the bad job marked")
        assert job["executionInfo"]["schedulingError"]["code"] == "InvalidPropertyValue"
        assert job["executionInfo"]["schedulingError"]["category"] == "usererror"
        for task_id in ("badmi", "badwall", "corrupt"):
            task = r.completed(task_id)
            assert task["executionInfo"]["result"] == "failure"
            assert task["executionInfo"]["failureInfo"]["code"] == "InvalidPropertyValue", task
        assert r.doc("task", ("badjob",), "t")["state"] == "active", "a bad job's tasks wait, as in Batch"
        r.task("after", py("print('ok')"))
        assert r.completed("after")["executionInfo"]["result"] == "success"
        assert len(r.store.list("node", ("good",), states=["idle"])) == 1
    _plant(data / "state.sqlite3", "pool", "", "badagain", "active", '{"id": "badAgain", "state": "active", '
           '"targetDedicatedNodes": [1]}')
    with rig(data) as r:  # the next emulator run recovers around them too
        r.task("restarted", py("print('ok')"))
        assert r.completed("restarted")["executionInfo"]["result"] == "success"
        wait_for(lambda: r.doc("pool", (), "badagain").get("resizeErrors"), 30, "the new bad pool marked")


@pytest.mark.slow
def test_subtask_times_are_each_instances_own(tmp_path: Path) -> None:
    """Batch reports per-subtask times (BatchSubtask.startTime: "The time at which the subtask started running";
    the REST spec's List Subtasks example has a different startTime per subtask)."""
    with rig(tmp_path) as r:
        r.pool(nodes=4)
        r.job()
        r.task("mi", py("import time; time.sleep(0.3)"), instances=4, coordination=py("print('c')"))
        task = r.completed("mi")
        subtasks = r.subtasks("mi")
    starts = [s["startTime"] for s in subtasks]
    ends = [s["endTime"] for s in subtasks]
    assert len(set(starts)) == 3 and len(set(ends)) == 3, (starts, ends)
    assert task["executionInfo"]["startTime"] < min(starts), "the primary starts at the claim, before its instances"
    assert all(s["previousState"] == "running" and s["startTime"] < s["endTime"] for s in subtasks)
    assert max(ends) <= task["executionInfo"]["endTime"]
    assert all(e > s for s, e in zip(starts, ends, strict=True))


def test_teardown_scans_the_process_table_the_same_number_of_times_at_any_size(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The end of an attempt kills every node's processes in one sweep (a few scans), not a sweep per node."""
    from mpilaunch.emulator.nodes import process

    scans = {"n": 0}
    original = process._marked

    def counted(match: Any) -> Any:
        scans["n"] += 1
        return original(match)

    monkeypatch.setattr(process, "_marked", counted)
    per_size = {}
    with rig(tmp_path) as r:
        r.pool(nodes=6)
        r.job()
        r.idle(6)
        for size in (2, 6):
            before = scans["n"]
            r.task(f"mi{size}", py("print('ok')"), instances=size, coordination=py("print('c')"))
            assert r.completed(f"mi{size}")["executionInfo"]["result"] == "success"
            per_size[size] = scans["n"] - before
    assert per_size[6] == per_size[2] <= 6, per_size


def test_the_engine_reads_live_work_only_and_every_query_uses_an_index(tmp_path: Path) -> None:
    from mpilaunch.emulator.store import StateStore

    store = StateStore(tmp_path / "s.sqlite3")
    store.insert("job", (), {"id": "J", "state": "active"})
    for i in range(50):
        store.insert("task", ("J",), {"id": f"old{i}", "state": "completed"})
    store.insert("task", ("J",), {"id": "live", "state": "active"})
    store.insert("task", ("J",), {"id": "gone", "state": "completed", "_deleting": True})
    store.update("task", ("J",), "old3", lambda d: d.update(_terminating=True))
    assert [(p, d["id"]) for p, d in store.work("task", ["active", "running"])] == [
        (("j",), "old3"), (("j",), "live"), (("j",), "gone")]
    store.update("task", ("J",), "old3", lambda d: d.pop("_terminating"))
    assert [d["id"] for _p, d in store.work("task", ["active", "running"])] == ["live", "gone"]
    assert store.count("task", ("J",)) == 52 and store.count("task", ("J",), limit=1) == 1
    assert store.count("task", ("J",), states=["running"], limit=1) == 0
    plans = {
        "work": ("SELECT seq, parent, lid, state, doc FROM docs WHERE kind='task' AND state IN ('active') UNION "
                 "SELECT seq, parent, lid, state, doc FROM docs WHERE kind='task' AND flag=1 ORDER BY seq"),
        "page": "SELECT seq, doc FROM docs WHERE kind='task' AND parent='j' AND seq>0 ORDER BY seq",
        "get": "SELECT doc FROM docs WHERE kind='task' AND parent='j' AND lid='live'",
        "delete children": "DELETE FROM docs WHERE kind='subtask' AND parent>='j/' AND parent<'j0'",
    }
    for name, sql in plans.items():
        plan = " ".join(str(row[3]) for row in store._db.execute("EXPLAIN QUERY PLAN " + sql))
        assert "SCAN docs" not in plan.replace("SCAN docs USING", ""), f"{name}: {plan}"
    store.close()


def test_a_store_from_before_the_flag_column_is_migrated(tmp_path: Path) -> None:
    from mpilaunch.emulator.store import StateStore

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript("CREATE TABLE docs (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, parent TEXT "
                         "NOT NULL, lid TEXT NOT NULL, state TEXT, doc TEXT NOT NULL, UNIQUE (kind, parent, lid)); "
                         "CREATE INDEX docs_state ON docs (kind, state);")
        for lid, doc in (("a", {"id": "a", "state": "completed", "_deleting": True}),
                         ("b", {"id": "b", "state": "completed"}), ("c", {"id": "c", "state": "running",
                                                                           "_terminating": True})):
            db.execute("INSERT INTO docs (kind, parent, lid, state, doc) VALUES ('task', 'j', ?, ?, ?)",
                       (lid, doc["state"], json.dumps(doc)))
        db.execute("INSERT INTO docs (kind, parent, lid, state, doc) VALUES ('task', 'j', 'd', 'active', '[1')")
    store = StateStore(path)
    assert [d["id"] for _p, d in store.work("task", ["active"])] == ["a", "c", "d"]
    assert store.get("task", ("j",), "d") == {"id": "d", "state": "active", "_corrupt": True}
    store.close()


def test_the_wait_for_the_services_grows_with_the_node_count_and_no_start_up_file_is_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from node_runtime import sshd
    from node_runtime.coordinate import WAIT_PER_NODE, wait_timeout

    assert wait_timeout(30, 2) == pytest.approx(30 + 2 * WAIT_PER_NODE)
    assert wait_timeout(30, 99) == pytest.approx(30 + 99 * WAIT_PER_NODE)
    assert wait_timeout(30, 99) > 55
    assert wait_timeout(30, 0) == 30
    monkeypatch.setenv("SHELL", "/bin/bash")
    monkeypatch.setenv("BASH_ENV", "/tmp/rc")
    monkeypatch.setenv("ENV", "/tmp/rc")
    env = sshd.ssh_environ()
    assert env["SHELL"] == "/bin/sh" and "BASH_ENV" not in env and "ENV" not in env
