"""The ``node-runtime`` command line: launch's arguments, usage errors, error messages and exit codes, and what
``--help`` imports. (``env`` is tested in test_env.py, ``coordinate`` and a real ``launch`` in tests/cluster.)"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import mpilaunch
from node_runtime import coordinate, launch
from node_runtime.cli import main
from node_runtime.contract import MpiFlavor
from node_runtime.errors import ServiceError

NODE_RUNTIME = Path(sys.executable).with_name("node-runtime")


@pytest.fixture
def launched(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """What ``node-runtime launch`` hands to :func:`node_runtime.launch.launch` (which then returns 7)."""
    calls: list[dict[str, Any]] = []

    def fake(env: object, environ: object, command: Sequence[str], **options: Any) -> int:
        calls.append({"command": list(command), **options})
        return 7

    monkeypatch.setattr(coordinate, "current_environment", lambda: "env")
    monkeypatch.setattr(launch, "launch", fake)
    return calls


@pytest.mark.parametrize(("argv", "command", "ppn"), [
    (["python", "app.py", "--ppn", "3"], ["python", "app.py", "--ppn", "3"], None),
    (["--", "prog"], ["prog"], None),
    (["--ppn", "2", "--", "prog", "-x"], ["prog", "-x"], 2),
    (["--ppn=2", "prog", "--", "x"], ["prog", "--", "x"], 2),
    (["prog", "-h", "--version", "--help"], ["prog", "-h", "--version", "--help"], None),
    (["--", "--ppn", "3"], ["--ppn", "3"], None),
    (["--", "--"], ["--"], None),
])
def test_launch_command_is_everything_from_the_program_on(launched: list[dict[str, Any]], argv: list[str],
                                                           command: list[str], ppn: int | None) -> None:
    assert main(["launch", *argv]) == 7
    assert launched == [{"command": command, "ppn": ppn, "threads": None, "flavor": None, "fabric_request": "auto",
                         "allow_small_shm": False, "timeout": 30.0, "hang_timeout": None, "abort_on_exception": True}]


def test_launch_options(launched: list[dict[str, Any]]) -> None:
    assert main(["launch", "--mpi", "mpich", "--timeout", "1.5", "--ppn", "4", "--hang-timeout", "2m",
                 "--no-abort-on-exception", "prog"]) == 7
    assert launched == [{"command": ["prog"], "ppn": 4, "threads": None, "flavor": MpiFlavor.MPICH,
                         "fabric_request": "auto", "allow_small_shm": False, "timeout": 1.5, "hang_timeout": 120,
                         "abort_on_exception": False}]


@pytest.mark.parametrize(("argv", "named"), [
    (["launch"], "required: COMMAND"),
    (["launch", "--"], "required: COMMAND"),
    (["launch", "--ppn", "2"], "required: COMMAND"),
    (["launch", "--ppn", "0", "prog"], "argument --ppn: '0'"),
    (["launch", "--ppn", "1.5", "prog"], "argument --ppn: '1.5'"),
    (["launch", "--timeout", "0", "prog"], "argument --timeout: '0'"),
    (["launch", "--timeout", "-1", "prog"], "argument --timeout: '-1'"),
    (["launch", "--timeout", "nan", "prog"], "argument --timeout: 'nan'"),
    (["launch", "--mpi", "lam", "prog"], "argument --mpi: invalid choice: 'lam'"),
    (["launch", "--hang-timeout", "5x", "prog"], "argument --hang-timeout: invalid duration '5x'"),
    (["launch", "--hang-timeout", "0s", "prog"], "argument --hang-timeout: invalid duration '0s': must be at least"),
    (["stacks", "--timeout", "soon"], "argument --timeout: invalid duration 'soon'"),
    (["launch", "--pp", "2", "prog"], "unrecognized arguments: --pp"),
    (["launch", "-x", "prog"], "unrecognized arguments: -x"),
    (["coordinate", "--sshd"], "argument --sshd"),
    (["env", "--jsn"], "unrecognized arguments: --jsn"),
    (["bogus"], "invalid choice: 'bogus'"),
    ([], "required: COMMAND"),
])
def test_usage_errors_exit_2_naming_the_value(launched: list[dict[str, Any]], capsys: pytest.CaptureFixture[str],
                                              argv: list[str], named: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: node-runtime") and named in err, err
    assert launched == []


def test_errors_become_one_message_and_their_exit_code(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    def fail(*args: object, **kwargs: object) -> int:
        raise ServiceError("sshd did not answer on 10.0.0.2:2222", details=["sshd.log: bind failed"])

    monkeypatch.setattr(coordinate, "current_environment", lambda: "env")
    monkeypatch.setattr(launch, "launch", fail)
    assert main(["launch", "prog"]) == 3
    assert capsys.readouterr().err == ("node-runtime: error: sshd did not answer on 10.0.0.2:2222\n"
                                       "  - sshd.log: bind failed\n")

    def interrupted(*args: object, **kwargs: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(launch, "launch", interrupted)
    assert main(["launch", "prog"]) == 130
    assert capsys.readouterr().err == "node-runtime: interrupted\n"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"node-runtime, version {mpilaunch.__version__}\n"


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          check=False)


@pytest.mark.parametrize("argv", [["--help"], ["launch", "--help"], ["coordinate", "-h"], ["env", "--help"]])
def test_help_imports_neither_click_nor_azure_nor_a_command(argv: list[str]) -> None:
    code = ("import sys; from node_runtime.cli import main; code = main(sys.argv[1:]); print('IMPORTED', sorted("
            "m for m in sys.modules if m.split('.')[0] in ('click', 'azure') or m in ('node_runtime.env', "
            "'node_runtime.coordinate', 'node_runtime.launch', 'node_runtime.mpirun'))); sys.exit(code)")
    done = _fresh(code, *argv)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("IMPORTED []\n"), done.stdout
    assert f"usage: node-runtime {argv[0] if len(argv) > 1 else ''}".rstrip() in done.stdout


def test_help_describes_every_command() -> None:
    group = subprocess.run([NODE_RUNTIME, "--help"], capture_output=True, text=True, timeout=60, check=True).stdout
    for summary in ("env       Print this node's environment model", "coordinate\n", "launch    Run COMMAND on every"):
        assert summary in group, group
    text = subprocess.run([NODE_RUNTIME, "launch", "--help"], capture_output=True, text=True, timeout=60,
                          check=True).stdout
    assert "[--ppn N] [--threads-per-rank T] [--mpi F] [--fabric auto|ucx|tcp]" in text
    assert "[--timeout S] [--hang-timeout DURATION] [--no-abort-on-exception]" in text
    assert "[--] COMMAND ARGS..." in text
    assert "launch-report.json" in text and "(default: the node's physical" in text and "(default: 30.0)" in text


def test_python_m_node_runtime_launch_in_a_real_process() -> None:
    """``python -m node_runtime`` reads the real command line and exits with launch's result; no click on the way."""
    code = ("import json, runpy, sys; import node_runtime.launch as l, node_runtime.coordinate as c; "
            "c.current_environment = lambda: None; "
            "l.launch = lambda env, environ, command, **kw: "
            "print(json.dumps([command, kw['ppn'], 'click' in sys.modules])) or 5; "
            "sys.argv[1:] = ['launch', '--ppn', '2', '--', 'python', 'app.py', '--ppn', '3']; "
            "runpy.run_module('node_runtime', run_name='__main__')")
    done = _fresh(code)
    assert done.returncode == 5, done.stderr
    assert json.loads(done.stdout) == [["python", "app.py", "--ppn", "3"], 2, False]  # flushed before the fast exit


def test_console_script_usage_error() -> None:
    done = subprocess.run([NODE_RUNTIME, "launch", "--ppn", "0", "--", "prog"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "argument --ppn: '0' is not an integer >= 1" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
