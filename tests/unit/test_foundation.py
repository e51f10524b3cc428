"""The shared plumbing: subprocess helper, exception tree, CLI error handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from mpilaunch.cli.clickutil import LazyGroup, run_cli
from node_runtime import proc
from node_runtime.errors import CommandFailed, InvalidEnvironment, InvalidInput, ServiceError


def test_run_captures_output() -> None:
    done = proc.run([sys.executable, "-c", "print('hi')"])
    assert done.stdout == b"hi\n"


def test_run_failure_carries_argv_code_and_stderr() -> None:
    with pytest.raises(CommandFailed) as err:
        proc.run([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"])
    assert err.value.returncode == 3
    assert "boom" in err.value.stderr
    assert err.value.argv[0] == sys.executable
    assert "exited with code 3" in str(err.value) and "boom" in str(err.value)


def test_run_missing_program_and_timeout() -> None:
    with pytest.raises(CommandFailed, match="not found"):
        proc.run(["/nonexistent/program-xyz"])
    with pytest.raises(CommandFailed, match="timed out"):
        proc.run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)


def test_run_unexecutable_program_is_a_command_failure(tmp_path: Path) -> None:
    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(CommandFailed, match="permission denied"):
        proc.run([str(script)])


def test_run_without_check_returns_code() -> None:
    assert proc.run([sys.executable, "-c", "raise SystemExit(4)"], check=False).returncode == 4


def test_spawn_missing_program() -> None:
    with pytest.raises(CommandFailed, match="could not be started"):
        proc.spawn(["/nonexistent/program-xyz"])
    p = proc.spawn([sys.executable, "-c", "pass"], stdout=subprocess.DEVNULL)
    assert p.wait(10) == 0


def test_invalid_environment_lists_every_problem() -> None:
    err = InvalidEnvironment(["AZ_BATCH_HOST_LIST is missing", "CCP_NODES='x' is malformed"])
    assert err.exit_code == 2 and isinstance(err, InvalidInput)
    assert "AZ_BATCH_HOST_LIST is missing" in str(err) and "CCP_NODES='x'" in str(err)


def test_cli_turns_errors_into_messages_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    @click.group(cls=LazyGroup, lazy={"later": "tests.unit.test_foundation:_lazy_command"})
    def group() -> None:
        pass

    @group.command()
    def fail() -> None:
        raise InvalidInput("--nodes=0 must be at least 1")

    assert run_cli(group, "prog", ["fail"]) == 2
    assert "prog: error: --nodes=0 must be at least 1" in capsys.readouterr().err
    assert run_cli(group, "prog", ["later"]) == 3
    assert "10.0.0.2:2222" in capsys.readouterr().err
    assert run_cli(group, "prog", ["nope"]) == 2


@click.command()
def _lazy_command() -> None:
    raise ServiceError("sshd did not answer on 10.0.0.2:2222")


HELP = {"mpilaunch.cli": "from mpilaunch.cli import cli; from mpilaunch.cli.clickutil import run_cli; "
                         "code = run_cli(cli, 'prog', ['--help'])",
        "node_runtime.cli": "from node_runtime.cli import main; code = main(['--help'])"}


@pytest.mark.parametrize("module", HELP)
def test_help_imports_no_azure(module: str) -> None:
    """``--help`` lists every subcommand, so it imports every command module: none may pull in an Azure SDK."""
    code = (f"import sys; {HELP[module]}; "
            "assert code == 0, code; assert not [m for m in sys.modules if m.startswith('azure')], 'azure imported'")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "commands:" in done.stdout.lower()
