"""The public API is small and pinned: what a notebook imports from ``mpilaunch.client`` and what a program imports
from ``mpilaunch.checkpoint`` (the same objects as the implementation's, loaded without the Azure SDKs)."""

from __future__ import annotations

import subprocess
import sys

import mpilaunch.checkpoint
import mpilaunch.client
import node_runtime.checkpoint
from node_runtime import errors

CLIENT_API = ["BatchError", "CheckpointError", "ContainerSpec", "InstanceResult", "InvalidInput", "Launcher",
              "MpilaunchError", "PreflightError", "ServiceError", "TaskFailed", "TaskRef", "TaskResults", "TaskSpec"]
CHECKPOINT_API = ["CheckpointError", "ENV_URL", "StepCheckpoints", "Store", "load_committed", "open_store",
                  "run_items"]


def test_client_api_is_pinned_and_every_name_resolves() -> None:
    assert sorted(mpilaunch.client.__all__) == CLIENT_API
    assert dir(mpilaunch.client) == CLIENT_API
    for name in CLIENT_API:
        assert getattr(mpilaunch.client, name).__name__ == name
    assert mpilaunch.client.MpilaunchError is errors.MpilaunchError
    assert issubclass(mpilaunch.client.PreflightError, mpilaunch.client.MpilaunchError)


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        mpilaunch.client.StagingStore  # type: ignore[attr-defined]  # noqa: B018 - private, not exported
    except AttributeError as exc:
        assert "StagingStore" in str(exc)
    else:
        raise AssertionError("a private name is exported")


def test_checkpoint_api_under_its_two_names() -> None:
    assert sorted(mpilaunch.checkpoint.__all__) == CHECKPOINT_API == sorted(node_runtime.checkpoint.__all__)
    for name in CHECKPOINT_API:
        assert getattr(mpilaunch.checkpoint, name) is getattr(node_runtime.checkpoint, name)
    assert mpilaunch.checkpoint.CheckpointError is errors.CheckpointError


def test_importing_the_api_loads_no_azure_sdk() -> None:
    probe = ("import sys, mpilaunch.client, mpilaunch.checkpoint; mpilaunch.client.Launcher; "
             "print(sorted(m for m in sys.modules if m.startswith(('azure', 'mpi4py', 'click', 'rich'))))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
