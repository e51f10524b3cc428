"""run/submit --hang-timeout: parsed like --wall-time, validated, and carried to the primary's command line as
launch --hang-timeout (which the nodes parse the same way)."""

from __future__ import annotations

import shlex
from datetime import timedelta

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.spec import TaskSpec
from mpilaunch.client.taskbuild import build_task
from node_runtime.cmd_launch import configure
from node_runtime.errors import InvalidInput


def _spec(**kw: object) -> TaskSpec:
    return TaskSpec(**{"job_id": "job-1", "task_id": "task_1", "nodes": 2, "argv": ("python3", "app.py"), **kw})


@pytest.mark.parametrize(("given", "shown"), [(timedelta(minutes=10), "10m"), (timedelta(seconds=90), "1m30s"),
                                              (timedelta(hours=2, seconds=5), "2h5s")])
def test_the_hang_timeout_reaches_launch_and_launch_reads_it_back(given: timedelta, shown: str) -> None:
    import argparse

    words = shlex.split(build_task(_spec(hang_timeout=given)).command_line)
    assert words[:4] == ["node-runtime", "launch", "--hang-timeout", shown]
    parser = argparse.ArgumentParser()
    configure(parser)
    assert parser.parse_args(words[2:]).hang_timeout == given.total_seconds()
    assert "--hang-timeout" not in build_task(_spec()).command_line


def test_a_hang_timeout_under_a_second_is_refused() -> None:
    with pytest.raises(InvalidInput) as err:
        _spec(hang_timeout=timedelta(0)).validate()
    assert "hang timeout must be at least 1s, got 0:00:00" in str(err.value)


@pytest.mark.parametrize(("value", "fragment"), [("soon", "invalid duration 'soon'"), ("5", "invalid duration '5'"),
                                                 ("0s", "hang timeout must be at least 1s")])
def test_bad_hang_timeouts_are_usage_errors_naming_the_value(value: str, fragment: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("submit", "run"):
        code = run_cli(cli, "mpilaunch", [command, "--endpoint", "http://127.0.0.1:9", "--hang-timeout", value, "--",
                                          "true"])
        assert code == 2
        assert fragment in capsys.readouterr().err
