"""The exception tree, as users of the client import it; it is defined (and documented) in :mod:`node_runtime.errors`,
the lowest layer, so that nodes need no client code."""

from node_runtime.errors import (
    BatchError,
    CheckpointError,
    CommandFailed,
    InvalidEnvironment,
    InvalidInput,
    InvalidRequest,
    MpilaunchError,
    PreflightError,
    ServiceError,
    TaskFailed,
)

__all__ = ["BatchError", "CheckpointError", "CommandFailed", "InvalidEnvironment", "InvalidInput", "InvalidRequest",
           "MpilaunchError", "PreflightError", "ServiceError", "TaskFailed"]
