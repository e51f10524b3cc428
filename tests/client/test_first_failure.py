"""What the client makes of a failed task: the first failure from the primary's launch report (results table, JSON,
summary, the stderr shown), a terminated task's instances never shown as a success, and --no-abort-on-exception
reaching the primary's command line."""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
from azure.batch import models as bm
from azure.core.exceptions import ResourceNotFoundError
from rich.console import Console

from mpilaunch.cli import cli, cliopts
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.cli.tabulate import render_table
from mpilaunch.client.results import (
    SCHEMA_PATH,
    FirstFailure,
    build_results,
    fetch_first_failure,
    program_lines,
    wants_launch_report,
)
from node_runtime.contract import launch_command_line
from tests.client.test_cli_parsing import OFFLINE, _offline_account, mpl  # noqa: F401 (the fixture)
from tests.client.test_results import subtasks, task

REPORT = {"exit_code": 1, "first_failure": {
    "rank": 1, "node": "10.0.0.5", "how": "exception", "exit_code": 1, "signal": None, "signal_name": None,
    "exception": "ValueError: bad input", "evidence": [], "detail": "MPI_Abort on MPI_COMM_WORLD",
    "summary": "rank 1 on 10.0.0.5: ValueError: bad input",
    "stderr_tail": ["Traceback (most recent call last):", '  File "app.py", line 3, in <module>',
                    "ValueError: bad input"]}}


class Files:
    """A Batch client whose download_node_file serves ``files`` (path -> bytes) and records what was asked."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files, self.asked = files, []

    def download_node_file(self, pool: str, node: str, path: str) -> list[bytes]:
        self.asked.append((pool, node, path))
        if path not in self.files:
            raise ResourceNotFoundError("no such file")
        return [self.files[path]]


REPORT_PATH = "workitems/j/job-1/t/0/wd/launch-report.json"


def test_the_first_failure_comes_from_the_primarys_launch_report() -> None:
    failed = task()
    assert wants_launch_report(failed) and not wants_launch_report(task("success", 0))
    client = Files({REPORT_PATH: json.dumps(REPORT).encode()})
    first = fetch_first_failure(client, failed)
    assert client.asked == [("p", "node-0", REPORT_PATH)]
    assert first == FirstFailure("exception", "rank 1 on 10.0.0.5: ValueError: bad input", 1, "10.0.0.5", 1, None,
                                 None, "ValueError: bad input", (), tuple(REPORT["first_failure"]["stderr_tail"]))
    assert fetch_first_failure(Files({}), failed) is None  # the node no longer has it
    assert fetch_first_failure(Files({REPORT_PATH: b"{not json"}), failed) is None
    assert fetch_first_failure(Files({REPORT_PATH: b'{"first_failure": null}'}), failed) is None
    assert FirstFailure.from_report({"first_failure": {"how": "exception"}}) is None  # no summary: not usable


def test_results_say_it_in_one_line_in_the_table_the_summary_and_the_json() -> None:
    first = FirstFailure.from_report(REPORT)
    res = build_results("j", task(), subtasks(), first_failure=first)
    assert res.summary() == "task j/t: completed, failure: rank 1 on 10.0.0.5: ValueError: bad input"
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(res))
    assert "first failure: rank 1 on 10.0.0.5: ValueError: bad input" in out.getvalue()
    doc = res.to_json()
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc["schema"] == "mpilaunch.results/2" and doc["outcome"] == "failure"
    assert doc["first_failure"]["rank"] == 1 and doc["first_failure"]["how"] == "exception"
    assert [i["outcome"] for i in doc["instances"]] == ["failure", "success", "failure"]


def terminated(subs: list[dict[str, Any]]) -> Any:
    t = bm.BatchTask({"id": "t", "state": "completed", "nodeInfo": {"nodeId": "node-0", "poolId": "p",
                                                                     "taskRootDirectory": "workitems/j/job-1/t"},
                      "executionInfo": {"result": "failure", "retryCount": 0, "requeueCount": 0,
                                        "failureInfo": {"category": "usererror", "code": "TaskEnded",
                                                        "message": "The task was terminated by user request"}}})
    return build_results("j", t, [bm.BatchSubtask(s) for s in subs])


@pytest.mark.parametrize("subs", [
    # the old emulator (and Azure, before its asynchronous subtask termination is through): success, or running
    [{"id": 1, "state": "completed", "exitCode": 0, "result": "success"}, {"id": 2, "state": "running"}],
    # the emulator now: TaskEnded
    [{"id": i, "state": "completed", "exitCode": 0, "result": "failure",
      "failureInfo": {"category": "usererror", "code": "TaskEnded",
                      "message": "The subtask was terminated because its task was terminated by user request"}}
     for i in (1, 2)],
])
def test_a_terminated_task_is_never_shown_as_a_success(subs: list[dict[str, Any]]) -> None:
    res = terminated(subs)
    assert res.outcome == "terminated" and not res.succeeded
    assert [res.instance_outcome(r) for r in res.instances] == ["terminated"] * 3
    assert res.summary() == ("task j/t: completed, terminated (TaskEnded: The task was terminated by user "
                             "request)")
    out = io.StringIO()
    Console(file=out, width=200).print(render_table(res))
    text = out.getvalue()
    assert "success" not in text and text.count("terminated") >= 4  # the title and every row
    doc = res.to_json()
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()))
    assert doc["outcome"] == "terminated" and {i["outcome"] for i in doc["instances"]} == {"terminated"}


def test_an_instance_that_failed_before_the_terminate_stays_a_failure() -> None:
    res = terminated([{"id": 1, "state": "completed", "exitCode": 3, "result": "failure",
                       "failureInfo": {"category": "usererror", "code": "FailureExitCode", "message": "x"}}])
    assert [res.instance_outcome(r) for r in res.instances] == ["terminated", "failure"]


def test_program_lines_leave_mpis_messages_out() -> None:
    stderr = """node-runtime: launch: fabric tcp: TCP
