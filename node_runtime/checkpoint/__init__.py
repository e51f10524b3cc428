"""Checkpointed, idempotent mpi4py work that survives Azure Batch retries (see docs/checkpointing.md).

- :func:`run_items`: exactly-once work items with dynamic load balancing and batched durable commits.
- :class:`StepCheckpoints`: all-or-nothing collective step checkpoints for iterative solvers.
- :func:`open_store`: the store a URL (or ``$MPILAUNCH_CHECKPOINT_URL``) names: a directory or an Azure Blob container.

mpi4py and the Azure SDK are imported only when used. Programs import this API as :mod:`mpilaunch.checkpoint`;
this name stays as its alias.
"""

from node_runtime.checkpoint.location import open_store
from node_runtime.checkpoint.steps import StepCheckpoints
from node_runtime.checkpoint.stores import ENV_URL, Store
from node_runtime.checkpoint.workitems import load_committed, run_items
from node_runtime.errors import CheckpointError

__all__ = ["ENV_URL", "CheckpointError", "StepCheckpoints", "Store", "load_committed", "open_store", "run_items"]
