"""End to end through the client and the local Batch emulator: a task whose first attempt dies is retried by Batch
(maxTaskRetryCount=2) and completes with exact results, resuming from the checkpoint the client passed it."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from mpilaunch.cli import cli
from mpilaunch.cli.clickutil import run_cli
from mpilaunch.client.api import Launcher
from mpilaunch.client.local import LocalState
from tests.checkpoint.mpirun import PROGRAMS
from tests.checkpoint.programs.faulty_sweep import value
from tests.client.conftest import local_services  # noqa: F401 - the module-scoped emulator + Azurite fixture

pytestmark = [pytest.mark.slow, pytest.mark.azurite, pytest.mark.timeout(300)]
N, BATCH, RANKS = 300, 16, 3


def test_first_attempt_killed_then_batch_retry_completes_exactly(local_services: LocalState,  # noqa: F811
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    shared = tmp_path / "shared"  # stands for a file share every node mounts
    shared.mkdir()
    task = f"ckpt-{uuid.uuid4().hex[:8]}"
    code = run_cli(cli, "mpilaunch", [
        "run", "--local", "-n", str(RANKS), "--task-id", task, "--retries", "2", "--timeout", "240",
        "--checkpoint-url", f"file://{shared}/ckpt", "-i", str(PROGRAMS / "faulty_sweep.py"), "--logs",
        str(tmp_path / "logs"), "--", "python3", "faulty_sweep.py", "--n", str(N), "--ms", "3", "--batch",
        str(BATCH), "--log", str(shared / "log"), "--out", str(shared / "out.json"), "--kill-rank", "1",
        "--kill-after", "40", "--kill-by-end", "--die-once", str(shared / "died-once")])
    err = capsys.readouterr().err
    assert code == 0, err
    info = Launcher.local().batch.get_task("mpilaunch", task).execution_info
    assert info.retry_count == 1 and info.exit_code == 0  # one failed attempt, then success

    assert json.loads((shared / "out.json").read_text()) == [[f"k{i:05d}", value(f"k{i:05d}", i)] for i in range(N)]
    done = [line for f in (shared / "log").glob("*.log") for line in f.read_text().split()]
    assert set(done) == {f"k{i:05d}" for i in range(N)}
    assert len(done) - N <= RANKS * BATCH  # the retry redid at most one batch per rank
    primary_err = (tmp_path / "logs" / "instance-0" / "stderr.txt").read_text()
    assert "items already committed" in primary_err  # the retry resumed instead of starting over
