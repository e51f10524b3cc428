"""Launcher.wait's polling cadence and timeout (results and sleep faked: pure logic)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from azure.batch import models as bm

from mpilaunch.client import api
from mpilaunch.client.api import Launcher, TaskRef
from mpilaunch.client.config import BatchConfig, Settings
from mpilaunch.client.results import TaskResults, build_results
from mpilaunch.emulator import defaults
from node_runtime.errors import MpilaunchError


def results(state: str) -> TaskResults:
    return build_results("j", bm.BatchTask({"id": "t", "state": state}), [])


@pytest.fixture
def launcher() -> Launcher:
    return Launcher(Settings(BatchConfig("http://127.0.0.1:9", defaults.ACCOUNT, defaults.KEY), None))


def test_backs_off_while_nothing_changes_and_resets_on_change(launcher: Launcher,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    states = iter(["active"] * 6 + ["running"] * 3 + ["completed"])
    monkeypatch.setattr(launcher, "results", lambda ref: results(next(states)))
    sleeps: list[float] = []
    monkeypatch.setattr(api, "time", SimpleNamespace(sleep=sleeps.append, monotonic=time.monotonic))
    seen: list[str | None] = []
    final = launcher.wait(TaskRef("j", "t"), interval=1.0, max_interval=3.0, on_update=lambda r: seen.append(r.state))
    assert final.completed and seen[-1] == "completed" and len(seen) == 10
    assert sleeps == [1.0, 1.5, 2.25, 3.0, 3.0, 3.0, 1.0, 1.5, 2.25]


def test_timeout_leaves_the_task_and_says_so(launcher: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launcher, "results", lambda ref: results("running"))
    with pytest.raises(MpilaunchError, match=r"task j/t still running after 0.2s \(it keeps running\)"):
        launcher.wait(TaskRef("j", "t"), timeout=0.2, interval=0.05)