rank 1 starting
Traceback (most recent call last):
  File "app.py", line 3, in <module>
ValueError: bad input
--------------------------------------------------------------------------
MPI_ABORT was invoked on rank 1 in communicator MPI_COMM_WORLD
with errorcode 1.
--------------------------------------------------------------------------
[vm:09243] [[18661,0],0] ORTE_ERROR_LOG: Out of resource in file show_help.c at line 501
node-runtime: launch: first failure: rank 1 on 10.0.0.5: ValueError: bad input (every rank's lines: ranks.log)
""".splitlines()
    assert program_lines(stderr) == ["rank 1 starting", "Traceback (most recent call last):",
                                     '  File "app.py", line 3, in <module>', "ValueError: bad input"]


class FakeLauncher:
    def __init__(self, files: dict[str, bytes], local: bool = True) -> None:
        self.batch = Files(files)
        self.settings = SimpleNamespace(local=local)

    def errors(self) -> Any:
        import contextlib

        return contextlib.nullcontext()


def test_the_stderr_shown_is_the_failing_ranks_and_ends_with_the_command_for_the_rest(
        capsys: pytest.CaptureFixture[str]) -> None:
    res = build_results("j", task(), subtasks(), first_failure=FirstFailure.from_report(REPORT))
    cliopts.explain_failure(FakeLauncher({}), res)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err.startswith("rank 1 stderr (last lines):\n  | Traceback (most recent call last):")
    assert err.rstrip().endswith("the rest: mpilaunch logs --job j t --stderr --local")
    # no launch report: each failing instance's stderr.txt, without MPI's lines
    stderr = b"rank 2 starting\n----------------------------------------\nMPI_ABORT was invoked\n" \
             b"----------------------------------------\n[vm:1] [[1,0],0] ORTE_ERROR_LOG\nOSError: disk full\n"
    files = {"workitems/j/job-1/t/2/stderr.txt": stderr}
    cliopts.explain_failure(FakeLauncher(files, local=False), build_results("j", task(), subtasks()))  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "instance 2 stderr (last lines):\n  | rank 2 starting\n  | OSError: disk full\n" in err
    assert "MPI_ABORT" not in err and "the rest: mpilaunch logs --job j t --stderr --instance 2" in err
    cliopts.explain_failure(FakeLauncher({}), terminated([]))  # type: ignore[arg-type]
    assert capsys.readouterr().err == ""  # someone terminated it: nothing to explain


def test_no_abort_on_exception_reaches_the_primarys_command_line(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    words = shlex.split(launch_command_line(["python3", "app.py"], abort_on_exception=False))
    assert words[:3] == ["node-runtime", "launch", "--no-abort-on-exception"] and words[-3:] == ["--", "python3",
                                                                                                "app.py"]
    assert "--no-abort-on-exception" not in launch_command_line(["python3", "app.py"])
    app = tmp_path / "app.py"
    app.write_text("print(1)\n")
    for extra, expected in (([], False), (["--no-abort-on-exception"], True)):
        code, out, err = mpl(capsys, "submit", *OFFLINE, "--pool", "p", "--dry-run", "-n", "2", "-i", str(app),
                             "--output", "json", *extra, "python3", "app.py")
        assert code == 0, err
        command = shlex.split(json.loads(out)["task"]["commandLine"])
        assert ("--no-abort-on-exception" in command[:command.index("--")]) is expected
    assert run_cli(cli, "mpilaunch", ["run", "--help"]) == 0
    assert "--no-abort-on-exception" in capsys.readouterr().out
