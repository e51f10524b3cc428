"""Client end-to-end fixture: `mpilaunch local up` (real emulator + Azurite) in a private MPILAUNCH_HOME."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpilaunch.client import local
from mpilaunch.client.local import LocalState
from tests.support.azurite import AZURITE_BIN

NODES = 3


@pytest.fixture(scope="module")
def local_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalState]:
    """Emulator + Azurite started by :func:`mpilaunch.client.local.up` on free ports, pool 'local' of 3 nodes."""
    if not AZURITE_BIN.exists():
        pytest.skip("Azurite is not installed (run scripts/setup)")
    with private_home(tmp_path_factory.mktemp("mpilaunch-home")):
        yield local.up(NODES, default_ports=False)


@contextlib.contextmanager
def private_home(home: Path) -> Iterator[Path]:
    """MPILAUNCH_HOME set to ``home`` (restored after); ``mpilaunch local down`` of it on the way out."""
    previous = os.environ.get("MPILAUNCH_HOME")
    os.environ["MPILAUNCH_HOME"] = str(home)
    try:
        yield home
    finally:
        local.down()
        if previous is None:
            os.environ.pop("MPILAUNCH_HOME", None)
        else:
            os.environ["MPILAUNCH_HOME"] = previous


def new_task_id(name: str) -> str:
    """A unique task id (tests share one emulator and job: no daemon of an earlier task may hold a node's port, and
    nothing here reaps them: the emulator and the node runtime must make sure of it)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"
