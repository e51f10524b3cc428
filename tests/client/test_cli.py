"""The client CLI without services: fast --help with no Azure import, input errors, secrets kept out of output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli

KEY = "c2VjcmV0LWtleS1ieXRlcy0xMjM0NTY3ODkwMTIzNDU2Nzg5MA=="
CLIENT_COMMANDS = ["submit", "run", "status", "wait", "results", "logs", "terminate", "reactivate", "pool", "local",
                   "job", "list", "delete", "cleanup"]

PROBE = """
import sys
from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
for args in {args!r}:
    run_cli(cli, "mpilaunch", args)
print("AZURE:" + ",".join(sorted(m for m in sys.modules if m.startswith("azure"))))
"""


def test_help_imports_no_azure_module() -> None:
    args = [["--help"]] + [[c, "--help"] for c in CLIENT_COMMANDS] + [["pool", "create", "--help"],
                                                                       ["local", "up", "--help"]]
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip().endswith("AZURE:"), done.stdout[-500:]
    for command in CLIENT_COMMANDS:
        assert command in done.stdout


def test_bad_spec_is_refused_before_any_network_call(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = run_cli(cli, "mpilaunch", ["submit", "--endpoint", "http://127.0.0.1:9", "--nodes", "0", "--env", "X=1",
                                      "--env", "AZ_BATCH_HOST_LIST=x", "--", "python3", "a.py"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "nodes must be >= 1, got 0" in err and "'AZ_BATCH_HOST_LIST' is reserved" in err


@pytest.mark.parametrize(("args", "fragment"), [
    (["--wall-time", "soon"], "invalid duration 'soon'"),
    (["--env", "NOEQUALS"], "'NOEQUALS'"),
    (["--image", "img", "--bind-mount", "nowhere"], "'nowhere'"),
    (["--bind-mount", "Shared"], "--bind-mount, --mount, --registry and --container-run-options need --image"),
])
def test_bad_options_name_the_value(args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(cli, "mpilaunch", ["submit", "--endpoint", "http://127.0.0.1:9", *args, "--", "true"])
    assert code == 2
    assert fragment in capsys.readouterr().err


def test_unreachable_service_is_a_batch_error_without_secrets(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.setenv("MPILAUNCH_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("AZURE_BATCH_ACCESS_KEY", KEY)
    code = run_cli(cli, "mpilaunch", ["status", "--endpoint", "http://127.0.0.1:9", "--account", "acct", "t1"])
    out = capsys.readouterr()
    assert code == 4, out.err
    assert "cannot reach http://127.0.0.1:9" in out.err
    assert KEY not in out.err + out.out


def test_missing_configuration_says_what_to_set(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("MPILAUNCH_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("AZURE_BATCH_ENDPOINT", raising=False)
    assert run_cli(cli, "mpilaunch", ["results", "t1"]) == 2
    assert "AZURE_BATCH_ENDPOINT" in capsys.readouterr().err


def test_local_status_when_nothing_runs(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setenv("MPILAUNCH_HOME", str(tmp_path))
    assert run_cli(cli, "mpilaunch", ["local", "status", "--output", "json"]) == 1
    assert '"running": false' in capsys.readouterr().out
    assert run_cli(cli, "mpilaunch", ["status", "--local", "t1"]) == 2
    assert "mpilaunch local up" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--spot", "--low-priority"])
def test_pool_create_refuses_a_negative_spot_count(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = run_cli(cli, "mpilaunch", ["pool", "create", "p", "--endpoint", "http://127.0.0.1:9", option, "-1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "-1" in err and "--spot" in err
