"""Results gather every List Subtasks page and every log, through the real SDK (replay server of the benchmark)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType

import pytest

from mpilaunch.client.api import Launcher, TaskRef
from mpilaunch.client.config import BatchConfig, Settings
from mpilaunch.emulator import defaults
from tests.support.exec_engine import load_file

REPLAY = Path(__file__).resolve().parents[2] / "benchmarks" / "gather_results.py"
INSTANCES = 60  # 59 subtasks: 3 pages of 25


@pytest.fixture(scope="module")
def replay() -> ModuleType:
    return load_file("gather_results", REPLAY)


@pytest.fixture
def launcher(replay: ModuleType) -> Iterator[Launcher]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), replay.make_handler(INSTANCES, 0.0))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield Launcher(Settings(BatchConfig(endpoint, defaults.ACCOUNT, defaults.KEY), None, "mpi"))
    finally:
        server.shutdown()
        thread.join(10)


@pytest.mark.parametrize("workers", [1, 8])
def test_every_page_and_every_log(launcher: Launcher, replay: ModuleType, tmp_path: Path, workers: int) -> None:
    results = launcher.results(TaskRef(replay.JOB, replay.TASK))
    assert [r.instance for r in results.instances] == list(range(INSTANCES))
    assert results.succeeded and results.instances[59].node == "tvm-0059"
    files = launcher.download_logs(results, tmp_path, workers=workers)
    assert len(files) == 2 * INSTANCES
    assert (tmp_path / "instance-59" / "stderr.txt").read_text() == replay.LOG
