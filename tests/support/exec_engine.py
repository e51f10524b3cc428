"""Helpers for tests of the emulator's execution half driven directly through the store (no HTTP)."""

from __future__ import annotations

import importlib.util
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import psutil

from mpilaunch.emulator.engine import Engine
from mpilaunch.emulator.nodes.base import NodeProvider
from mpilaunch.emulator.nodes.process import TAG_VAR
from mpilaunch.emulator.store import StateStore

PY = sys.executable


def require_mpi() -> None:
    """Skip (fail under CI) unless MPI can run through the emulator's process nodes: mpirun, ssh, sshd, root."""
    import os
    import shutil

    import pytest

    from mpilaunch.emulator.nodes.process import isolation_available

    missing = [t for t in ("mpirun", "ssh") if shutil.which(t) is None]
    if not (shutil.which("sshd") or Path("/usr/sbin/sshd").exists()):
        missing.append("sshd")
    if missing or not isolation_available():
        why = f"missing {missing}" if missing else "per-node host names need root and unshare"
        if os.environ.get("CI"):
            pytest.fail(f"cannot run MPI through the emulator: {why}")
        pytest.skip(why)


def py(code: str) -> str:
    """A Batch command line running ``code`` with this Python (no shell; Batch splits it like shlex)."""
    return shlex.join([PY, "-c", code])


def hang_first_attempt(marker: Path) -> str:
    """A command line that appends ``x`` to ``marker`` on every attempt, hangs on the first, prints ``finished``."""
    return py(f"import time; open({str(marker)!r}, 'a').write('x'); "
              f"time.sleep(0.2 if len(open({str(marker)!r}).read()) > 1 else 300); print('finished')")


def leftovers(node_ids: list[str]) -> list[psutil.Process]:
    """Processes still carrying the emulator tag of one of ``node_ids``."""
    found = []
    for p in psutil.process_iter():
        try:
            tag = p.environ().get(TAG_VAR, "")
        except (psutil.Error, OSError):
            continue
        if any(tag.startswith(f"{n}/") for n in node_ids):
            found.append(p)
    return found


def load_file(name: str, path: Path) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (a script or example that is not in a package)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Rig:
    """A store + engine in a temp dir, with shortcuts to add pools, jobs and tasks."""

    def __init__(self, data: Path, provider: NodeProvider | None = None) -> None:
        self.data = data
        self.store = StateStore(data / "state.sqlite3")
        self.engine = Engine(self.store, data, provider, poll=0.1, account_url="http://127.0.0.1:1")

    def pool(self, pool_id: str = "pool", nodes: int = 3, **extra: Any) -> None:
        doc = {"id": pool_id, "state": "active", "allocationState": "resizing", "targetDedicatedNodes": nodes,
               "enableInterNodeCommunication": True, "taskSlotsPerNode": 1, "vmSize": "standard_d2s_v3"}
        self.store.insert("pool", (), doc | extra)
        self.engine.wake()

    def job(self, job_id: str = "job", pool_id: str = "pool", **extra: Any) -> None:
        self.store.insert("job", (), {"id": job_id, "state": "active", "poolInfo": {"poolId": pool_id}} | extra)
        self.engine.wake()

    def task(self, task_id: str, command: str, *, instances: int = 0, coordination: str | None = None,
             job_id: str = "job", **extra: Any) -> None:
        doc: dict[str, Any] = {"id": task_id, "state": "active", "commandLine": command}
        if instances:
            doc["multiInstanceSettings"] = {"numberOfInstances": instances}
            if coordination is not None:
                doc["multiInstanceSettings"]["coordinationCommandLine"] = coordination
        self.store.insert("task", (job_id,), doc | extra)
        self.engine.wake()

    def get(self, task_id: str, job_id: str = "job") -> dict[str, Any]:
        doc = self.store.get("task", (job_id,), task_id)
        assert doc is not None, f"task {task_id} is gone"
        return doc

    def completed(self, task_id: str, timeout: float = 60.0) -> dict[str, Any]:
        done = wait_for(lambda: (d := self.get(task_id)) and d["state"] == "completed" and d, timeout,
                        f"task {task_id} to complete")
        return cast(dict[str, Any], done)

    def node_ids(self) -> list[str]:
        return [n["id"] for n in self.store.list("node")]

    def idle(self, count: int, pool_id: str = "pool") -> list[dict[str, Any]]:
        nodes = wait_for(lambda: (ns := self.store.list("node", (pool_id,), states=["idle"])) and len(ns) == count
                         and ns, 60, f"{count} idle nodes")
        return cast(list[dict[str, Any]], nodes)

    def doc(self, kind: str, parent: tuple[str, ...], doc_id: str) -> dict[str, Any]:
        found = self.store.get(kind, parent, doc_id)
        assert found is not None, f"{kind} {doc_id} is gone"
        return found

    def subtasks(self, task_id: str, job_id: str = "job") -> list[dict[str, Any]]:
        return sorted(self.store.list("subtask", (job_id, task_id)), key=lambda d: d["id"])


@contextmanager
def rig(data: Path, provider: NodeProvider | None = None) -> Iterator[Rig]:
    """A started engine; on exit it is stopped and no process of any of its nodes may be left."""
    r = Rig(data, provider)
    r.engine.start()
    try:
        yield r
    finally:
        nodes = r.node_ids()
        r.engine.stop()
        r.store.close()
        left = leftovers(nodes)
        for p in left:
            p.kill()
        assert not left, f"processes left behind: {[p.pid for p in left]}"
