"""The client's public API, for notebooks and workflow tools (everything else in this package is private).

- :class:`Launcher`: build, pre-flight, submit, follow and inspect multi-instance tasks, on Azure or locally;
- :class:`TaskSpec`, :class:`ContainerSpec`: what to run; :class:`TaskRef`: a submitted task;
- :class:`TaskResults`, :class:`InstanceResult`: how it went, per instance (instance 0 = the primary);
- the errors, all :class:`MpilaunchError` (``mpilaunch.errors`` documents the tree).

The names load on first use, so importing the package stays cheap (the CLI imports it for every command).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mpilaunch.client.api import Launcher, TaskRef
    from mpilaunch.client.results import InstanceResult, TaskResults
    from mpilaunch.client.spec import ContainerSpec, TaskSpec
    from node_runtime.errors import (
        BatchError,
        CheckpointError,
        InvalidInput,
        MpilaunchError,
        PreflightError,
        ServiceError,
        TaskFailed,
    )

_WHERE = {
    "Launcher": "mpilaunch.client.api", "TaskRef": "mpilaunch.client.api",
    "TaskSpec": "mpilaunch.client.spec", "ContainerSpec": "mpilaunch.client.spec",
    "TaskResults": "mpilaunch.client.results", "InstanceResult": "mpilaunch.client.results",
    **dict.fromkeys(("MpilaunchError", "InvalidInput", "PreflightError", "BatchError", "ServiceError", "TaskFailed",
                     "CheckpointError"), "node_runtime.errors"),
}

__all__ = [
    "BatchError", "CheckpointError", "ContainerSpec", "InstanceResult", "InvalidInput", "Launcher", "MpilaunchError",
    "PreflightError", "ServiceError", "TaskFailed", "TaskRef", "TaskResults", "TaskSpec",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
