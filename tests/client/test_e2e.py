"""End to end: the CLI and the unmodified azure-batch SDK against the emulator + Azurite, real sshd and Open MPI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import jsonschema
import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher, TaskRef
from mpilaunch.client.local import LocalState
from mpilaunch.client.results import SCHEMA_PATH
from mpilaunch.client.spec import TaskSpec
from node_runtime.errors import PreflightError
from tests.client.conftest import new_task_id

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
HELLO = REPO / "examples" / "hello_mpi.py"
WRITER = """
import sys
from mpi4py import MPI
rank = MPI.COMM_WORLD.Get_rank()
with open(f"out-{rank}.txt", "w") as fh:
    fh.write(f"rank {rank}\\n")
print("wrote", rank, flush=True)
"""


def tid(name: str) -> str:
    return new_task_id(name)


def cli_run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, "mpilaunch", list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_run_hello_on_three_nodes(local_services: LocalState, capsys: pytest.CaptureFixture[str],
                                  tmp_path: Path) -> None:
    task = tid("hello")
    code, out, err = cli_run(capsys, "run", "--local", "-n", "3", "--task-id", task, "-i", str(HELLO),
                             "--timeout", "120", "--logs", str(tmp_path / "logs"), "--", "python3", "hello_mpi.py")
    assert code == 0, err
    assert "0 (primary)" in out and out.count("success") >= 3
    assert f"task mpilaunch/{task}: completed, success on 3 instance(s)" in err
    primary_log = (tmp_path / "logs" / "instance-0" / "stdout.txt").read_text()
    assert "allreduce sum of ranks = 3 (expected 3); 3 distinct host(s)" in primary_log
    assert sorted(p.relative_to(tmp_path / "logs").as_posix() for p in (tmp_path / "logs").rglob("*.txt")) == [
        f"instance-{i}/{f}" for i in range(3) for f in ("stderr.txt", "stdout.txt")]

    code, out, err = cli_run(capsys, "results", "--local", task, "--output", "json")
    assert code == 0, err
    doc = json.loads(out)
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert [i["instance"] for i in doc["instances"]] == [0, 1, 2] and doc["instances"][0]["primary"]
    assert {i["result"] for i in doc["instances"]} == {"success"}
    assert len({i["node"] for i in doc["instances"]}) == 3

    code, out, err = cli_run(capsys, "logs", "--local", task)
    assert code == 0 and out == primary_log, err
    code, out, err = cli_run(capsys, "logs", "--local", task, "--instance", "2", "--stderr")
    assert code == 0 and out == (tmp_path / "logs" / "instance-2" / "stderr.txt").read_text()
    code, out, err = cli_run(capsys, "logs", "--local", task, "--output", "json")
    assert code == 0 and json.loads(out)["text"] == primary_log and json.loads(out)["file"] == "stdout.txt"
    code, out, err = cli_run(capsys, "logs", "--local", task, "--instance", "7")
    assert code == 2 and "no such instance: 7" in err and "3 instance(s): 0-2" in err

    launcher = Launcher.local()
    env = {e.name: e.value for e in launcher.batch.get_task("mpilaunch", task).environment_settings}
    secret = env["MPILAUNCH_TASK_SECRET"]
    assert len(secret) >= 43 and env["AZ_BATCH_NODE_COUNT"] == "3"
    for text in (out, err, primary_log, json.dumps(doc)):
        assert secret not in text


def test_outputs_are_collected_from_the_primary(local_services: LocalState, capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    prog = tmp_path / "writer.py"
    prog.write_text(WRITER)
    task = tid("writer")
    code, _, err = cli_run(capsys, "run", "--local", "-n", "2", "--task-id", task, "-i", str(prog),
                           "--collect", "out-*.txt", "--", "python3", "writer.py")
    assert code == 0, err
    code, _, err = cli_run(capsys, "results", "--local", task, "--outputs", str(tmp_path / "outs"))
    assert code == 0, err
    outputs = sorted(p.name for p in (tmp_path / "outs" / "outputs").iterdir())
    assert "out-0.txt" in outputs  # the primary's rank 0 file; other nodes' files stay on their nodes
    assert (tmp_path / "outs" / "outputs" / "out-0.txt").read_text() == "rank 0\n"
    assert "wrote 0" in (tmp_path / "outs" / "logs" / "stdout.txt").read_text()
    code, _, err = cli_run(capsys, "submit", "--local", "-n", "2", "--task-id", task, "--", "python3", "writer.py")
    assert code == 4 and "TaskExists" in err  # the service's refusal, as a BatchError


def test_a_failing_instance_is_named_with_its_reason(local_services: LocalState,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Occupy the coordination port on one node's address: that node's sshd cannot start, its instance fails."""
    launcher = Launcher.local()
    nodes = list(launcher.batch.list_nodes("local"))
    victim = nodes[-1]
    with socket.socket() as blocker:
        blocker.bind((victim.ip_address, 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        task = tid("fail")
        code, _, err = cli_run(capsys, "run", "--local", "-n", "3", "--task-id", task, "-i", str(HELLO),
                               "--ssh-port", str(port), "--timeout", "120", "--", "python3", "hello_mpi.py")
    assert code == 1, err
    res = launcher.results(TaskRef("mpilaunch", task))
    [bad] = [r for r in res.instances if r.node == victim.id]
    assert bad.result == "failure" and bad.exit_code not in (0, None)
    assert bad.failure is not None and bad.failure.code == "FailureExitCode"
    assert f"instance {bad.instance} on {victim.id}: exit code {bad.exit_code}" in err
    assert f"instance {bad.instance} stderr (last lines):" in err and "already in use" in err
    code, out, _ = cli_run(capsys, "results", "--local", task, "--output", "json")
    assert code == 1
    doc = json.loads(out)
    assert doc["result"] == "failure" and doc["instances"][bad.instance]["failure"]["code"] == "FailureExitCode"


def test_preflight_refuses_pools_that_cannot_run_the_task(local_services: LocalState,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from azure.batch import models as bm

    launcher = Launcher.local()
    suffix = uuid.uuid4().hex[:6]

    def pool(name: str, inter_node: bool) -> str:
        launcher.batch.create_pool(bm.BatchPoolCreateOptions(
            id=f"{name}-{suffix}", vm_size="standard_d2s_v3", target_dedicated_nodes=1, task_slots_per_node=1,
            enable_inter_node_communication=inter_node,
            virtual_machine_configuration=bm.VirtualMachineConfiguration(
                image_reference=bm.BatchVmImageReference(publisher="canonical", offer="x", sku="y"),
                node_agent_sku_id="batch.node.ubuntu 22.04")))
        return f"{name}-{suffix}"

    nocomm, small = pool("nocomm", False), pool("small", True)
    cases = [
        (nocomm, f"pool '{nocomm}' does not enable inter-node communication"),
        (small, f"pool '{small}' targets 1 node(s) (dedicated 1 + low-priority 0) but the task needs 2"),
        ("nosuchpool", "pool 'nosuchpool' does not exist"),
    ]
    for pool_id, reason in cases:
        code, _, err = cli_run(capsys, "submit", "--local", "-n", "2", "--pool", pool_id, "--job", f"j-{pool_id}",
                               "--", "python3", "x.py")
        assert code == 2, err
        assert reason in err and "fix:" in err
        assert not list(launcher.batch.list_jobs(filter=f"id eq 'j-{pool_id}'"))  # nothing was created
    # the same check through the documented Python API
    spec = TaskSpec(job_id=f"j-api-{suffix}", task_id="t", nodes=2, argv=("python3", "x.py"))
    with pytest.raises(PreflightError, match="does not enable inter-node communication"):
        launcher.preflight(spec, pool=nocomm)
    launcher.preflight(spec, pool="local")  # a pool that can run it: no PreflightError (warnings are fine)


def test_pool_create(local_services: LocalState, capsys: pytest.CaptureFixture[str]) -> None:
    pool = f"mpi-{uuid.uuid4().hex[:6]}"
    code, out, err = cli_run(capsys, "pool", "create", pool, "-n", "1", "--local", "--output", "json")
    assert code == 0, err
    assert json.loads(out)["outcome"] == "created"
    made = Launcher.local().batch.get_pool(pool)
    assert made.enable_inter_node_communication and made.task_slots_per_node == 1
    code, out, _ = cli_run(capsys, "pool", "create", pool, "-n", "1", "--local", "--output", "json")
    assert json.loads(out)["outcome"] == "exists"


def _start_waiting(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-c", "from mpilaunch.cli import main; main()", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if ": running |" in line:
            return proc, line
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"task did not start running: {proc.communicate()}")


@pytest.mark.parametrize("terminate", [False, True])
def test_ctrl_c_leaves_the_task_running_unless_asked(local_services: LocalState, terminate: bool) -> None:
    task = tid("sleepy")
    args = ["run", "--local", "-n", "2", "--task-id", task, "--interval", "0.3",
            *(["--terminate-on-interrupt"] if terminate else []), "--", "python3", "-c", "import time; time.sleep(120)"]
    proc, _ = _start_waiting(args)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    launcher = Launcher.local()
    ref = TaskRef("mpilaunch", task)
    if terminate:
        assert f"terminated task {ref}" in err
    else:
        assert f"task {ref} keeps running. Resume with: mpilaunch wait --job mpilaunch {task} --local" in err
        assert launcher.results(ref).state in ("active", "running", "preparing")
        launcher.terminate(ref)
    res = launcher.wait(ref, timeout=60, interval=0.3)
    assert res.completed and not res.succeeded


def test_secrets_never_reach_the_logs(local_services: LocalState, caplog: pytest.LogCaptureFixture) -> None:
    """With every logger at DEBUG (the SDK's HTTP logging included), no key, SAS signature or task secret appears."""
    import logging
    from urllib.parse import parse_qs, urlsplit

    from mpilaunch.client.local import AZURITE_KEY
    from mpilaunch.client.spec import TaskSpec

    caplog.set_level(logging.DEBUG)
    launcher = Launcher.local()
    spec = TaskSpec("mpilaunch", tid("quiet"), 2, ("python3", "hello_mpi.py"), inputs=(HELLO,))
    ref = launcher.submit(spec)
    assert launcher.wait(ref, timeout=120, interval=0.3).succeeded
    task = launcher.batch.get_task(ref.job_id, ref.task_id)
    secret = {e.name: e.value for e in task.environment_settings}["MPILAUNCH_TASK_SECRET"]
    url = task.multi_instance_settings.common_resource_files[0].http_url
    sig = parse_qs(urlsplit(url).query)["sig"][0]
    assert caplog.records, "the SDK logged nothing: this test would prove nothing"
    for value in (secret, sig, local_services.batch_key, AZURITE_KEY):
        assert value not in caplog.text


def test_local_up_is_idempotent_and_down_stops_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    from mpilaunch.client import local

    monkeypatch.setenv("MPILAUNCH_HOME", str(tmp_path))
    first = local.up(1, default_ports=False)
    try:
        again = local.up(1, default_ports=False)
        assert (again.emulator_pid, again.azurite_pid) == (first.emulator_pid, first.azurite_pid)
        status = local.status()
        assert status["running"] is True and status["batch_endpoint"] == first.batch_endpoint
        assert first.batch_key not in json.dumps(status)
        assert Launcher.local().batch.get_pool("local").target_dedicated_nodes == 1
        assert len(local.down()) == 2
    finally:
        local.down()  # a failed check must not leave this emulator and Azurite running under later tests
    for pid in (first.emulator_pid, first.azurite_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert local.status() == {"running": False, "directory": str(tmp_path / "local")}


def test_preflight_refuses_a_pool_whose_nodes_failed_their_start_task(local_services: LocalState,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    pool = f"broken-{uuid.uuid4().hex[:6]}"
    code, _, err = cli_run(capsys, "pool", "create", pool, "-n", "1", "--local", "--start-task", "false")
    assert code == 0, err
    launcher = Launcher.local()
    deadline = time.monotonic() + 90
    states: list[str] = []
    while time.monotonic() < deadline:
        states = [str(getattr(n.state, "value", n.state)) for n in launcher.batch.list_nodes(pool)]
        if states == ["starttaskfailed"]:
            break
        time.sleep(0.5)
    assert states == ["starttaskfailed"]
    code, _, err = cli_run(capsys, "submit", "--local", "-n", "1", "--pool", pool, "--job", f"j-{pool}",
                           "--", "true")
    assert code == 2, err
    assert f"pool '{pool}' has only 0 usable node(s) for a task that needs 1 (1 starttaskfailed)" in err
