"""The command line means what the user meant: options end at the program, typos are errors, hints work when pasted,
and ``submit --dry-run`` shows the exact request without sending anything."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.cli.cliopts import task_command
from mpilaunch.client.api import TaskRef

CLOSED = "http://127.0.0.1:9"  # nothing listens: a request would fail the command
OFFLINE = ["--endpoint", CLOSED, "--account", "acct"]


@pytest.fixture(autouse=True)
def _offline_account(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MPILAUNCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AZURE_BATCH_ACCESS_KEY", "a2V5")
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "DefaultEndpointsProtocol=http;AccountName=acct;"
                       "AccountKey=a2V5;BlobEndpoint=http://127.0.0.1:9/acct;")
    for name in ("AZURE_BATCH_ENDPOINT", "AZURE_BATCH_ACCOUNT", "MPILAUNCH_POOL", "MPILAUNCH_PROFILE"):
        monkeypatch.delenv(name, raising=False)


def mpl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run_cli(cli, "mpilaunch", list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(("typo", "meant"), [("--nodez", "--nodes"), ("--wall-tim", "--wall-time")])
def test_a_mistyped_option_is_an_error_not_the_program(typo: str, meant: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("submit", "run"):
        code, out, err = mpl(capsys, command, *OFFLINE, "-n", "2", typo, "2", "--", "python3", "x.py")
        assert code == 2 and f"No such option '{typo}'" in err and meant in err and not out


def test_options_end_at_the_program(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    app = tmp_path / "args.py"
    app.write_text("print(1)\n")
    code, out, err = mpl(capsys, "submit", *OFFLINE, "--pool", "p", "--dry-run", "-n", "3", "-i", str(app),
                         "--output", "json", "python3", "args.py", "--steps", "5", "-n", "7", "-e", "X=1")
    assert code == 0, err
    task = json.loads(out)["task"]
    assert task["multiInstanceSettings"]["numberOfInstances"] == 3
    assert shlex.split(task["commandLine"])[-8:] == ["python3", "args.py", "--steps", "5", "-n", "7", "-e", "X=1"]
    assert "X" not in {e["name"] for e in task["environmentSettings"]}


def test_dry_run_shows_the_request_masks_secrets_and_sends_nothing(capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("MPILAUNCH_REGISTRY_PASSWORD", "registry-pass-123")
    app = tmp_path / "app.py"
    app.write_text("print(2)\n")
    code, out, err = mpl(capsys, "submit", *OFFLINE, "--pool", "gpu", "--dry-run", "-n", "2", "-i", str(app),
                         "--image", "reg.io/app:1", "--registry", "reg.io", "--registry-user", "u",
                         "--checkpoint", "https://acct.blob.core.windows.net/ckpt?sv=1&sp=rcdl&sig=topsecret",
                         "--", "python3", "app.py")
    assert code == 0, err
    task = json.loads(out)
    env = {e["name"]: e["value"] for e in task["environmentSettings"]}
    assert env["MPILAUNCH_TASK_SECRET"] == "<hidden>"
    assert env["MPILAUNCH_CHECKPOINT_URL"] == "https://acct.blob.core.windows.net/ckpt?<hidden>"
    assert task["containerSettings"]["registry"]["password"] == "<hidden>"
    assert "topsecret" not in out + err and "registry-pass-123" not in out + err
    [staged] = task["multiInstanceSettings"]["commonResourceFiles"]
    assert staged["httpUrl"].startswith("http://127.0.0.1:9/acct/mpilaunch/inputs/")
    assert staged["httpUrl"].endswith("/app.py?<read SAS>") and staged["filePath"] == "wd/app.py"
    assert "nothing was sent" in err and "pool gpu exists" in err and "container configuration (the task runs in " \
        "reg.io/app:1)" in err


def test_printed_hints_carry_the_connection_flags() -> None:
    task = TaskRef("j", "t 1")
    assert task_command("terminate", task, {"local": True}) == "mpilaunch terminate --job j 't 1' --local"
    assert shlex.split(task_command("wait", task, {"local": False, "profile": "prod eu", "endpoint": "https://b",
                                                   "storage_account": "sa", "container": None})) == [
        "mpilaunch", "wait", "--job", "j", "t 1", "--profile", "prod eu", "--endpoint", "https://b",
        "--storage-account", "sa"]


def test_help_lists_submit_in_full(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = mpl(capsys, "--help")
    assert code == 0 and "Submit a program as a multi-instance task and return." in out


def test_shell_completion_completes_commands_and_options() -> None:
    def complete(words: str) -> list[str]:
        env = {**os.environ, "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1),
               "_MPILAUNCH_COMPLETE": "bash_complete"}
        done = subprocess.run([sys.executable, "-c", "from mpilaunch.entry import main; main()"], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
        return done.stdout.split()

    assert "plain,pool" in complete("mpilaunch po") and "plain,--nodes" in complete("mpilaunch run --no")
    assert "plain,resize" in complete("mpilaunch pool re")


def test_dry_run_of_an_auto_pool_shows_the_job_and_its_pool(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = mpl(capsys, "submit", *OFFLINE, "--dry-run", "--auto-pool", "--spot", "1", "-n", "3",
                         "--task-id", "t1", "--output", "json", "python3", "x.py")
    assert code == 0, err
    doc = json.loads(out)
    job = doc["add_job"]
    assert job["id"] == "t1" and doc["task"]["id"] == "t1" and job["onAllTasksComplete"] == "noaction"
    auto = job["poolInfo"]["autoPoolSpecification"]
    assert (auto["poolLifetimeOption"], auto["keepAlive"]) == ("job", False)
    pool = auto["pool"]
    assert (pool["targetDedicatedNodes"], pool["targetLowPriorityNodes"], pool["taskSlotsPerNode"]) == (2, 1, 1)
    assert pool["enableInterNodeCommunication"] and "install-runtime.sh" in pool["startTask"]["commandLine"]
